"""The shared machinery of the decoder-LLM tasks: instruction-formatted training with the loss on
the response tokens only (length-bucketed batches), and evaluation by batched greedy decoding of each
test set, scored per set. A task subclass says where its data is and how an answer is scored."""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import numpy as np

from decomp_jax.core.execution import adapt
from decomp_jax.core.inject import merge, partition
from decomp_jax.core.methods import get
from decomp_jax.core.tree import combine, count_params
from decomp_jax.data import check_train_size, commonsense as cs, packing
from decomp_jax.models import generation, gpt2
from decomp_jax.models.attention import choose
from decomp_jax.models.llama import LlamaForCausalLM
from decomp_jax.models.mlp import load_balancing_loss, router_logits
from decomp_jax.parallel.distributed import is_primary, to_host
from decomp_jax.tasks.base import half_base_note, load_for, model_params
from decomp_jax.training.losses import response_nll_loss


class GenerationTask:
    """Data, model and jitted steps of a decoder-LLM fine-tune (the interface of ``GlueTask``).

    Subclasses define ``name``, ``load_train(cfg) -> [example]``, ``load_eval(cfg) -> {set: [example]}``
    (examples with ``instruction``, ``input``, ``output``, ``answer``), ``score(set, texts, examples) ->
    {metric: value}`` (``accuracy`` at least), and the classmethods ``eval_sets(data_cfg)`` and
    ``check(data_cfg)`` (raises ``ConfigError``). The primary metric is the mean accuracy over sets.
    """

    name = "generation"
    primary_metric = "accuracy"
    per_set_metrics: tuple[str, ...] = ("accuracy", "answered")

    def __init__(self, cfg, need_train: bool = True):
        d, tc = cfg.data, cfg.train
        self.cfg = cfg
        # data first: a wrong path fails before the model is loaded
        train = self.load_train(cfg) if need_train else None
        if need_train:
            check_train_size(len(train), cfg)
            note = half_base_note(cfg)
            if note and is_primary():
                print(note, flush=True)
        self.eval_examples = self.load_eval(cfg)
        self.model, self.base_params, tokenizer = load_for(cfg)
        self.tokenizer = cs.as_tokenizer(tokenizer)
        self.buckets = cs.default_buckets(d.max_length, d.bucket_multiple)
        train_length = d.train_max_length or d.max_length
        self.train_set = cs.tokenize_train(train, self.tokenizer, train_length, template=d.template) if need_train else None
        self.pack_length = d.pack_length or train_length
        self.packed_rows = packing.pack_rows(self.train_set, self.pack_length, tc.seed) if d.packing and need_train else None
        if self.packed_rows is not None and is_primary():
            padded = packing.padding_fraction(self.train_set, tc.batch_size, self.buckets)
            packed = packing.padding_fraction(self.train_set, tc.batch_size, packed_rows=self.packed_rows,
                                              length=self.pack_length)
            print(f"packing: {len(self.train_set.ids)} examples in {len(self.packed_rows)} rows of {self.pack_length} "
                  f"tokens; padding {packed:.1%} of the tokens (padded batches: {padded:.1%})", flush=True)
        self.eval_prompts = {n: cs.tokenize_prompts(ex, self.tokenizer, d.max_length, template=d.template)
                             for n, ex in self.eval_examples.items()}
        self.base_params, params = model_params(self.base_params, cfg, jax.random.PRNGKey(tc.seed))
        self.trainable, self.buffers, self.frozen = partition(params, cfg.adapter)
        self.apply = adapt(self.model.apply, cfg.adapter, mode=tc.mode)
        self.last_eval: dict[str, Any] = {}

    # --- what a task defines ---------------------------------------------------------------------------

    def load_train(self, cfg) -> list:
        raise NotImplementedError

    def load_eval(self, cfg) -> dict[str, list]:
        raise NotImplementedError

    def score(self, name: str, texts: list[str], examples: list) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def eval_sets(cls, data_cfg) -> list[str]:
        raise NotImplementedError

    @classmethod
    def check(cls, data_cfg) -> None:
        cls.eval_sets(data_cfg)

    @classmethod
    def metric_names(cls, data_cfg) -> list[str]:
        return ["accuracy"] + [f"{n}_{m}" for n in cls.eval_sets(data_cfg) for m in cls.per_set_metrics]

    # --- shared -----------------------------------------------------------------------------------------

    @property
    def backbone_params(self) -> int:
        return count_params(self.base_params)

    @property
    def num_train(self) -> int:
        """Training rows per epoch: examples, or packed rows (``data.packing``)."""
        return len(self.train_set.ids) if self.packed_rows is None else len(self.packed_rows)

    def train_batch(self, micro: int, rows: Optional[slice] = None) -> dict:
        tc = self.cfg.train
        keys = ("input_ids", "attention_mask", "weights", "loss_index", "loss_targets", "loss_weights")
        if self.packed_rows is not None:
            b = packing.packed_batch(self.train_set, self.packed_rows, micro, tc.batch_size, self.pack_length, tc.seed,
                                     rows=rows)
            return {k: b[k] for k in keys + ("segment_ids",)}
        b = cs.train_batch(self.train_set, micro, tc.batch_size, tc.seed, self.buckets, rows=rows)
        return {k: b[k] for k in keys}

    @property
    def router_aux_loss(self) -> float:
        """The weight of the router's load-balancing loss: ``train.router_aux_loss``, or the model's own
        (``router_aux_loss_coef`` when its config sets ``output_router_logits``); 0 without experts."""
        config = getattr(self.model, "config", None)
        if not getattr(config, "num_experts", 0):
            return 0.0
        if self.cfg.train.router_aux_loss is not None:
            return float(self.cfg.train.router_aux_loss)
        return float(config.router_aux_loss_coef) if config.output_router_logits else 0.0

    def _model_mask(self, batch):
        """The attention mask the loss gives the model: the batch's, or None where our Llama runs ``cudnn``
        attention on rows without packed segments. Training rows are padded on the right, so the causal mask
        alone is exact at every real token (a real token never sees a later position), and without a mask
        the model hands cuDNN its own causal mask instead of the mask as an additive bias
        (``models.attention.Mask.plain``). Only the padding positions' outputs differ, and nothing reads them."""
        model = self.model
        if "segment_ids" in batch or not isinstance(model, LlamaForCausalLM):
            return batch["attention_mask"]
        length = batch["input_ids"].shape[1]
        c = model.config
        on_cudnn = choose(c.attention, length, length, c.compute_dtype, c.attn_logit_softcapping) == "cudnn"
        return None if on_cudnn else batch["attention_mask"]

    def loss(self, params, batch, rng):
        """The causal-LM loss on the response tokens, with logits computed at those positions only
        (``train.loss_chunk`` of them at a time); with experts, plus ``router_aux_loss`` times the routers'
        load-balancing loss over the batch's tokens (reported as ``router_aux``)."""
        call = dict(logits_at=batch["loss_index"], targets=batch["loss_targets"], chunk=self.cfg.train.loss_chunk,
                    rngs={"dropout": rng})
        if "segment_ids" in batch:  # packed rows (data.packing)
            call["segment_ids"] = batch["segment_ids"]
        weight, mask = self.router_aux_loss, self._model_mask(batch)
        if not weight:
            nll = self.apply({"params": params}, batch["input_ids"], mask, **call)
            return response_nll_loss(nll, batch), {}
        nll, state = self.apply({"params": params}, batch["input_ids"], mask, mutable=["intermediates"], **call)
        aux = load_balancing_loss(router_logits(state["intermediates"]), self.model.config.num_experts_per_tok,
                                  batch["attention_mask"])
        return response_nll_loss(nll, batch) + weight * aux, {"router_aux": aux}

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

        generate = gpt2.generate if isinstance(self.model, gpt2.GPT2LMHeadModel) else generation.generate
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
        """Per set ``<set>_<metric>`` and the mean ``accuracy``. Decoding speed (questions per second,
        compiles included) goes to ``self.last_eval`` and is printed, not into the metrics (which must
        be reproducible)."""
        params = combine(trainable, self.buffers if buffers is None else buffers, self.frozen)
        params, apply_fn = self.generation_fn(params)  # merged once for every set
        metrics, generations, speed = {}, {}, {}
        for name, examples in self.eval_examples.items():
            start = time.perf_counter()
            texts = self.generate(params, apply_fn, self.eval_prompts[name])
            speed[name] = len(texts) / max(time.perf_counter() - start, 1e-9)
            generations[name] = texts
            for metric, value in self.score(name, texts, examples).items():
                metrics[f"{name}_{metric}"] = value
        metrics["accuracy"] = float(np.mean([metrics[f"{n}_accuracy"] for n in self.eval_examples]))
        self.last_eval = {"questions_per_s": speed}
        if is_primary():
            print("decoded " + ", ".join(f"{n} {len(self.eval_examples[n])} q at {v:.1f} q/s" for n, v in speed.items()),
                  flush=True)
        return (metrics, generations) if return_generations else metrics
