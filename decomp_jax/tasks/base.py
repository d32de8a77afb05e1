"""What every task shares: the experiment's model loaded (``load_for``) and its adapter injected
(``model_params``, over a quantized base when the config asks), and the names of the decoder-LLM tasks."""

from __future__ import annotations

from typing import Optional

import jax

from decomp_jax.core.inject import inject, inject_quantized
from decomp_jax.models.causal_lm import load_causal_lm
from decomp_jax.quant import default_block_size

LM_TASK_NAMES = ("commonsense", "math")  # every other data.task is a GLUE task
"""The ``data.task`` names of the decoder-LLM tasks (commonsense, math); every other ``data.task`` is a GLUE task."""


def model_params(base, cfg, key) -> tuple:
    """``(base, adapted params)`` of an experiment (``cfg``: an ``ExperimentConfig``): ``cfg.adapter``
    injected into ``base``, over the quantized base (returned as the base) when ``cfg.model.quantize`` is set."""
    m = cfg.model
    if not m.quantize:
        return base, inject(base, cfg.adapter, key)
    return inject_quantized(base, cfg.adapter, key, m.quantize,
                            block_size=m.quantize_block_size or default_block_size(m.quantize),
                            double_quant=m.double_quant)


def load_for(cfg):
    """``load_causal_lm`` with an experiment config's model and train settings (``model.quantize: q4_1``
    with the default block size keeps a GGUF file's Q4_1 blocks)."""
    m = cfg.model
    keep = m.quantize == "q4_1" and m.quantize_block_size in (None, default_block_size("q4_1"))
    return load_causal_lm(m.name, m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=cfg.train.remat,
                          keep_quantized=keep, moe_dispatch=m.moe_dispatch, attention=m.attention,
                          attention_chunk=m.attention_chunk, mlp_chunk=m.mlp_chunk,
                          remat_segments=cfg.train.remat_segments)


def half_base_note(cfg, platform: Optional[str] = None) -> Optional[str]:
    """A note for a training run that stores the base in half precision on a CPU (``platform``: JAX's
    default backend unless given) where that holds more memory, not less: XLA:CPU computes in float32 and
    keeps float32 copies of the kernels beside the half-precision base, except for a float16 base under
    ``model.scan_layers`` (converted one layer at a time). None elsewhere."""
    m = cfg.model
    if m.param_dtype == "float32" or (platform or jax.default_backend()) != "cpu":
        return None
    if m.param_dtype == "float16" and m.scan_layers:
        return None
    return (f"note: model.param_dtype={m.param_dtype}{'' if m.scan_layers else ' without model.scan_layers'} on a CPU: "
            f"XLA:CPU computes in float32 and keeps float32 copies of the kernels beside the {m.param_dtype} base, so "
            f"a step needs more memory than with param_dtype=float32. On a CPU, param_dtype=float16 with "
            f"model.scan_layers=true halves the base; bfloat16 pays on GPUs and TPUs.")
