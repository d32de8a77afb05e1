"""FlexLoRA: AdaLoRA's triplets with ranks that move between layers by spectral entropy.

``dK = (alpha / r_l) * lora_a @ diag(lora_e * active) @ lora_b`` where ``active`` (a buffer of 0/1)
marks the ``r_l`` live triplets of layer ``l``. Every layer is allocated ``max_rank`` slots (default
``2 * rank``) and starts with the first ``rank`` of them live, so rank changes never change a shape:
nothing recompiles, and the surviving triplets keep their optimizer moments (the toolkit rebuilds
its optimizer at every change and loses all of Adam's state).

Every ``interval`` optimizer steps ``t`` with ``t_init < t <= T - t_final`` (fractions of the run's
``T`` steps, as AdaLoRA's), per adapted layer the normalised spectral entropy of its live ``lora_e``:
``p_i = e_i^2 / sum_j e_j^2``, ``H = -sum_i p_i log p_i / log r_l`` (``H = 1`` when every live ``e`` is
0, ``H = 0`` when ``r_l = 1``). Then, with ``b`` layers per side (``options.b``, 4; with
``b_decay: true`` cubic from ``b`` to 0 over the same window):

- among the ``b`` layers of lowest ``H`` that have ``r_l > 1``, the live triplet with the smallest
  *signed* ``e_i`` is removed (its ``e`` zeroed, its slot freed);
- to the ``b`` layers of highest ``H`` that have a free slot (and were not just pruned) a triplet is
  added in the lowest free slot: new ``lora_a`` column and ``lora_b`` row ~ N(0, 1), ``e = 0``, so the
  layer's output is unchanged at insertion (its scale becomes ``alpha / (r_l + 1)``).

Ties go to the earlier layer (layers in path order). The new triplets' values come from
``options.seed`` and the step, so a run is deterministic and a resumed run equals the uninterrupted
one. The optimizer's moments of every value the schedule rewrites are zeroed (``reset_moments``): a
re-used slot starts like a new parameter, not with the stale moments of the triplet that held it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decomp_jax.core.methods.adalora import ADALORA, check_phases, phase_steps
from decomp_jax.core.methods.base import Method, Schedule, additive, linear, register
from decomp_jax.core.methods.lowrank import lowrank_path, normal_002
from decomp_jax.core.tree import layers_with, path_str, scan_roots, set_leaves, unrolled_schedule, unstack_view
from decomp_jax.errors import ConfigError

OPTIONS = {"max_rank": None, "t_init": 0.1, "t_final": 0.2, "interval": 10, "b": 4, "b_decay": False, "seed": 0}


def max_rank(cfg) -> int:
    value = cfg.option("max_rank")
    return 2 * cfg.rank if value is None else int(value)


def _init(key, kernel, bias, cfg):
    d_in, d_out = kernel.shape
    slots = max_rank(cfg)
    if slots > min(d_in, d_out):
        raise ConfigError(f"flexlora: options.max_rank={slots} (default 2 * rank) is larger than min(d_in, d_out)="
                          f"{min(d_in, d_out)} of a kernel {tuple(kernel.shape)}; set options.max_rank <= "
                          f"{min(d_in, d_out)}.")
    ka, kb = jax.random.split(key)
    return {
        "lora_a": normal_002(ka, (d_in, slots), kernel.dtype),
        "lora_e": jnp.zeros((slots,), kernel.dtype),
        "lora_b": normal_002(kb, (slots, d_out), kernel.dtype),
        "active": (jnp.arange(slots) < cfg.rank).astype(kernel.dtype),
    }


def live_scale(f, cfg) -> jax.Array:
    """``alpha / r_l`` with ``r_l`` the layer's live triplets."""
    return cfg.alpha / jnp.maximum(jnp.sum(f["active"]), 1.0)


def _middle(f):
    return {**f, "lora_e": f["lora_e"] * f["active"]}


def _delta(f, cfg):
    return live_scale(f, cfg) * ((f["lora_a"] * (f["lora_e"] * f["active"])) @ f["lora_b"])


def _apply(x, kernel, bias, f, cfg, *, train=False, key=None):
    return linear(x, kernel, bias) + lowrank_path(x, _middle(f), cfg, train, key, live_scale(f, cfg), "lora_e")


def spectral_entropy(e: jax.Array, active: jax.Array) -> jax.Array:
    """The normalised entropy of the live ``e``'s energy distribution, in [0, 1]."""
    energy = jnp.square(e.astype(jnp.float32)) * active
    total = jnp.sum(energy)
    p = energy / jnp.where(total > 0, total, 1.0)
    h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    r = jnp.sum(active)
    normalised = h / jnp.log(jnp.maximum(r, 2.0))
    return jnp.where(r <= 1, 0.0, jnp.where(total > 0, normalised, 1.0))


def changes_at(step, *, b: int, decay: bool, t_init: int, end: int) -> jax.Array:
    """How many layers lose (and gain) a triplet at optimizer step ``step`` (0 off the schedule)."""
    on = (step > t_init) & (step <= end)
    count = jnp.int32(b)
    if decay:
        frac = (step - t_init) / (end - t_init)
        count = jnp.floor(b * (1.0 - frac) ** 3).astype(jnp.int32)
    return jnp.where(on, count, 0)


