"""Data for decoder language models, shared by the generation tasks: the instruction prompt (Alpaca or
a chat template), a tokenizer adapter, tokenization with a response-only loss mask, deterministic
length-bucketed training batches and left-padded evaluation prompts.

Token layout of one training example (``add_bos`` true):

    [bos] prompt tokens ... | response tokens ... eos
    loss_mask:   0 ...   0  |  1 ...          1   1

The prompt and the response are encoded separately and concatenated, so the prompt tokens are
exactly the tokens the model is given at evaluation time and the masked tokens decode exactly to
the response text (+ eos).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "render_prompt",
    "render_example",
    "TokenizerAdapter",
    "as_tokenizer",
    "TokenizedSet",
    "tokenize_train",
    "tokenize_prompts",
    "default_buckets",
    "bucket_length",
    "steps_per_epoch",
    "epoch_batches",
    "train_batch",
    "response_slots",
    "loss_slots",
    "eval_batches",
    "decode_generations",
]

# --------------------------------------------------------------------------- prompts

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def example_field(example: Any, key: str) -> str:
    """``example[key]`` (a dict) or ``example.key`` as text; ``""`` when missing or empty."""
    if isinstance(example, Mapping):
        return str(example.get(key) or "")
    return str(getattr(example, key, "") or "")


def _user_message(example: Any) -> str:
    instruction, inp = example_field(example, "instruction"), example_field(example, "input")
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


def _chat_template(tokenizer: Any) -> Any:
    raw = tokenizer.raw if isinstance(tokenizer, TokenizerAdapter) else tokenizer
    if not hasattr(raw, "apply_chat_template"):
        raise TypeError("template='chat' needs a transformers tokenizer with a chat template "
                        f"(got {type(raw).__name__}); use template='alpaca'.")
    if getattr(raw, "chat_template", None) is None:
        raise ValueError("This tokenizer has no chat_template; use template='alpaca' or set one.")
    return raw


def render_prompt(example: Any, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text of ``example`` (a ``CommonsenseExample`` or a dict).

    - ``template="alpaca"``: LLM-Adapters' instruction format (``ALPACA_PROMPT``, or
      ``ALPACA_PROMPT_WITH_INPUT`` when ``input`` is non-empty), ending in ``"### Response:\\n"``.
    - ``template="chat"``: ``tokenizer.apply_chat_template`` of one user turn (instruction, blank
      line, input) with ``add_generation_prompt=True`` (transformers tokenizers only).
    """
    if template == "alpaca":
        inp = example_field(example, "input")
        if inp.strip():
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=example_field(example, "instruction"), input=inp)
        return ALPACA_PROMPT.format(instruction=example_field(example, "instruction"))
    if template == "chat":
        raw = _chat_template(tokenizer)
        return raw.apply_chat_template([{"role": "user", "content": _user_message(example)}],
                                       tokenize=False, add_generation_prompt=True)
    raise ValueError(f"Unknown prompt template {template!r}; use 'alpaca' or 'chat'.")


