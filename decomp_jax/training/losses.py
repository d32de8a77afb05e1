"""The task losses, pure JAX functions returning a scalar: ``classification_loss`` (softmax
cross-entropy) and ``regression_loss`` (squared error) for encoder heads, optionally weighted per
example; the causal-LM losses of the decoder tasks: ``causal_lm_loss`` (next-token cross-entropy over
the loss-masked tokens of full logits), ``response_loss`` (the same from the logits at the scored
positions only) and ``response_nll_loss`` (the same from per-token negative log-likelihoods)."""

from __future__ import annotations
from typing import Any, Mapping, Optional
import jax
import jax.numpy as jnp
import optax


def classification_loss(logits: jax.Array, labels: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
    """Mean softmax cross-entropy (weighted when ``weights`` is given)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return _weighted_mean(losses, weights)


def regression_loss(predictions: jax.Array, targets: jax.Array, weights: Optional[jax.Array] = None) -> jax.Array:
    """Mean squared error of a single-output head."""
    losses = jnp.square(predictions.reshape(targets.shape).astype(jnp.float32) - targets)
    return _weighted_mean(losses, weights)


def _weighted_mean(values, weights):
    if weights is None:
        return jnp.mean(values)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def causal_lm_loss(logits: Any, batch: Mapping[str, Any]) -> Any:
    """Mean next-token cross-entropy over the loss-masked tokens, in float32 (JAX).

    ``logits`` ``(B, L, V)`` are the model outputs for ``batch["input_ids"]`` ``(B, L)``;
    ``logits[:, t]`` predicts token ``t+1``, scored where ``batch["loss_mask"][:, t+1]`` is 1
    (times ``batch["weights"][b]`` when present). The mean is over all scored tokens of the batch
    (token-level, as Hugging Face's causal-LM loss); 0 when none are scored.
    """
    import jax.numpy as jnp

    logits = jnp.asarray(logits, jnp.float32)[:, :-1]
    targets = jnp.asarray(batch["input_ids"], jnp.int32)[:, 1:]
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:]
    if "weights" in batch:
        mask = mask * jnp.asarray(batch["weights"], jnp.float32)[:, None]
    return _masked_nll(logits, targets, mask)


def _masked_nll(logits, targets, mask):
    import jax
    import jax.numpy as jnp

    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return _masked_mean(log_z - picked, mask)


def _masked_mean(values, mask):
    import jax.numpy as jnp

    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _response_mask(batch: Mapping[str, Any]) -> Any:
    import jax.numpy as jnp

    mask = jnp.asarray(batch["loss_weights"], jnp.float32)
    if "weights" in batch:
        mask = mask * jnp.asarray(batch["weights"], jnp.float32)[:, None]
    return mask


def response_loss(logits: Any, batch: Mapping[str, Any]) -> Any:
    """``causal_lm_loss`` from the logits at the scored positions only: ``logits`` ``(B, R, V)`` are
    the model's outputs at ``batch["loss_index"]`` (``LlamaForCausalLM(..., logits_at=batch["loss_index"])``),
    scored against ``loss_targets`` where ``loss_weights`` (times ``weights``) is 1. Equal to
    ``causal_lm_loss`` of the full logits; the head's matmul and the log-softmax run on ``R`` positions
    instead of ``L``."""
    import jax.numpy as jnp

    return _masked_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(batch["loss_targets"], jnp.int32),
                       _response_mask(batch))


def response_nll_loss(nll: Any, batch: Mapping[str, Any]) -> Any:
    """``response_loss`` from the per-token negative log-likelihoods ``(B, R)`` the model returns with
    ``logits_at=batch["loss_index"], targets=batch["loss_targets"]`` (optionally ``chunk=``: the
    logits are never held whole)."""
    import jax.numpy as jnp

    return _masked_mean(jnp.asarray(nll, jnp.float32), _response_mask(batch))
