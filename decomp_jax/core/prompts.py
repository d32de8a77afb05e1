"""Execution of the prompt methods (``prompt_tuning``, ``prefix_tuning``) on our Flax Llama.

    cfg = dj.AdapterConfig(method="prompt_tuning", options={"num_virtual_tokens": 20, "init": "random"})
    params = dj.inject(base, cfg, key)           # + params["prompt_tuning"]["embedding"] (n, hidden)
    apply = dj.adapt(model.apply, cfg)           # same signature as model.apply
    logits = apply({"params": params}, ids, mask)                # (B, L, vocab): real tokens only
    out = generate(model, params, ids, mask, 16, apply_fn=apply)  # KV cache included

``adapt(model.apply, cfg)`` (``model`` a ``decomp_jax.models.llama.LlamaForCausalLM``) returns an
apply with the model's signature that reads the method's subtree ``params[cfg.method]`` (the rest
is the frozen model) and:

- ``prompt_tuning``: prepends the n virtual-token embeddings to the input embeddings, extends the
  attention mask with n ones and returns the logits of the real positions only. With ``cache=``
  (``greedy_generate``'s prefill and decoding calls) the cache buffer holds the real tokens only,
  as for the base model (``p_tuning``: the same, with the virtual tokens computed by its prompt
  encoder in each call): the virtual tokens' per-layer keys/values (which depend on the virtual
  tokens alone: they come first and attention is causal) are computed in the same call and given
  to the model as ``prefix_kv``. Same maths as the concatenation, so generation with the cache
  equals recomputation without it; the price is n extra tokens (batch 1) per decoding call.
- ``prefix_tuning``: passes the per-layer ``key``/``value`` (num_layers, P, kv_heads * head_dim),
  reshaped to ``(num_layers, 1, P, kv_heads, head_dim)``, as ``prefix_kv``: every query attends to
  the P slots, used as given (no rotary), as PEFT. Works with the cache unchanged.

Positions (both methods, as PEFT on HF Llama): the real tokens come after the n / P virtual slots,
``position = n + cumsum(attention_mask) - 1`` (padding: 1, never attended); explicit
``position_ids`` number the real tokens from 0 and are shifted by n / P. The virtual tokens of
prompt tuning take positions ``0 .. n-1``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.core import unfreeze

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.methods import get
from decomp_jax.core.methods.prompt import llama_dims, p_tuning_embeddings
from decomp_jax.errors import ConfigError
from decomp_jax.models.llama import LlamaForCausalLM, init_cache, mask_positions, resolve_mask

_ARG_NAMES = ("input_ids", "attention_mask", "position_ids")


def _llama_model(apply_fn, cfg: AdapterConfig):
    model = getattr(apply_fn, "__self__", None)
    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(
            f"Method {cfg.method!r} runs on decomp_jax.models.llama.LlamaForCausalLM only: pass its bound "
            f"model.apply to adapt (got {getattr(apply_fn, '__qualname__', apply_fn)!r})."
        )
    return model


def _check_leaves(leaves, cfg: AdapterConfig):
    if leaves is None:
        raise ConfigError(
            f"The params hold no {cfg.method!r} subtree: pass the params dj.inject(base, cfg, key) returned."
        )


def _project(leaves: dict, layers: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's PrefixEncoder with projection: ``tanh(E W1 + b1) W2 + b2`` (P, 2 * layers * kv_dim),
    read as (P, layers, key|value, kv_dim); returns keys, values ``(layers, P, kv_dim)``."""
    h = jnp.tanh(leaves["embedding"] @ leaves["dense_in"]["kernel"] + leaves["dense_in"]["bias"])
    out = h @ leaves["dense_out"]["kernel"] + leaves["dense_out"]["bias"]
    out = out.reshape(out.shape[0], layers, 2, -1).transpose(1, 2, 0, 3)  # (layers, 2, P, kv_dim)
    return out[:, 0], out[:, 1]


def prefix_arrays(leaves: dict, config) -> tuple[jax.Array, jax.Array]:
    """``(keys, values)``, each ``(num_layers, 1, P, kv_heads, head_dim)``, from prefix tuning's
    leaves: plain ``key``/``value`` or PEFT's reparameterisation (``embedding`` -> MLP)."""
    layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    keys, values = (leaves["key"], leaves["value"]) if "key" in leaves else _project(leaves, layers)
    if keys.shape[0] != layers or keys.shape[-1] != kv * hd:
        raise ConfigError(
            f"prefix_tuning leaves of shape {tuple(keys.shape)} do not fit this model: expected "
            f"({layers}, P, {kv * hd}) (num_layers, P, kv_heads * head_dim)."
        )
    shape = (layers, 1, keys.shape[1], kv, hd)
    return keys.reshape(shape), values.reshape(shape)


