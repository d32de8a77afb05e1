"""GPT-2 in Flax Linen: transformers' ``GPT2ForSequenceClassification`` and ``GPT2LMHeadModel``.

Our GPT-2 stack (``GPT2Stack``: ``wte``, ``wpe``, blocks ``h/{i}``, ``ln_f``) sits under ``transformer``.
The classifier scores each row's last real token with a bias-free ``score`` head, as transformers pools
(the rightmost token that is not the pad id); the LM's head is tied to ``wte`` (``logits = h @ wte.T``,
float32; the params hold no ``lm_head``). The params are the PyTorch model's names in Flax layout
(``transformer/h/0/attn/c_attn``, Conv1D kernels stored ``(d_out, d_in)``: ``models.hf.TRANSPOSED["gpt2"]``),
so PEFT adapters trained on the PyTorch models import onto them (``arch="gpt2"``; ``score`` in
modules_to_save for SEQ_CLS).

KV cache (the LM, for ``greedy_generate``): an explicit pytree made by ``init_cache(config, batch,
length)``, one ``{"key", "value"}`` dict per block, ``(batch, length, n_head, head_dim)``. With
``cache=`` a call writes its ``L`` new keys/values at buffer positions ``cache_index .. cache_index + L
- 1`` and attends to the whole buffer; ``attention_mask`` then spans the buffer ``(B, length)``.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.guards import atomic_save_safetensors
from decomp_jax.models.attention import Mask, attention, check_implementation, splash_segments
from decomp_jax.models.bert import ACTIVATIONS
from decomp_jax.models.generation import prompt_buffer, token_finisher
from decomp_jax.models.llama import (
    ScoredHead, last_token_hidden, mask_positions, segment_positions, stack_layers, unstack_layers,
)
from decomp_jax.models.names import get_arch, read_torch_weights, torch_state_dict


class Conv1D(nn.Module):
    """GPT-2's projection with its kernel stored ``(d_out, d_in)`` (``models.hf.TRANSPOSED["gpt2"]``):
    ``y = x @ kernel.T + bias``."""

    features: int
    dtype: object = jnp.float32  # (factored execution reads it, as of nn.Dense)
    precision: object = None
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return x @ kernel.T + bias


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: activation_function={name!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class Block(nn.Module):
    """One GPT-2 block: pre-LayerNorm causal self-attention and MLP, each with a residual.
    Returns ``(hidden, new_cache)`` (``None`` without a cache)."""

    config: object
    param_dtype: object = jnp.float32
    attention: str = "auto"
    attention_chunk: int = 512

    @nn.compact
    def __call__(self, hidden, masks, cache=None, cache_index=None):
        cfg, pd = self.config, self.param_dtype
        norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, param_dtype=pd, name=name)  # noqa: E731
        attended, new_cache = Attention(cfg, pd, self.attention, self.attention_chunk, name="attn")(
            norm("ln_1")(hidden), masks, cache, cache_index)
        hidden = hidden + attended
        mlp = MLP(cfg, cfg.n_inner or 4 * cfg.n_embd, pd, name="mlp")
        return hidden + mlp(norm("ln_2")(hidden)), new_cache


def _block_class(remat: bool, scanned: bool):
    # cache_index may be None or traced: nothing is static
    return nn.remat(Block, prevent_cse=not scanned) if remat else Block


class Blocks(nn.Module):
    """The blocks, named ``0``, ``1``, ... (params ``h/{i}/...``), each under ``nn.remat`` with ``remat``."""
    config: object
    param_dtype: object = jnp.float32
    remat: bool = False
    attention: str = "auto"
    attention_chunk: int = 512

    @nn.compact
    def __call__(self, hidden, masks, cache=None, cache_index=None):
        new_cache = []
        block = _block_class(self.remat, False)
        for i in range(self.config.n_layer):
            hidden, layer_cache = block(self.config, self.param_dtype, self.attention, self.attention_chunk, name=str(i))(
                hidden, masks, None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        return hidden, (tuple(new_cache) if cache is not None else None)


def scanned_blocks(config, param_dtype=jnp.float32, remat: bool = False, attention: str = "auto",
                   attention_chunk: int = 512):
    """The blocks under one ``nn.scan`` (params ``layers/...`` with a leading axis of ``n_layer``, as our
    Llama's scanned layers: adapters' default ``stacked="layers"`` finds them; ``stack_blocks`` turns the
    unrolled tree into this one): carry the hidden states, scan over the cache, broadcast the attention mask
    and ``cache_index``."""
    return nn.scan(_block_class(remat, True), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast, 0, nn.broadcast),
                   length=config.n_layer)(config, param_dtype, attention, attention_chunk, name="layers")


class Attention(nn.Module):
    """Multi-head causal self-attention through ``models.attention.attention`` (``attention``: its
    implementation, ``attention_chunk`` the block size of ``chunked``), as our Llama's."""
    config: object
    param_dtype: object = jnp.float32
    attention: str = "auto"
    attention_chunk: int = 512

    @nn.compact
    def __call__(self, x, masks, cache=None, cache_index=None):
        """``masks``: ``(allowed, segments)``, the mask as a ``Mask`` and as ``splash`` takes it
        (``models.attention.segment_ids``; None for a cached call)."""
        cfg, pd = self.config, self.param_dtype
        allowed, segments = masks
        d, h = cfg.n_embd, cfg.n_head
        b, s, _ = x.shape
        q, k, v = (t.reshape(b, s, h, d // h) for t in jnp.split(Conv1D(3 * d, param_dtype=pd, name="c_attn")(x), 3, axis=-1))
        new_cache = None
        if cache is not None:  # the new keys/values go into the buffer; the queries attend to all of it
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), start)
            new_cache = {"key": k, "value": v}
        context = attention(q, k, v, allowed, h, scale=(d // h) ** -0.5, implementation=self.attention,
                            chunk=self.attention_chunk, segments=segments)
        return Conv1D(d, param_dtype=pd, name="c_proj")(context), new_cache


class MLP(nn.Module):
    config: object
    inner: int
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = _activation(self.config.activation_function)
        pd = self.param_dtype
        return Conv1D(self.config.n_embd, param_dtype=pd, name="c_proj")(act(Conv1D(self.inner, param_dtype=pd,
                                                                                   name="c_fc")(x)))


def _check_config(cfg) -> None:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if getattr(cfg, key, False):
            raise ValueError(f"config.json: {key}=true is not supported by decomp_jax's GPT-2; set it to false.")
    if not getattr(cfg, "scale_attn_weights", True):
        raise ValueError("config.json: scale_attn_weights=false is not supported by decomp_jax's GPT-2.")


class GPT2Stack(nn.Module):
    """The GPT-2 transformer (``wte``, ``wpe``, blocks ``h/{i}``, ``ln_f``), inference only (no dropout):
    attention is causal with key padding masked (``models.attention``). Returns
    ``(hidden, new_cache)`` (``None`` without a cache); ``attend`` is the tied LM head.
    ``scan_layers``: the blocks under one ``nn.scan`` (params ``layers/...`` stacked, see ``stack_blocks``);
    ``remat``: activation checkpointing per block; ``param_dtype``: the dtype ``init`` creates params in;
    ``attention``, ``attention_chunk``: the attention implementation (``models.attention``)."""

    config: object
    scan_layers: bool = False
    remat: bool = False
    param_dtype: object = jnp.float32
    attention: str = "auto"
    attention_chunk: int = 512

    def setup(self):
        cfg, pd = self.config, jnp.dtype(self.param_dtype)
        init = nn.initializers.normal(getattr(cfg, "initializer_range", 0.02))
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, param_dtype=pd)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, param_dtype=pd)
        if self.scan_layers:
            self.layers = scanned_blocks(cfg, pd, self.remat, self.attention, self.attention_chunk)
        else:
            self.h = Blocks(cfg, pd, self.remat, self.attention, self.attention_chunk)
        self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, param_dtype=pd)

    def attend(self, hidden):
        """The tied LM head: ``hidden @ wte.T``."""
        return self.wte.attend(hidden)

    def __call__(self, input_ids, attention_mask, position_ids, cache=None, cache_index=None, segment_ids=None):
        _check_config(self.config)
        s = input_ids.shape[-1]
        key_len = s if cache is None else cache[0]["key"].shape[1]
        if attention_mask.shape[-1] != key_len:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns; expected {key_len} "
                             f"({'the cache buffer length' if cache is not None else 'the input length'}).")
        hidden = self.wte(input_ids) + self.wpe(position_ids)
        query_index = jnp.arange(s) + (0 if cache is None else cache_index)
        # causal, padding, packed rows (a token sees the earlier tokens of its own example only)
        allowed = Mask.causal(query_index, attention_mask, segment_ids)
        masks = (allowed, splash_segments(self.attention, attention_mask, segment_ids, cache is None))
        if not self.scan_layers:
            hidden, new_cache = self.h(hidden, masks, cache, cache_index)
            return self.ln_f(hidden), new_cache
        stacked = None if cache is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *cache)
        hidden, new_stacked = self.layers(hidden, masks, stacked, cache_index)
        if cache is not None:
            new_stacked = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], new_stacked) for i in range(len(cache)))
        return self.ln_f(hidden), new_stacked