def render_example(example: Any, template: str = "alpaca", tokenizer: Any = None) -> tuple[str, str]:
    """``(prompt, response)`` texts of a training example. Alpaca: the response is ``output``
    (eos is added at tokenization). Chat: the response is what the chat template renders after the
    generation prompt for an assistant turn holding ``output`` (usually with its end-of-turn token)."""
    prompt = render_prompt(example, template, tokenizer)
    output = example_field(example, "output")
    if template == "alpaca":
        return prompt, output
    raw = _chat_template(tokenizer)
    full = raw.apply_chat_template([{"role": "user", "content": _user_message(example)},
                                    {"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The chat template's rendering of the conversation does not start with its "
                         "generation prompt; cannot split prompt and response. Use template='alpaca'.")
    return prompt, full[len(prompt):]


# --------------------------------------------------------------------------- tokenizer adapter

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<unk>")


class TokenizerAdapter:
    """A small common interface over a ``tokenizers.Tokenizer`` or a transformers tokenizer.

    ``encode``/``encode_batch`` never add special tokens; ``bos_id``/``eos_id``/``pad_id`` come from
    the transformers tokenizer, or for a raw ``tokenizers.Tokenizer`` from the arguments (token
    strings or ids) or the first present of the usual names (``</s>``, ``<|endoftext|>`` ...).
    ``pad_id`` falls back to ``eos_id`` (padding is masked everywhere, its value does not matter).
    ``default_add_bos`` says whether the tokenizer itself prepends BOS by default (Llama: yes,
    GPT-2/Qwen: no); raw ``tokenizers`` objects: False.
    """

    def __init__(self, tokenizer: Any, *, eos_token: str | int | None = None,
                 bos_token: str | int | None = None, pad_token: str | int | None = None):
        if isinstance(tokenizer, TokenizerAdapter):
            tokenizer = tokenizer.raw
        self.raw = tokenizer
        try:
            from tokenizers import Tokenizer as _RawTokenizer
        except ImportError:  # pragma: no cover
            _RawTokenizer = ()
        self.is_raw = isinstance(tokenizer, _RawTokenizer)
        if not self.is_raw and not callable(getattr(tokenizer, "encode", None)):
            raise TypeError(f"Unsupported tokenizer {type(tokenizer).__name__}: pass a tokenizers.Tokenizer "
                            f"or a transformers tokenizer.")
        self.eos_id = self._resolve(eos_token, "eos", _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError("The tokenizer has no EOS token; pass eos_token= (a token string or id).")
        self.bos_id = self._resolve(bos_token, "bos", _BOS_NAMES)
        pad = self._resolve(pad_token, "pad", _PAD_NAMES)
        self.pad_id = self.eos_id if pad is None else pad
        if self.is_raw:
            self.default_add_bos = False
        else:
            probe = list(tokenizer("a", add_special_tokens=True)["input_ids"])
            self.default_add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def _token_id(self, token: str | int) -> int | None:
        if isinstance(token, (int, np.integer)):
            return int(token)
        if self.is_raw:
            return self.raw.token_to_id(token)
        vocab = self.raw.get_vocab()
        return vocab.get(token)

    def _resolve(self, given: str | int | None, kind: str, names: Sequence[str]) -> int | None:
        if given is not None:
            tid = self._token_id(given)
            if tid is None:
                raise ValueError(f"{kind}_token {given!r} is not in the tokenizer's vocabulary.")
            return tid
        if not self.is_raw:
            tid = getattr(self.raw, f"{kind}_token_id", None)
            return None if tid is None else int(tid)
        if kind == "pad" and self.raw.padding is not None:
            return int(self.raw.padding["pad_id"])
        for name in names:
            tid = self.raw.token_to_id(name)
            if tid is not None:
                return int(tid)
        return None

    @property
    def vocab_size(self) -> int:
        return self.raw.get_vocab_size() if self.is_raw else len(self.raw)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of every text, without special tokens (special-token strings inside the text,
        e.g. a chat template's markers, are still recognised as their tokens)."""
        texts = list(texts)
        if not texts:
            return []
        if self.is_raw:
            return [list(e.ids) for e in self.raw.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self.raw(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self.raw.decode(ids, skip_special_tokens=skip_special_tokens)


def as_tokenizer(tokenizer: Any, **kwargs: Any) -> TokenizerAdapter:
    """Wrap ``tokenizer`` in a ``TokenizerAdapter`` (returned as is when already one and no
    overrides are given)."""
    if isinstance(tokenizer, TokenizerAdapter) and not kwargs:
        return tokenizer
    return TokenizerAdapter(tokenizer, **kwargs)


# --------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizedSet:
    """Ragged token sequences of a split, ready for batching.

    ``ids[i]`` (int32) is one full sequence: ``[bos] prompt response eos`` for training sets,
    ``[bos] prompt`` for prompt sets; ``loss_mask[i]`` (int32, same length) is 1 on the tokens the
    loss is taken on (response and eos), all zeros for prompt sets. ``truncated[i]``: 0 none,
    1 prompt cut from the left, 2 response cut as well (see ``tokenize_train``).
    """

    ids: list[np.ndarray]
    loss_mask: list[np.ndarray]
    pad_id: int
    max_length: int
    truncated: np.ndarray
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask) or len(self.ids) != len(self.truncated):
            raise ValueError("ids, loss_mask and truncated must have one entry per example.")
        self.lengths = np.asarray([len(x) for x in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def _resolve_bos(tok: TokenizerAdapter, add_bos: bool | None, prompt_ids: Sequence[int]) -> bool:
    add = tok.default_add_bos if add_bos is None else bool(add_bos)
    if add and tok.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token; pass bos_token= to as_tokenizer.")
    if add and len(prompt_ids) and prompt_ids[0] == tok.bos_id:
        return False  # the rendered prompt (a chat template) already starts with BOS
    return add


def tokenize_train(examples: Sequence[Any], tokenizer: Any, max_length: int, *, template: str = "alpaca",
                   add_bos: bool | None = None, add_eos: bool = True,
                   train_on_prompt: bool = False) -> TokenizedSet:
    """Tokenize training examples: ``[bos] + prompt + response + [eos]`` with ``loss_mask`` 1 on
    the response and eos tokens (on every token but BOS with ``train_on_prompt``, LLM-Adapters'
    ``train_on_inputs`` default).

    ``add_bos=None`` follows the tokenizer's own default (``TokenizerAdapter``); BOS is never
    doubled when a chat template already renders it. With ``template="chat"`` the response is the
    template's assistant turn, cut right after its first eos token if it holds one (else eos is
    appended when ``add_eos``).

    Truncation to ``max_length`` keeps the response: when the sequence is too long the prompt is
    cut *from the left* (its first tokens are dropped, BOS stays) so that its end, the
    ``### Response:`` header and the question's answer format, stays next to the response. This
    also covers a prompt that alone is longer than ``max_length``. Only when BOS + one prompt
    token + the response do not fit is the response itself cut on the right (eos lost; counted
    as ``truncated == 2``). ``truncated`` reports what happened per example.
    """
    max_length = int(max_length)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    tok = as_tokenizer(tokenizer)
    pairs = [render_example(ex, template, tok) for ex in examples]
    prompts = tok.encode_batch([p for p, _ in pairs])
    responses = tok.encode_batch([r for _, r in pairs])
    ids_out, mask_out, trunc = [], [], []
    for prompt, response in zip(prompts, responses):
        if template == "chat" and tok.eos_id in response:
            response = response[: response.index(tok.eos_id) + 1]
        elif add_eos:
            response = response + [tok.eos_id]
        bos = [tok.bos_id] if _resolve_bos(tok, add_bos, prompt) else []
        flag = 0
        room = max_length - len(bos) - len(response)
        if len(prompt) > room:
            if room >= 1:
                prompt, flag = prompt[len(prompt) - room:], 1
            else:
                keep = max_length - len(bos) - 1
                prompt, response, flag = prompt[-1:], response[:keep], 2
        seq = bos + prompt + response
        lm = [0] * len(bos) + [int(train_on_prompt)] * len(prompt) + [1] * len(response)
        ids_out.append(np.asarray(seq, dtype=np.int32))
        mask_out.append(np.asarray(lm, dtype=np.int32))
        trunc.append(flag)
    return TokenizedSet(ids_out, mask_out, tok.pad_id, max_length, np.asarray(trunc, np.int32))


def tokenize_prompts(examples: Sequence[Any], tokenizer: Any, max_length: int, *, template: str = "alpaca",
                     add_bos: bool | None = None) -> TokenizedSet:
    """Tokenize evaluation prompts: ``[bos] + prompt`` (exactly the prompt part of
    ``tokenize_train``). Longer prompts are cut from the left to ``max_length`` (BOS kept).
    ``max_length`` bounds the prompt only; generation adds its new tokens after it."""
    max_length = int(max_length)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    tok = as_tokenizer(tokenizer)
    prompts = tok.encode_batch([render_prompt(ex, template, tok) for ex in examples])
    ids_out, trunc = [], []
    for prompt in prompts:
        bos = [tok.bos_id] if _resolve_bos(tok, add_bos, prompt) else []
        room = max_length - len(bos)
        flag = int(len(prompt) > room)
        if flag:
            prompt = prompt[len(prompt) - room:]
        ids_out.append(np.asarray(bos + prompt, dtype=np.int32))
        trunc.append(flag)
    return TokenizedSet(ids_out, [np.zeros(len(x), np.int32) for x in ids_out], tok.pad_id, max_length,
                        np.asarray(trunc, np.int32))


# --------------------------------------------------------------------------- buckets


def default_buckets(max_length: int, multiple: int = 64) -> tuple[int, ...]:
    """``(multiple, 2*multiple, ..., max_length)``: the padded lengths batches may take."""
    max_length, multiple = int(max_length), int(multiple)
    if max_length <= 0 or multiple <= 0:
        raise ValueError(f"max_length and multiple must be positive, got {max_length}, {multiple}.")
    return tuple(range(multiple, max_length, multiple)) + (max_length,)


def check_buckets(buckets: Sequence[int] | None, data: TokenizedSet) -> tuple[int, ...]:
    if buckets is None:
        return default_buckets(data.max_length)
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] <= 0:
        raise ValueError(f"buckets must be positive lengths, got {buckets}.")
    return out


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= ``length``; ``ValueError`` when the length exceeds every bucket."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"A sequence of {length} tokens is longer than the largest bucket {max(buckets)}; "
                     f"add a bucket >= the tokenization max_length.")


# --------------------------------------------------------------------------- training batches


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the incomplete tail of each shuffled epoch is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return int(num_examples) // int(batch_size)


@functools.lru_cache(maxsize=8)
def _epoch_plan(lengths_key: bytes, n: int, batch_size: int, seed: int, epoch: int,
                chunk_batches: int) -> np.ndarray:
    """``(steps_per_epoch, batch_size)`` example indices of one epoch (read-only, cached)."""
    lengths = np.frombuffer(lengths_key, dtype=np.int64)
    per_epoch = n // batch_size
    order = np.random.default_rng((seed, epoch)).permutation(n)[: per_epoch * batch_size]
    chunk = batch_size * chunk_batches
    pieces = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        pieces.append(part[np.argsort(lengths[part], kind="stable")])
    plan = np.concatenate(pieces).reshape(per_epoch, batch_size) if pieces else np.zeros((0, batch_size), np.int64)
    batch_order = np.random.default_rng((seed, epoch, 1)).permutation(per_epoch)
    plan = plan[batch_order]
    plan.setflags(write=False)
    return plan


def epoch_batches(data: TokenizedSet, batch_size: int, seed: int, epoch: int,
                  chunk_batches: int = 16) -> np.ndarray:
    """Example indices of every batch of ``epoch``: shape ``(steps_per_epoch, batch_size)``.

    The epoch's order is ``default_rng((seed, epoch)).permutation(n)`` with the incomplete tail
    dropped; it is cut into chunks of ``chunk_batches * batch_size`` examples, each chunk sorted by
    length (stable) and cut into batches, and the batches are then shuffled with
    ``default_rng((seed, epoch, 1))`` so that batch lengths do not cycle within the epoch.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}.")
    if chunk_batches <= 0:
        raise ValueError(f"chunk_batches must be positive, got {chunk_batches}.")
    n = len(data)
    if steps_per_epoch(n, batch_size) == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples.")
    return _epoch_plan(np.ascontiguousarray(data.lengths, np.int64).tobytes(), n, int(batch_size),
                       int(seed), int(epoch), int(chunk_batches))


def _pad_rows(data: TokenizedSet, idx: np.ndarray, length: int, left: bool) -> tuple[np.ndarray, ...]:
    b = len(idx)
    ids = np.full((b, length), data.pad_id, np.int32)
    attn = np.zeros((b, length), np.int32)
    lmask = np.zeros((b, length), np.int32)
    for r, i in enumerate(idx):
        seq, m = data.ids[i], data.loss_mask[i]
        sl = slice(length - len(seq), length) if left else slice(0, len(seq))
        ids[r, sl], attn[r, sl], lmask[r, sl] = seq, 1, m
    return ids, attn, lmask


def train_batch(data: TokenizedSet, step: int, batch_size: int, seed: int = 0,
                buckets: Sequence[int] | None = None, *, chunk_batches: int = 16,
                rows: slice | None = None) -> dict[str, np.ndarray]:
    """Right-padded causal-LM batch for global step ``step`` (0-based) of an endless stream.

    A pure function of ``(data, step, batch_size, seed, buckets, chunk_batches)``: epoch
    ``step // steps_per_epoch`` is laid out by ``epoch_batches`` (every kept example once per
    epoch, length-sorted within chunks) and the batch is padded to the smallest bucket holding its
    longest sequence (``buckets`` default: ``default_buckets`` of ``data.max_length``), so jit
    sees at most ``len(buckets)`` shapes. Returns, all ``(batch_size, L)`` except ``weights``:

    - ``input_ids`` int32, padded with ``data.pad_id`` on the right;
    - ``attention_mask`` int32, 1 on real tokens;
    - ``loss_mask`` int32, 1 on response (+eos) tokens, aligned with ``input_ids`` (not shifted);
    - ``labels`` int32, ``input_ids`` where ``loss_mask`` else -100 (Hugging Face convention:
      unshifted, the loss shifts; ``causal_lm_loss`` does ``logits[:, t]`` vs token ``t+1``);
    - ``position_ids`` int32, ``0..L-1``;
    - ``weights`` float32 ``(batch_size,)``, all ones (no padding rows in training batches).

    - ``loss_index`` int32 ``(batch_size, R)``: the positions ``t`` whose logits are scored (those
      with ``loss_mask[t+1] == 1``), padded with 0; ``loss_targets`` the tokens ``t+1`` they predict;
      ``loss_weights`` float32, 1 on real slots. ``R`` (the same for every row) is the smallest power of
      two >= 8 holding the batch's longest response, at most ``L``: the model computes logits at these
      positions only (``LlamaForCausalLM(..., logits_at=)``, ``response_loss``), not at all ``L``.

    ``rows`` pads only those rows of the batch (one process's share; same padded length and ``R``).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    buckets = check_buckets(buckets, data)
    n = len(data)
    per_epoch = steps_per_epoch(n, batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples.")
    epoch, position = divmod(int(step), per_epoch)
    idx = epoch_batches(data, batch_size, seed, epoch, chunk_batches)[position]
    length = bucket_length(int(data.lengths[idx].max()), buckets)
    slots = response_slots(max(int(np.sum(data.loss_mask[i][1:])) for i in idx), length)
    idx = idx if rows is None else idx[rows]
    ids, attn, lmask = _pad_rows(data, idx, length, left=False)
    loss_index, loss_targets, loss_weights = loss_slots(ids, lmask, slots)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": lmask,
        "labels": np.where(lmask > 0, ids, -100).astype(np.int32),
        "position_ids": np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy(),
        "weights": np.ones(len(idx), np.float32),
        "index": np.asarray(idx, np.int32),
        "loss_index": loss_index,
        "loss_targets": loss_targets,
        "loss_weights": loss_weights,
    }


def response_slots(count: int, length: int) -> int:
    """The static number of scored positions of a batch whose longest response scores ``count`` tokens:
    the smallest power of two >= max(count, 8), at most ``length`` (few shapes for jit to compile)."""
    slots = 8
    while slots < count:
        slots *= 2
    return min(slots, int(length))


def loss_slots(ids: np.ndarray, lmask: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(loss_index, loss_targets, loss_weights)`` ``(B, slots)`` of right-padded rows (see train_batch)."""
    b = len(ids)
    index = np.zeros((b, slots), np.int32)
    targets = np.zeros((b, slots), np.int32)
    weights = np.zeros((b, slots), np.float32)
    for r in range(b):
        t = np.nonzero(lmask[r, 1:])[0]
        index[r, :len(t)], targets[r, :len(t)], weights[r, :len(t)] = t, ids[r, t + 1], 1.0
    return index, targets, weights


# --------------------------------------------------------------------------- eval batches


def eval_batches(data: TokenizedSet, batch_size: int, buckets: Sequence[int] | None = None, *,
                 sort_by_length: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Left-padded prompt batches for generation, covering every prompt once.

    Prompts are grouped by length (``sort_by_length``; else file order) and each batch is padded
    on the left to the smallest bucket holding its longest prompt, so every prompt ends at the last
    column and generation appends after it. The last batch is filled up to ``batch_size`` by
    repeating its first row. Each batch holds ``input_ids`` (pad on the left),
    ``attention_mask``, ``position_ids`` (``cumsum(mask) - 1`` clipped at 0: real tokens count
    from 0), ``index`` (int32 example index; -1 on filler rows) and ``weights`` (1 real, 0 filler).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    buckets = check_buckets(buckets, data)
    n = len(data)
    order = np.argsort(data.lengths, kind="stable") if sort_by_length else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        n_real = len(idx)
        length = bucket_length(int(data.lengths[idx].max()), buckets)
        full = np.concatenate([idx, np.full(batch_size - n_real, idx[0], idx.dtype)])
        ids, attn, _ = _pad_rows(data, full, length, left=True)
        index = np.where(np.arange(batch_size) < n_real, full, -1).astype(np.int32)
        yield {
            "input_ids": ids,
            "attention_mask": attn,
            "position_ids": np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32),
            "index": index,
            "weights": (index >= 0).astype(np.float32),
        }


def decode_generations(tokenizer: Any, token_ids: Any, index: Any = None) -> list[str]:
    """Decode generated continuations (rows of new tokens only), each cut at its first eos, special
    tokens skipped. With ``index`` (an eval batch's), rows with index -1 are dropped."""
    tok = as_tokenizer(tokenizer)
    rows = np.asarray(token_ids)
    keep = range(len(rows)) if index is None else [r for r, i in enumerate(np.asarray(index)) if i >= 0]
    out = []
    for r in keep:
        row = [int(t) for t in rows[r]]
        if tok.eos_id in row:
            row = row[: row.index(tok.eos_id)]
        out.append(tok.decode(row, skip_special_tokens=True))
    return out