def fold_prefix(params, cfg: AdapterConfig):
    """Prefix tuning with ``prefix_projection``: the params with the MLP replaced by its output, the
    plain ``key``/``value`` leaves (what matters at inference; ``adapt`` runs either form)."""
    leaves = unfreeze(params).get("prefix_tuning")
    _check_leaves(leaves, cfg)
    if "key" in leaves:
        return params
    keys, values = _project(leaves, llama_dims(params, cfg.method)["num_layers"])
    return {**unfreeze(params), "prefix_tuning": {"key": keys, "value": values}}


def adapt_prompt(apply_fn: Callable[..., Any], cfg: AdapterConfig) -> Callable[..., Any]:
    """``adapt`` for the prompt methods (see the module docstring)."""
    model = _llama_model(apply_fn, cfg)
    config = model.config
    name = cfg.method
    if get(name).kind != "prompt":
        raise ConfigError(f"adapt_prompt handles prompt methods, not {name!r}; use dj.adapt.")

    @functools.wraps(apply_fn)
    def prompt_apply(variables, *args, **kwargs):
        variables = dict(unfreeze(variables))
        params = dict(variables.get("params", {}))
        leaves = params.pop(name, None)
        variables["params"] = params
        if kwargs.get("method") is not None:  # model.embed and friends: the base model's
            return apply_fn(variables, *args, **kwargs)
        _check_leaves(leaves, cfg)
        if len(args) > len(_ARG_NAMES):
            raise TypeError(f"{name} apply takes at most {len(_ARG_NAMES)} positional arguments after the variables.")
        call = dict(zip(_ARG_NAMES, args))
        for arg in _ARG_NAMES:
            if arg in kwargs:
                if arg in call:
                    raise TypeError(f"got multiple values for argument {arg!r}")
                call[arg] = kwargs.pop(arg)
        ids, mask, positions = (call.get(a) for a in _ARG_NAMES)
        embeds = kwargs.pop("inputs_embeds", None)
        cache = kwargs.pop("cache", None)
        cache_index = kwargs.pop("cache_index", None)
        if kwargs.pop("prefix_kv", None) is not None:
            raise ConfigError(f"{name} sets prefix_kv itself; do not pass one.")
        source = embeds if embeds is not None else ids
        if source is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        b, length = source.shape[:2]
        unmasked = mask is None and cache is None  # no padding: the model may take its mask as plain causal
        mask, cache_index, _ = resolve_mask(b, length, mask, cache, cache_index)

        if name == "prefix_tuning":
            prefix = prefix_arrays(leaves, config)
            shift = prefix[0].shape[2]
            positions = mask_positions(mask, length, cache_index, shift) if positions is None else positions + shift
            return apply_fn(variables, ids, mask, positions, inputs_embeds=embeds, cache=cache,
                            cache_index=cache_index, prefix_kv=prefix, **kwargs)

        # prompt_tuning, p_tuning
        virtual = p_tuning_embeddings(leaves) if name == "p_tuning" else leaves["embedding"]
        n = virtual.shape[0]
        if embeds is None:
            embeds = apply_fn(variables, ids, method=LlamaForCausalLM.embed)
        virtual = virtual.astype(embeds.dtype)
        positions = mask_positions(mask, length, cache_index, n) if positions is None else positions + n
        if cache is None:  # one sequence: [virtual; real]
            x = jnp.concatenate([jnp.broadcast_to(virtual[None], (b,) + virtual.shape), embeds], axis=1)
            full_mask = None if unmasked else jnp.concatenate([jnp.ones((b, n), mask.dtype), mask], axis=1)
            full_positions = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)), positions], axis=1)
            if kwargs.get("logits_at") is not None:  # positions of the real tokens: after the virtual ones
                return apply_fn(variables, None, full_mask, full_positions, inputs_embeds=x,
                                **{**kwargs, "logits_at": jnp.asarray(kwargs["logits_at"]) + n})
            logits = apply_fn(variables, None, full_mask, full_positions, inputs_embeds=x, **kwargs)
            return logits[:, n:]
        # with a cache: the virtual tokens' keys/values (a function of the virtual tokens alone) as prefix_kv
        dtype = cache[0]["key"].dtype
        _, virtual_cache = apply_fn(variables, None, jnp.ones((1, n), jnp.int32), inputs_embeds=virtual[None],
                                    cache=init_cache(config, 1, n, dtype), cache_index=0, **kwargs)
        prefix = (jnp.stack([c["key"] for c in virtual_cache]), jnp.stack([c["value"] for c in virtual_cache]))
        return apply_fn(variables, ids, mask, positions, inputs_embeds=embeds, cache=cache,
                        cache_index=cache_index, prefix_kv=prefix, **kwargs)

    return prompt_apply


__all__ = ["adapt_prompt", "fold_prefix", "prefix_arrays"]