class GPT2ForSequenceClassification(nn.Module):
    """``apply({"params": p}, input_ids, attention_mask)`` -> ``(B, num_labels)`` float32 logits.
    ``config``: a transformers ``GPT2Config`` (its ``pad_token_id`` decides the pooled token; positions
    are ``0..L-1`` as in transformers' PyTorch GPT-2 when none are given)."""

    config: object
    num_labels: int = 2

    def setup(self):
        self.transformer = GPT2Stack(self.config)
        self.score = nn.Dense(self.num_labels, use_bias=False, name="score")

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        hidden, _ = self.transformer(input_ids, jnp.asarray(attention_mask), position_ids)
        pooled = last_token_hidden(hidden, input_ids, attention_mask, self.config.pad_token_id)
        return self.score(pooled).astype(jnp.float32)


class GPT2LMHeadModel(ScoredHead, nn.Module):
    """transformers' ``GPT2LMHeadModel``: ``apply({"params": p}, input_ids, attention_mask=None,
    position_ids=None)`` -> ``(B, L, vocab)`` float32 logits from the head tied to ``wte``; with
    ``cache=`` (``init_cache``) and ``cache_index`` -> ``(logits, new_cache)``; ``logits_at``, ``targets``
    and ``chunk`` as our Llama's (``llama.ScoredHead``). Positions default to ``0..L-1`` (``cache_index ..``
    with a cache), as transformers' forward; ``greedy_generate`` passes ``cumsum(mask) - 1`` (as
    transformers' ``generate``), so left-padded prompts get the positions of their unpadded selves. No
    dropout (an inference and adapter-training model). ``scan_layers``, ``remat``, ``param_dtype``,
    ``attention``, ``attention_chunk``: as ``GPT2Stack``'s (a scanned model takes ``stack_blocks(params)``)."""

    config: object
    scan_layers: bool = False
    remat: bool = False
    param_dtype: object = jnp.float32
    attention: str = "auto"
    attention_chunk: int = 512

    def setup(self):
        check_implementation(self.attention)
        self.transformer = GPT2Stack(self.config, self.scan_layers, self.remat, self.param_dtype, self.attention,
                                     self.attention_chunk)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, cache=None, cache_index=None,
                 logits_at=None, targets=None, chunk=None, segment_ids=None):
        input_ids = jnp.asarray(input_ids)
        b, s = input_ids.shape
        if cache is not None and cache_index is None:
            cache_index = 0
        if attention_mask is None:
            attention_mask = jnp.ones((b, s if cache is None else cache[0]["key"].shape[1]), jnp.int32)
        if segment_ids is not None:  # packed rows (training): positions restart per example, as our Llama's
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training calls: not with a cache.")
            position_ids = segment_positions(segment_ids) if position_ids is None else position_ids
        if position_ids is None:
            start = 0 if cache is None else cache_index
            position_ids = jnp.broadcast_to(start + jnp.arange(s), (b, s))
        hidden, new_cache = self.transformer(input_ids, jnp.asarray(attention_mask), position_ids, cache, cache_index,
                                             segment_ids)
        return self._outputs(hidden, new_cache, cache, logits_at, targets, chunk)

    def _head(self, hidden):
        return self.transformer.attend(hidden).astype(jnp.float32)


