"""Greedy generation with our Llama decoder's KV cache (``generate``, jitted), and the prompt-buffer setup and
per-token finish step that GPT-2's generator shares."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from decomp_jax.models.llama import LlamaForCausalLM, init_cache


def _eos_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (list, tuple)):
        return tuple(int(e) for e in eos_token_id)
    return (int(eos_token_id),)


def prompt_buffer(input_ids, attention_mask, max_new_tokens: int):
    """``(input_ids int32, buffer_mask (B, P + max_new_tokens), last (B,))`` of a greedy decoder: the prompt
    mask (all ones when None) followed by zeros for the new tokens, and each row's last real prompt token."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, prompt_len = input_ids.shape
    mask = jnp.ones((b, prompt_len), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    buffer_mask = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
    last = jnp.max(jnp.where(mask > 0, jnp.arange(prompt_len)[None], 0), axis=1)
    return input_ids, buffer_mask, last


def token_finisher(eos_token_id, pad_token_id: Optional[int]) -> Callable:
    """``finish(tok, done, out, i) -> (tok, done, out)``: a finished row emits the pad id (default: the
    first eos id, else 0), the token is written at column ``i``, and a row is done once it emits an eos id."""
    eos = _eos_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    def finish(tok, done, out, i):
        tok = jnp.where(done, pad, tok).astype(jnp.int32)
        out = out.at[:, i].set(tok)
        if eos:
            done = done | jnp.isin(tok, jnp.asarray(eos))
        return tok, done, out

    return finish


def greedy_generate(model: LlamaForCausalLM, params, input_ids, attention_mask=None, max_new_tokens: int = 20,
                    eos_token_id=None, pad_token_id: Optional[int] = None, *,
                    apply_fn: Optional[Callable] = None, use_cache: bool = True):
    """Greedy decoding: ``(B, P + max_new_tokens)`` int32, the prompt followed by the new tokens.

    Traceable (``jax.jit`` it with ``model, max_new_tokens, eos_token_id, pad_token_id, apply_fn,
    use_cache`` static, or use ``generate``, which does). Prompts may be left- or right-padded
    (``attention_mask``); the first new token follows each row's last real token. With the cache
    (default) it runs one prefill call and then ``max_new_tokens - 1`` one-token calls in a
    ``lax.fori_loop``; ``use_cache=False`` recomputes the whole buffer every step (a reference).
    After a row emits an ``eos_token_id`` (int or sequence) it emits ``pad_token_id`` (default: the
    first eos id, else 0), as HF ``generate`` does. ``apply_fn`` (default ``model.apply``) may be
    ``dj.adapt(model.apply, cfg)`` to generate with an adapter in factored execution.
    """
    apply_fn = apply_fn or model.apply
    input_ids, buffer_mask, last = prompt_buffer(input_ids, attention_mask, max_new_tokens)
    b, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    finish = token_finisher(eos_token_id, pad_token_id)
    variables = {"params": params}

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    done = jnp.zeros((b,), bool)
    rows = jnp.arange(b)
    if use_cache:
        cache = init_cache(model.config, b, total)
        logits, cache = apply_fn(variables, input_ids, buffer_mask, cache=cache, cache_index=0)
        tok = jnp.argmax(logits[rows, last], axis=-1)
        cross = _longrope_crossing(model.config, prompt_len, max_new_tokens)

        def body(i, carry):
            tok, done, out, cache, buffer_mask = carry
            tok, done, out = finish(tok, done, out, i)
            buffer_mask = buffer_mask.at[:, prompt_len + i].set(1)

            def one_token(cache):
                logits, cache = apply_fn(variables, tok[:, None], buffer_mask, cache=cache, cache_index=prompt_len + i)
                return logits[:, 0], cache

            def recompute(cache):  # the whole buffer again from an empty cache: every key rotated alike
                ids = jnp.concatenate([input_ids, out], axis=1)
                logits, cache = apply_fn(variables, ids, buffer_mask, cache=init_cache(model.config, b, total),
                                         cache_index=0)
                return logits[:, prompt_len + i], cache

            logits, cache = one_token(cache) if cross is None else jax.lax.cond(i == cross, recompute, one_token, cache)
            return jnp.argmax(logits, axis=-1), done, out, cache, buffer_mask

        tok, done, out, _, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (tok, done, out, cache, buffer_mask))
    else:
        eos = _eos_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        ids = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
        logits = apply_fn(variables, ids, buffer_mask)
        tok = jnp.argmax(logits[rows, last], axis=-1)

        def body(i, carry):
            tok, done, out, ids, buffer_mask = carry
            tok, done, out = finish(tok, done, out, i)
            ids = ids.at[:, prompt_len + i].set(tok)
            buffer_mask = buffer_mask.at[:, prompt_len + i].set(1)
            logits = apply_fn(variables, ids, buffer_mask)
            return jnp.argmax(logits[:, prompt_len + i], axis=-1), done, out, ids, buffer_mask

        tok, done, out, _, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (tok, done, out, ids, buffer_mask))
    _, _, out = finish(tok, done, out, max_new_tokens - 1)
    return jnp.concatenate([input_ids, out], axis=1)


def _longrope_crossing(config, prompt_len: int, max_new_tokens: int) -> Optional[int]:
    """The decoding step at which a Phi-3 longrope model's buffer first holds
    ``original_max_position_embeddings + 1`` tokens, when that happens after the prompt (else None). There,
    as transformers' Phi-3 does (its other longrope families do not), the whole buffer is computed again
    without the cache: the long factors then rotate every key, not only the ones after the switch."""
    if getattr(config, "rope_type", None) != "longrope" or getattr(config, "model_type", None) != "phi3":
        return None
    step = int(config.rope_scaling["original_max_position_embeddings"]) - prompt_len
    return step if 0 <= step < max_new_tokens - 1 else None


_generate_jit = jax.jit(
    greedy_generate, static_argnames=("model", "max_new_tokens", "eos_token_id", "pad_token_id", "apply_fn", "use_cache")
)


def generate(model: LlamaForCausalLM, params, input_ids, attention_mask=None, max_new_tokens: int = 20,
             eos_token_id=None, pad_token_id: Optional[int] = None, *, apply_fn: Optional[Callable] = None,
             use_cache: bool = True):
    """``greedy_generate`` under ``jax.jit`` (compiled once per model, length and settings)."""
    eos = _eos_ids(eos_token_id) or None
    return _generate_jit(model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad_token_id, apply_fn=apply_fn, use_cache=use_cache)
