"""The decoder's feed-forward blocks: the gated MLP of every family, and the sparse mixture of experts
(Mixtral, Qwen2-MoE, Qwen3-MoE) with its router and load-balancing loss.

A mixture-of-experts layer's parameters (Flax layout, ``E`` experts of width ``I``):

    mlp/gate/kernel                        (hidden, E)      the router, an nn.Dense
    mlp/experts/gate_up_proj/kernel        (E, hidden, 2I)  gate | up, as transformers 5 fuses them
    mlp/experts/down_proj/kernel           (E, I, hidden)
    mlp/shared_expert/{gate,up,down}_proj  Qwen2-MoE: a dense gated MLP on every token ...
    mlp/shared_expert_gate/kernel          (hidden, 1)      ... scaled by sigmoid(x @ this)

Each expert projection is an ``ExpertDense``: ``E`` stacked ``(d_in, d_out)`` kernels, a layer the adapter
core adapts with one factor set per expert (``decomp_jax.core.execution`` runs the method per expert).
The router: softmax in float32 over all experts, the top ``num_experts_per_tok`` kept (renormalised with
``norm_topk_prob``), their weights cast back to the hidden dtype, as transformers computes it. The
router's logits are sown into the ``intermediates`` collection (``router_logits``) for
``load_balancing_loss``.

Dispatch (``LlamaConfig.moe_dispatch``): ``dense`` runs every expert on every token and weighs the
outputs by the router (zero for the experts not picked): exact and simple, ``E / k`` times the work of
the picked experts, for tests and small models. ``ragged`` sorts the ``(token, pick)`` pairs by expert
and runs each projection as one grouped matmul (``jax.lax.ragged_dot``, native on GPUs and TPUs; on CPU
XLA computes it densely): the work of the picked experts only.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from decomp_jax.models.llama_config import ACTIVATIONS, LlamaConfig
from decomp_jax.models.tiles import in_position_tiles, in_row_tiles

ROUTER_LOGITS = "router_logits"


def dense(config: LlamaConfig, features: int, bias: bool, name: Optional[str] = None) -> nn.Dense:
    """The decoder's ``nn.Dense``: compute dtype, parameter dtype and init of ``config``."""
    return nn.Dense(features, use_bias=bias, dtype=config.compute_dtype, param_dtype=jnp.dtype(config.param_dtype),
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def gated(config: LlamaConfig, gate, up):
    return ACTIVATIONS[config.hidden_act](gate) * up


class LlamaMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` of width ``intermediate_size`` (default: the config's); with the
    config's ``mlp_chunk``, ``mlp_chunk`` positions of every row at a time (``models.tiles``: the backward
    pass then holds one tile's ``(tokens, width)`` activations, not the whole rows')."""

    config: LlamaConfig
    intermediate_size: Optional[int] = None

    def setup(self):
        c = self.config
        width = self.intermediate_size or c.intermediate_size
        if c.fused_projections:
            self.gate_up_proj = dense(c, 2 * width, c.mlp_bias)
        else:
            self.gate_proj = dense(c, width, c.mlp_bias)
            self.up_proj = dense(c, width, c.mlp_bias)
        self.down_proj = dense(c, c.hidden_size, c.mlp_bias)

    def rows(self, x):
        """The MLP on rows ``x (N, hidden)``; ``act(gate) * up``, gate and up from one ``gate_up_proj``
        kernel (gate first) with ``fused_projections``."""
        if self.config.fused_projections:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(gated(self.config, gate, up))

    def __call__(self, x):
        """On ``x (..., hidden)`` flattened to 2-D: with 3-D ``(batch, length, hidden)`` operands XLA:CPU
        writes the backward's gradients through transposing copies (measured on SmolLM2's MLP, forward +
        backward: full fine-tuning 114 -> 85 ms, LoRA 119 -> 59 ms per layer). With ``mlp_chunk`` a 3-D
        ``x`` is tiled along its positions (each tile: ``mlp_chunk`` positions of every row, so a batch
        split over devices stays split), a 2-D one (a mixture's tokens) along its rows."""
        tile = self.config.mlp_chunk
        if not tile or x.shape[-2] <= tile:
            return self._flat(x)
        if x.ndim == 2:
            return in_row_tiles(self, LlamaMLP.rows, (x,), tile)
        return in_position_tiles(self, LlamaMLP._flat, (x,), tile)

    def _flat(self, x):
        return self.rows(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (-1,))


class ExpertDense(nn.Module):
    """``E`` stacked dense layers, ``kernel (E, d_in, d_out)``, no bias. Called with ``x (E, N, d_in)``
    (each expert's own rows) it returns ``(E, N, d_out)``; called with rows sorted by expert ``x (M, d_in)``
    and ``group_sizes (E,)`` (rows per expert, summing to ``M``) it returns ``(M, d_out)``."""

    num_experts: int
    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x, group_sizes=None):
        kernel = self.param("kernel", self.kernel_init, (self.num_experts, x.shape[-1], self.features),
                            self.param_dtype)
        x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
        if group_sizes is None:
            return jnp.einsum("end,edf->enf", x, kernel)
        return jax.lax.ragged_dot(x, kernel, group_sizes)


def _experts(config: LlamaConfig, features: int, name: str) -> ExpertDense:
    return ExpertDense(config.num_experts, features, config.compute_dtype, jnp.dtype(config.param_dtype),
                       nn.initializers.normal(config.initializer_range), name=name)


def route(config: LlamaConfig, logits):
    """``(weights (T, k), experts (T, k))``: softmax in float32 over the router ``logits (T, E)``, the top
    ``num_experts_per_tok`` (renormalised with ``norm_topk_prob``), weights in the logits' dtype."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits.dtype), experts


class MoeExperts(nn.Module):
    """The experts' gated MLPs, ``experts/gate_up_proj`` and ``experts/down_proj``, on tokens ``x (T, H)``
    with the router's picks; returns ``sum_k weight_k * expert_k(x)`` per token."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, weights, experts):
        c = self.config
        n, width = c.num_experts, c.moe_intermediate_size
        gate_up = _experts(c, 2 * width, "gate_up_proj")
        down = _experts(c, c.hidden_size, "down_proj")
        if c.moe_dispatch == "dense":  # every expert on every token, weighed by the router
            combine = jnp.zeros((x.shape[0], n), weights.dtype).at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
            gate, up = jnp.split(gate_up(jnp.broadcast_to(x, (n,) + x.shape)), 2, axis=-1)
            y = down(gated(c, gate, up))  # (E, T, H)
            return jnp.einsum("te,eth->th", combine.astype(y.dtype), y)
        k = experts.shape[-1]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # (token, pick) pairs grouped by expert
        rows = order // k
        sizes = jnp.bincount(flat, length=n).astype(jnp.int32)
        gate, up = jnp.split(gate_up(x[rows], sizes), 2, axis=-1)
        y = down(gated(c, gate, up), sizes)
        y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
        return jnp.zeros((x.shape[0], y.shape[-1]), y.dtype).at[rows].add(y)


class SparseMoeBlock(nn.Module):
    """The mixture-of-experts feed-forward block on ``x (..., hidden)``; the router's logits are sown as
    ``intermediates/.../router_logits`` (read them with ``apply(..., mutable=["intermediates"])``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        logits = dense(c, c.num_experts, False, "gate")(x)
        self.sow("intermediates", ROUTER_LOGITS, logits)
        weights, experts = route(c, logits)
        out = MoeExperts(c, name="experts")(x, weights, experts)
        if c.shared_expert_intermediate_size:
            shared = LlamaMLP(c, c.shared_expert_intermediate_size, name="shared_expert")(x)
            out = out + jax.nn.sigmoid(dense(c, 1, False, "shared_expert_gate")(x)) * shared
        return out.reshape(lead + (-1,))


def feed_forward(config: LlamaConfig, sparse: bool) -> nn.Module:
    """Layer ``mlp`` of a decoder layer: the experts where ``sparse``, else the dense MLP."""
    return SparseMoeBlock(config, name="mlp") if sparse else LlamaMLP(config, name="mlp")


def router_logits(intermediates) -> list:
    """Every router's logits sown in ``intermediates`` (the ``intermediates`` collection of a call with
    ``mutable=["intermediates"]``): a list of ``(..., tokens, E)`` arrays (scanned layers: a leading layer axis)."""
    found = []

    def walk(tree):
        for key, value in tree.items():
            if key == ROUTER_LOGITS:
                found.extend(value)
            elif hasattr(value, "items"):
                walk(value)

    walk(intermediates)
    return found


def load_balancing_loss(logits: list, top_k: int, attention_mask=None):
    """The router's load-balancing loss of Switch/Mixtral as transformers computes it: over the tokens of
    every MoE layer together, ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of picks (summed over the
    ``top_k`` slots) that went to expert ``e`` and ``P_e`` its mean router probability. ``logits``: as
    ``router_logits`` returns them, each ``(..., B * L, E)``; ``attention_mask (B, L)`` leaves padding out.
    Differentiable through ``P`` only."""
    rows = jnp.concatenate([jnp.reshape(g, (-1, g.shape[-1])) for g in logits]).astype(jnp.float32)
    n = rows.shape[-1]
    probs = jax.nn.softmax(rows, axis=-1)
    _, picked = jax.lax.top_k(probs, top_k)
    picks = jax.nn.one_hot(picked, n, dtype=jnp.float32)  # (rows, k, E)
    if attention_mask is None:
        weight = jnp.ones((rows.shape[0],), jnp.float32)
    else:
        mask = jnp.reshape(attention_mask, (-1,)).astype(jnp.float32)
        weight = jnp.tile(mask, rows.shape[0] // mask.shape[0])
    total = jnp.sum(weight)
    fraction = jnp.einsum("r,rke->ke", weight, jax.lax.stop_gradient(picks)) / total
    mean_prob = jnp.einsum("r,re->e", weight, probs) / total
    return n * jnp.sum(fraction * mean_prob[None, :])


# --- the experts' tensors under their Hugging Face names ---------------------------------------------------

def fuse_expert_tensors(tensors: dict, config: LlamaConfig) -> dict:
    """``tensors`` (HF names) with each MoE layer's per-expert tensors (``block_sparse_moe.experts.{e}.w1/w3/w2``
    of Mixtral, ``mlp.experts.{e}.{gate,up,down}_proj`` of Qwen-MoE) fused into transformers 5's stacked
    ``mlp.experts.gate_up_proj (E, 2I, H)`` and ``mlp.experts.down_proj (E, H, I)``, and Mixtral's
    ``block_sparse_moe`` written ``mlp``. Tensors already stacked pass unchanged."""
    if not config.num_experts:
        return tensors
    out = {}
    per_expert: dict[tuple, dict] = {}
    for name, value in tensors.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        parts = name.split(".")
        if len(parts) == 8 and parts[3:5] == ["mlp", "experts"] and parts[5].isdigit() and parts[7] == "weight":
            role = {"w1": "gate", "w3": "up", "w2": "down"}.get(parts[6], parts[6].replace("_proj", ""))
            per_expert.setdefault((".".join(parts[:5]), role), {})[int(parts[5])] = value
        else:
            out[name] = value
    for (prefix, role), experts in per_expert.items():
        if sorted(experts) != list(range(config.num_experts)):
            raise ValueError(f"{prefix}: the checkpoint has experts {sorted(experts)} of {role}_proj, expected "
                             f"0..{config.num_experts - 1} (num_experts = {config.num_experts}).")
    for (prefix, role), experts in sorted(per_expert.items()):
        stacked = np.stack([np.asarray(experts[e]) for e in range(config.num_experts)])
        if role == "down":
            out[f"{prefix}.down_proj"] = stacked
        elif role == "gate":
            up = per_expert.get((prefix, "up"))
            if up is None:
                raise ValueError(f"{prefix}: the checkpoint has gate projections of the experts but no up projections.")
            out[f"{prefix}.gate_up_proj"] = np.concatenate(
                [stacked, np.stack([np.asarray(up[e]) for e in range(config.num_experts)])], axis=1)
    return out


def split_expert_tensors(tensors: dict, config: LlamaConfig) -> dict:
    """Inverse of ``fuse_expert_tensors``: per-expert tensors under the family's hub names (which
    transformers 4 and 5 both load)."""
    out = {}
    mixtral = config.model_type == "mixtral"
    for name, value in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if not prefix.endswith(".mlp.experts") or leaf not in ("gate_up_proj", "down_proj"):
            if mixtral and name.endswith(".mlp.gate.weight"):
                name = name.replace(".mlp.", ".block_sparse_moe.")
            out[name] = value
            continue
        base = prefix.replace(".mlp.", ".block_sparse_moe.") if mixtral else prefix
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(value.shape[0]):
            if leaf == "down_proj":
                out[f"{base}.{e}.{names[2]}.weight"] = np.ascontiguousarray(value[e])
            else:
                gate, up = np.split(np.asarray(value[e]), 2, axis=0)
                out[f"{base}.{e}.{names[0]}.weight"] = np.ascontiguousarray(gate)
                out[f"{base}.{e}.{names[1]}.weight"] = np.ascontiguousarray(up)
    return out