GPT2_LAYERS = {"root": ("transformer",), "unrolled": "h/{}"}  # where stack_layers finds GPT-2's blocks


def stack_blocks(params):
    """The unrolled GPT-2 tree (``transformer/h/{i}/...``) as the ``scan_layers`` one
    (``transformer/layers/...``, each leaf stacked on a new leading axis; ``llama.stack_layers``), factor
    leaves of an adapted tree too; ``unstack_blocks`` inverts it."""
    return stack_layers(params, **GPT2_LAYERS)


def unstack_blocks(params):
    """Inverse of ``stack_blocks``: every leaf under ``transformer/layers`` split into ``transformer/h/{i}``."""
    return unstack_layers(params, **GPT2_LAYERS)


def init_cache(config, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache for ``GPT2LMHeadModel``: one ``{"key", "value"}`` dict per block,
    ``(batch, length, n_head, head_dim)``."""
    shape = (batch, length, config.n_head, config.n_embd // config.n_head)
    return tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)} for _ in range(config.n_layer))


def greedy_generate(model: GPT2LMHeadModel, params, input_ids, attention_mask=None, max_new_tokens: int = 20,
                    eos_token_id=None, pad_token_id: Optional[int] = None, *, apply_fn: Optional[Callable] = None):
    """Greedy decoding with the KV cache: ``(B, P + max_new_tokens)`` int32, the prompt followed by the
    new tokens, as transformers' ``generate(do_sample=False)``. Prompts may be left-padded
    (``attention_mask``): positions are ``cumsum(mask) - 1``, as transformers' ``generate`` makes them.
    One prefill call, then ``max_new_tokens - 1`` one-token calls in a ``lax.fori_loop``. Traceable: jit a
    closure over the model and the settings, ``jax.jit(lambda p, ids, mask: greedy_generate(model, p, ids,
    mask, 16))`` (a transformers config is not hashable, so ``model`` cannot be a static argument).
    After a row emits an ``eos_token_id`` (int or sequence) it emits ``pad_token_id`` (default: the
    first eos id, else 0). ``apply_fn`` (default ``model.apply``) may be ``dj.adapt(model.apply, cfg)``
    to generate with an adapter in factored execution."""
    apply_fn = apply_fn or model.apply
    input_ids, buffer_mask, last = prompt_buffer(input_ids, attention_mask, max_new_tokens)
    b, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.n_positions:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"n_positions={model.config.n_positions}.")
    finish = token_finisher(eos_token_id, pad_token_id)
    variables = {"params": params}

    cache = init_cache(model.config, b, total)
    logits, cache = apply_fn(variables, input_ids, buffer_mask, mask_positions(buffer_mask, prompt_len, 0),
                             cache=cache, cache_index=0)
    tok = jnp.argmax(logits[jnp.arange(b), last], axis=-1)

    def body(i, carry):
        tok, done, out, cache, buffer_mask = carry
        tok, done, out = finish(tok, done, out, i)
        index = prompt_len + i
        buffer_mask = buffer_mask.at[:, index].set(1)
        logits, cache = apply_fn(variables, tok[:, None], buffer_mask, mask_positions(buffer_mask, 1, index),
                                 cache=cache, cache_index=index)
        return jnp.argmax(logits[:, 0], axis=-1), done, out, cache, buffer_mask

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    done = jnp.zeros((b,), bool)
    tok, done, out, _, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (tok, done, out, cache, buffer_mask))
    _, _, out = finish(tok, done, out, max_new_tokens - 1)
    return jnp.concatenate([input_ids, out], axis=1)


_COMPILED: dict = {}


def generate(model: GPT2LMHeadModel, params, input_ids, attention_mask=None, max_new_tokens: int = 20,
             eos_token_id=None, pad_token_id: Optional[int] = None, *, apply_fn: Optional[Callable] = None):
    """``greedy_generate`` under ``jax.jit``, compiled once per model object and settings (a transformers
    config is not hashable, so the compiled closures are kept here, holding their model)."""
    eos = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
    key = (id(model), max_new_tokens, eos, pad_token_id, apply_fn)
    if key not in _COMPILED:
        fn = jax.jit(lambda p, ids, mask: greedy_generate(model, p, ids, mask, max_new_tokens, eos, pad_token_id,
                                                          apply_fn=apply_fn))
        _COMPILED[key] = (model, fn)  # the model stays alive, so its id is not reused
    return _COMPILED[key][1](params, input_ids, attention_mask)


def _load_gpt2(folder: str, model, weights: dict) -> dict:
    """``model``'s params read from ``weights`` (``{PyTorch name: array}``), names mapped by
    ``models.names.ARCHS["gpt2"]``, with or without the ``transformer.`` prefix."""
    from flax.traverse_util import flatten_dict, unflatten_dict


    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = flatten_dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"])
    spec = get_arch("gpt2")
    out = {}
    for path, like in shapes.items():
        name, transpose = spec.torch_leaf(path)
        value = weights.get(name, weights.get(name[len("transformer."):]) if name.startswith("transformer.") else None)
        if value is None:
            raise ValueError(f"{folder}/model.safetensors: {name} is missing; save the model again with "
                             f"save_pretrained.")
        value = np.asarray(value, np.float32)
        # Conv1D weights are (d_in, d_out) in PyTorch and (d_out, d_in) here; score is an nn.Linear
        value = value.T if transpose else value
        if value.shape != like.shape:
            raise ValueError(f"{folder}/model.safetensors: {name} has shape {value.shape[::-1] if transpose else value.shape}, "
                             f"config.json needs {like.shape[::-1] if transpose else like.shape}.")
        out[path] = np.ascontiguousarray(value)
    return unflatten_dict(out)


def save_gpt2_lm(folder, config, params, tokenizer=None) -> None:
    """A Hugging Face ``GPT2LMHeadModel`` folder: config.json, PyTorch-format model.safetensors (the
    unrolled params, ``h/{i}``; the head tied to ``wte`` is not stored) and the tokenizer."""
    import copy
    from pathlib import Path


    config = copy.deepcopy(config)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(folder)
    atomic_save_safetensors(torch_state_dict(params, "gpt2"), Path(folder) / "model.safetensors",
                            metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_gpt2_classifier(folder: str):
    """``(model, params)`` from a transformers ``GPT2ForSequenceClassification`` folder (config.json and
    model.safetensors, or its shard index), names mapped by ``models.names.ARCHS["gpt2"]``."""
    from transformers import GPT2Config


    weights = read_torch_weights(folder)
    score = weights.get("score.weight")
    if score is None:
        raise ValueError(f"{folder}/model.safetensors holds no score.weight: it is not a GPT2ForSequenceClassification "
                         f"checkpoint.")
    config = GPT2Config.from_pretrained(folder)
    model = GPT2ForSequenceClassification(config, num_labels=int(score.shape[0]))
    return model, _load_gpt2(folder, model, weights)


def load_gpt2_lm(folder: str, *, scan_layers: bool = False, remat: bool = False, param_dtype="float32",
                 attention: str = "auto", attention_chunk: int = 512):
    """``(model, params)`` from a transformers ``GPT2LMHeadModel`` folder (config.json and model.safetensors,
    or its shard index; a bare ``GPT2Model`` folder too), names mapped by ``models.names.ARCHS["gpt2"]``.
    The head is tied to ``wte``: a stored ``lm_head.weight`` (the same matrix) is dropped; an untied one is
    refused. ``scan_layers`` returns the blocks stacked (``stack_blocks``), ``param_dtype`` the params cast
    (``bfloat16``: half the memory of a frozen base), ``remat`` a model that recomputes each block's
    activations in the backward pass; ``attention``, ``attention_chunk``: the attention implementation
    (``models.attention``)."""
    from transformers import GPT2Config


    weights = read_torch_weights(folder)
    if "score.weight" in weights:
        raise ValueError(f"{folder}/model.safetensors holds score.weight: it is a GPT2ForSequenceClassification "
                         f"checkpoint; load it with load_gpt2_classifier.")
    config = GPT2Config.from_pretrained(folder)
    head = weights.pop("lm_head.weight", None)
    wte = weights.get("transformer.wte.weight", weights.get("wte.weight"))
    if not getattr(config, "tie_word_embeddings", True) or (
            head is not None and wte is not None and not np.array_equal(np.asarray(head), np.asarray(wte))):
        raise ValueError(f"{folder}: the LM head is not tied to transformer.wte (tie_word_embeddings=false or a "
                         f"different lm_head.weight); decomp_jax's GPT-2 LM has a tied head only.")
    params = _load_gpt2(folder, GPT2LMHeadModel(config), weights)
    if jnp.dtype(param_dtype) != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    if scan_layers:
        params = stack_blocks(params)
    return GPT2LMHeadModel(config, scan_layers, remat, jnp.dtype(param_dtype), attention, attention_chunk), params