def choose_layers(entropy: jax.Array, live: jax.Array, slots: int, n) -> tuple[jax.Array, jax.Array]:
    """Bool ``(prune, grow)`` over layers: the ``n`` lowest-entropy layers with more than one live
    triplet, and the ``n`` highest-entropy layers with a free slot among the others."""
    can_prune = live > 1
    # stable sorts: ties go to the earlier layer
    rank_low = jnp.argsort(jnp.argsort(jnp.where(can_prune, entropy, jnp.inf), stable=True), stable=True)
    prune = can_prune & (rank_low < jnp.minimum(n, jnp.sum(can_prune)))
    can_grow = (live < slots) & ~prune
    rank_high = jnp.argsort(jnp.argsort(jnp.where(can_grow, -entropy, jnp.inf), stable=True), stable=True)
    grow = can_grow & (rank_high < jnp.minimum(n, jnp.sum(can_grow)))
    return prune, grow


def _validate(cfg):
    if cfg.rslora:
        raise ConfigError("flexlora scales its update by alpha / (live rank); rslora does not apply. Set rslora: false.")
    if cfg.mpc is not None:
        raise ConfigError("flexlora with mpc is not supported: the penalty would count the free slots of lora_a/lora_b. "
                          "Use adalora (its built-in MPC_o) or drop mpc.")
    o = {k: cfg.option(k) for k in OPTIONS}
    if o["max_rank"] is not None and (not isinstance(o["max_rank"], int) or isinstance(o["max_rank"], bool)
                                      or o["max_rank"] < cfg.rank):
        raise ConfigError(f"options.max_rank must be an integer >= rank={cfg.rank} (the slots per layer), "
                          f"got {o['max_rank']!r}.")
    check_phases(cfg, "rank changes")
    for name, low in (("interval", 1), ("b", 0), ("seed", 0)):
        if not isinstance(o[name], int) or isinstance(o[name], bool) or o[name] < low:
            raise ConfigError(f"options.{name} must be an integer >= {low}, got {o[name]!r}.")
    if not isinstance(o["b_decay"], bool):
        raise ConfigError(f"options.b_decay must be true or false, got {o['b_decay']!r}.")


def _schedule(cfg, total_steps: int) -> Schedule:

    interval, b, decay = cfg.option("interval"), cfg.option("b"), cfg.option("b_decay")
    t_init, end = phase_steps(cfg, total_steps)
    slots = max_rank(cfg)

    def update(state, step, params, grads):
        layers = sorted(layers_with(params, cfg, FLEXLORA.factor_names), key=lambda item: item[0])  # path order (ties: the earlier)
        entropy = jnp.stack([spectral_entropy(layer["lora_e"], layer["active"]) for _, layer in layers])
        live = jnp.stack([jnp.sum(layer["active"]).astype(jnp.int32) for _, layer in layers])
        n = jnp.where(step % interval == 0, changes_at(step, b=b, decay=decay, t_init=t_init, end=end), 0)
        prune, grow = choose_layers(entropy, live, slots, n)
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.option("seed")), step)
        changes = {}
        for i, (path, layer) in enumerate(layers):
            a, e, bb, active = layer["lora_a"], layer["lora_e"], layer["lora_b"], layer["active"]
            is_live = active > 0
            # prune: the live triplet with the smallest signed e
            drop = jnp.argmin(jnp.where(is_live, e, jnp.inf))
            drop_hot = prune[i] & (jnp.arange(slots) == drop)
            # grow: the lowest free slot, fresh N(0, 1) column / row and e = 0
            free = jnp.argmin(is_live)  # the first False
            grow_hot = grow[i] & (jnp.arange(slots) == free)
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            new_a = jax.random.normal(ka, (a.shape[0],), a.dtype)
            new_b = jax.random.normal(kb, (bb.shape[1],), bb.dtype)
            changes[path + ("lora_a",)] = jnp.where(grow_hot[None, :], new_a[:, None], a)
            changes[path + ("lora_b",)] = jnp.where(grow_hot[:, None], new_b[None, :], bb)
            changes[path + ("lora_e",)] = jnp.where(drop_hot | grow_hot, jnp.zeros_like(e), e)
            changes[path + ("active",)] = jnp.where(drop_hot, 0.0, jnp.where(grow_hot, 1.0, active)).astype(active.dtype)
        return state, set_leaves(params, changes)

    return unrolled_schedule(Schedule(init=lambda params: {}, update=update, reset_moments=True), cfg)


FLEXLORA = register(Method(
    name="flexlora",
    family="extension",
    formula="K' = K + (alpha/r_l) * lora_a @ diag(lora_e * active) @ lora_b; triplets move by spectral entropy",
    factor_names=("lora_a", "lora_e", "lora_b", "active"),
    init=_init,
    **additive(_delta),
    apply=_apply,
    buffers=("active",),
    uses_rank=True,
    options=OPTIONS,
    validate=_validate,
    schedule=_schedule,
))


def live_ranks(params, cfg) -> dict[str, int] | None:
    """``{layer path: live rank}`` for the methods whose ranks change in training (FlexLoRA: its live
    slots; AdaLoRA: its unmasked triplets), in path order; None for the others."""
    if cfg.method not in ("flexlora", "adalora"):
        return None
    roots = scan_roots(params, cfg)
    view = unstack_view(params, roots) if roots else params
    count = (lambda layer: jnp.sum(layer["active"] > 0)) if cfg.method == "flexlora" else (
        lambda layer: jnp.sum(layer["lora_e"] != 0))
    names = (FLEXLORA if cfg.method == "flexlora" else ADALORA).factor_names
    return {path_str(path): int(count(layer)) for path, layer in sorted(layers_with(view, cfg, names))}
