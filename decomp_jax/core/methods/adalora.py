"""AdaLoRA: ``dK = (alpha/r) * lora_a @ diag(lora_e) @ lora_b`` with a shrinking rank budget.

After every optimizer update (``Schedule.update``, run inside the jitted train step):

- sensitivity ``I = |p * grad_p|`` of every adapter leaf, smoothed ``I_bar <- b1 I_bar + (1-b1) I``,
  uncertainty ``U_bar <- b2 U_bar + (1-b2) |I - I_bar|``, element score ``I_bar * U_bar``;
- triplet score of index i = score(lora_e[i]) + mean score of column i of ``lora_a`` + mean score
  of row i of ``lora_b``;
- budget (total ranks over all layers) ``b(t)``: the initial total for ``t <= t_init``, then the
  cubic ``target + (total - target) * (1 - (t - t_init) / (T - t_final - t_init))^3`` (floored),
  masking every ``interval`` steps; at ``t = T - t_final`` the pattern is fixed at ``target`` and
  applied at every later step (HF PEFT's behaviour);
- masking sets the ``lora_e`` entries of the ``total - b(t)`` lowest-scored triplets to zero.

The orthogonality term of AdaLoRA is MPC_o on ``lora_a``/``lora_b`` (``Method.regularizer``).
Steps count optimizer updates; under gradient accumulation the sensitivity uses the mean gradient of
the update's micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.base import Schedule
from decomp_jax.core.methods.lowrank import lowrank_method, normal_002
from decomp_jax.core.tree import layers_with, set_leaves, unrolled_schedule
from decomp_jax.errors import ConfigError

OPTIONS = {"target_rank": None, "t_init": 0.1, "t_final": 0.2, "interval": 10, "beta1": 0.85, "beta2": 0.85}
LEAVES = ("lora_a", "lora_e", "lora_b")


def _init(key, kernel, bias, cfg):
    d_in, d_out = kernel.shape
    ka, kb = jax.random.split(key)
    return {
        "lora_a": normal_002(ka, (d_in, cfg.rank), kernel.dtype),
        "lora_e": jnp.zeros((cfg.rank,), kernel.dtype),
        "lora_b": normal_002(kb, (cfg.rank, d_out), kernel.dtype),
    }


def target_rank(cfg) -> int:
    """The average rank per layer at the end (default: two thirds of ``rank``, as PEFT's 12 -> 8)."""
    value = cfg.option("target_rank")
    return max(1, (2 * cfg.rank) // 3) if value is None else int(value)


def _validate(cfg):
    if cfg.rslora:
        raise ConfigError("adalora scales its update by alpha/r (the spec's form); rslora does not apply. Set rslora: false.")
    o = {k: cfg.option(k) for k in OPTIONS}
    if o["target_rank"] is not None and (not isinstance(o["target_rank"], int) or not 1 <= o["target_rank"] <= cfg.rank):
        raise ConfigError(f"options.target_rank must be an integer in [1, rank={cfg.rank}], got {o['target_rank']!r}.")
    check_phases(cfg, "the rank budget to shrink")
    if not isinstance(o["interval"], int) or o["interval"] < 1:
        raise ConfigError(f"options.interval must be a positive integer, got {o['interval']!r}.")
    for name in ("beta1", "beta2"):
        if not isinstance(o[name], (int, float)) or not 0 <= o[name] < 1:
            raise ConfigError(f"options.{name} must be in [0, 1), got {o[name]!r}.")


def check_phases(cfg, what: str) -> None:
    """``options.t_init`` and ``t_final``: fractions of the run in [0, 1) that leave steps for ``what``
    (AdaLoRA's budget, FlexLoRA's rank changes)."""
    t_init, t_final = cfg.option("t_init"), cfg.option("t_final")
    for name, value in (("t_init", t_init), ("t_final", t_final)):
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"options.{name} is a fraction of the training steps in [0, 1), got {value!r}.")
    if t_init + t_final >= 1:
        raise ConfigError(f"options.t_init + options.t_final = {t_init + t_final} leaves no steps for {what}; keep "
                          f"their sum below 1 (defaults 0.1 and 0.2).")


def phase_steps(cfg, total_steps: int) -> tuple[int, int]:
    """``(t_init, end)`` in optimizer steps: the budget shrinks over ``(t_init, end]``, ``end = T - t_final``."""
    t_init = int(round(cfg.option("t_init") * total_steps))
    end = total_steps - int(round(cfg.option("t_final") * total_steps))
    return t_init, max(end, t_init + 1)


def budget(t, *, total: int, target: int, t_init: int, end: int):
    """The total rank budget at optimizer step ``t`` (works on Python ints and traced arrays)."""
    frac = (t - t_init) / (end - t_init)
    cubic = jnp.floor(target + (total - target) * (1.0 - frac) ** 3).astype(jnp.int32)
    return jnp.where(t <= t_init, total, jnp.where(t >= end, target, cubic))


def triplet_scores(ipt: dict, unc: dict) -> jax.Array:
    """Score per triplet ``(r,)`` of one layer from its EMAs (dicts keyed by LEAVES)."""
    score = {n: ipt[n] * unc[n] for n in LEAVES}
    return score["lora_e"] + jnp.mean(score["lora_a"], axis=0) + jnp.mean(score["lora_b"], axis=1)


def mask_to_budget(scores: list, n_masked) -> list:
    """Per layer, a bool ``keep`` vector: False for the ``n_masked`` lowest scores over all layers
    (entries tied with the threshold are masked too, as in PEFT)."""
    flat = jnp.concatenate(scores)
    threshold = jnp.sort(flat)[jnp.clip(n_masked - 1, 0, flat.shape[0] - 1)]
    return [jnp.where(n_masked > 0, s > threshold, True) for s in scores]


def _schedule(cfg, total_steps: int) -> Schedule:
    from flax.traverse_util import flatten_dict, unflatten_dict

    b1, b2, interval = cfg.option("beta1"), cfg.option("beta2"), cfg.option("interval")
    t_init, end = phase_steps(cfg, total_steps)

    def init(params):
        # the EMAs mirror the adapter leaves; ``keep`` mirrors lora_e (checkpoint-friendly trees)
        layers = dict(layers_with(params, cfg, ADALORA.factor_names))
        zeros = {p + (n,): jnp.zeros(layer[n].shape, jnp.float32) for p, layer in layers.items() for n in LEAVES}
        keep = {p + ("lora_e",): jnp.ones((cfg.rank,), bool) for p in layers}
        return {"ipt": unflatten_dict(zeros), "unc": unflatten_dict(zeros), "keep": unflatten_dict(keep)}

    def update(state, step, params, grads):
        layers = dict(layers_with(params, cfg, ADALORA.factor_names))
        flat_grads = flatten_dict(grads)
        ipt, unc, keep = (flatten_dict(state[k]) for k in ("ipt", "unc", "keep"))
        smoothing = step < end
        for p, layer in layers.items():
            for n in LEAVES:
                leaf = p + (n,)
                sensitivity = jnp.abs(layer[n] * flat_grads[leaf]).astype(jnp.float32)
                new_ipt = b1 * ipt[leaf] + (1 - b1) * sensitivity
                new_unc = b2 * unc[leaf] + (1 - b2) * jnp.abs(sensitivity - new_ipt)
                ipt[leaf] = jnp.where(smoothing, new_ipt, ipt[leaf])
                unc[leaf] = jnp.where(smoothing, new_unc, unc[leaf])
        total, target = cfg.rank * len(layers), target_rank(cfg) * len(layers)
        n_masked = total - budget(step, total=total, target=target, t_init=t_init, end=end)
        scores = [
            triplet_scores({n: ipt[p + (n,)] for n in LEAVES}, {n: unc[p + (n,)] for n in LEAVES}) for p in layers
        ]
        select = (step > t_init) & ((((step % interval) == 0) & (step < end)) | (step == end))
        apply_mask = select | (step > end)
        new_e = {}
        for (p, layer), fresh in zip(layers.items(), mask_to_budget(scores, n_masked)):
            leaf = p + ("lora_e",)
            keep[leaf] = jnp.where(select, fresh, keep[leaf])
            new_e[leaf] = jnp.where(apply_mask & ~keep[leaf], jnp.zeros_like(layer["lora_e"]), layer["lora_e"])
        new_state = {"ipt": unflatten_dict(ipt), "unc": unflatten_dict(unc), "keep": unflatten_dict(keep)}
        return new_state, set_leaves(params, new_e)

    return unrolled_schedule(Schedule(init, update), cfg)  # stacked (scanned) layers: run on the unrolled view


ADALORA = lowrank_method(
    "adalora",
    "K' = K + (alpha/r) * lora_a @ diag(lora_e) @ lora_b; budgeted masking of lora_e; MPC_o",
    _init, middle="lora_e", options=OPTIONS, validate=_validate, regularizer="mpc_o", schedule=_schedule,
)
