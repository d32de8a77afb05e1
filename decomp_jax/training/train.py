"""Training: optax all the way, one jit-compiled step, gradients only for trainable leaves.

The params are split once into ``trainable``, ``buffers`` and ``frozen`` parts
(``inject.partition``). The train state holds the trainable leaves and their optimizer state, the
buffers a stateful method rewrites (LoRA-Dash) and that method's state (AdaLoRA's sensitivity
EMAs and masks); the frozen part is an argument of the step that is never differentiated nor
updated, so it stays bit-identical. A stateful method's ``Schedule.update`` runs inside the step
after each optimizer update, so training with it is as deterministic as without.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from flax.traverse_util import flatten_dict, unflatten_dict

from decomp_jax.core.config import AdapterConfig
from decomp_jax.core.inject import partition
from decomp_jax.core.methods import Schedule, get
from decomp_jax.core.penalties import penalty
from decomp_jax.core.tree import combine
from decomp_jax.errors import ConfigError
from decomp_jax.parallel import sharding as sh
from decomp_jax.parallel.sharding import FSDP_MIN_SIZE, follow, param_specs, unbox

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@chex.dataclass
class TrainState:
    """The state of one training run, a pytree that the jitted train step takes and returns (made by
    ``init_state``): ``step`` (micro-steps done: optimizer updates times ``grad_accum``), ``trainable``
    (the trainable leaves, as ``partition`` splits them off), ``opt_state`` (the optax state of
    ``trainable``), ``rng`` (the key each step splits for dropout), ``buffers`` (leaves a method's schedule
    rewrites: LoRA-Dash, FlexLoRA; ``{}`` otherwise) and ``method_state`` (the state of a stateful
    method's ``Schedule``: AdaLoRA, LoRA-Dash, FlexLoRA; None otherwise)."""

    step: jax.Array  # micro-steps done (optimizer updates times grad_accum)
    trainable: dict
    opt_state: Any
    rng: jax.Array
    buffers: Optional[dict] = None  # buffers rewritten by a method's schedule (LoRA-Dash)
    method_state: Any = None  # a stateful method's state (AdaLoRA)


def make_schedule(cfg: Optional[AdapterConfig], total_steps: int) -> Optional[Schedule]:
    """The method's ``Schedule`` for a run of ``total_steps`` optimizer updates (None if stateless)."""
    if cfg is None:
        return None
    method = get(cfg.method)
    return None if method.schedule is None else method.schedule(cfg, total_steps)


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.01,
    grad_clip: Optional[float] = 1.0,
    grad_accum: int = 1,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up then linear decay to 0, optional global-norm clipping and
    gradient accumulation (``optax.MultiSteps``; ``total_steps`` counts optimizer updates)."""
    warmup = int(round(warmup_ratio * total_steps))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
         optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))],
        [warmup],
    )
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx


def decay_mask(params):
    """Weight decay on matrices only: vectors (biases, IA3/SSL/SSB scales and DoRA magnitudes,
    which start at 1, singular values, lora_e) are not pulled towards zero."""
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def init_state(
    trainable: dict,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    *,
    buffers: Optional[dict] = None,
    schedule: Optional[Schedule] = None,
    frozen: Optional[dict] = None,
) -> TrainState:
    """The step-0 state. Leaves are copied: the train step donates the state's buffers, and no
    two leaves may share one (a head named by ``train_extra`` shares the caller's params; a
    schedule's init may reuse one zeros array). With a ``schedule``, pass ``frozen`` too (its
    state is built from the whole tree)."""
    trainable = jax.tree.map(jnp.copy, trainable)
    buffers = jax.tree.map(jnp.copy, buffers or {})
    method_state = None
    if schedule is not None and frozen is None:
        raise ConfigError("init_state(..., schedule=...) needs frozen=: the method's state is built from the whole params tree.")
    if schedule is not None:
        method_state = jax.tree.map(jnp.copy, schedule.init(combine(trainable, buffers, frozen or {})))
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable), rng=rng,
        buffers=buffers, method_state=method_state,
    )


def stack_states(states) -> TrainState:
    """N train states of one structure (e.g. ``init_state`` of N seeds' adapters) as one state whose
    leaves have a leading axis N: the state of ``make_train_step(..., batched=...)``."""
    states = list(states)
    if not states:
        raise ConfigError("stack_states needs at least one TrainState.")
    shapes = {jax.tree.structure(s) for s in states}
    if len(shapes) > 1:
        raise ConfigError("stack_states: the states differ in structure; batched training needs adapters of one "
                          "method, targets and rank (and one optimizer): run the others separately.")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(state: TrainState, index: int) -> TrainState:
    """Adapter ``index`` of a stacked state: the state its own single-adapter run would have."""
    return jax.tree.map(lambda x: x[index], state)


def with_lr_factor(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` followed by a scale held in its state (1 at init): the learning-rate factor of one
    adapter of a batched run (``set_lr_factor``), so N learning rates train in one step. With
    ``make_optimizer(lr, ...)`` an adapter with factor f trains as with ``make_optimizer(f * lr, ...)``."""
    return optax.chain(optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))


def set_lr_factor(state: TrainState, factor) -> TrainState:
    """``state`` (of an optimizer built by ``with_lr_factor``) with its learning-rate factor set."""
    inner, scale = state.opt_state
    hyper = {**scale.hyperparams, "step_size": jnp.asarray(factor, jnp.float32)}
    return state.replace(opt_state=(inner, scale._replace(hyperparams=hyper)))


def _pick(params: dict, like: dict) -> dict:
    """The leaves of ``params`` at the paths of ``like``."""
    flat = flatten_dict(params)
    return unflatten_dict({p: flat[p] for p in flatten_dict(like)})


def _run_schedule(schedule: Schedule, state: TrainState, opt_state, trainable, buffers, frozen, grads):
    """``schedule.update`` after an optimizer update; with gradient accumulation
    (``optax.MultiSteps``) only on the micro-steps that emitted an update, with the mean gradient
    of the accumulated micro-batches."""

    def run(step, grads):
        params = combine(trainable, buffers, frozen)
        method_state, params = schedule.update(state.method_state, step, params, grads)
        return method_state, _pick(params, trainable), _pick(params, buffers)

    if isinstance(opt_state, optax.MultiStepsState):
        before = state.opt_state
        emitted = opt_state.gradient_step > before.gradient_step
        # MultiSteps keeps a running mean of the earlier micro-batches' gradients
        n = (before.mini_step + 1).astype(jnp.float32)
        mean = jax.tree.map(lambda acc, g: acc + (g - acc) / n, before.acc_grads, grads)
        skip = lambda step, grads: (state.method_state, trainable, buffers)
        return jax.lax.cond(emitted, run, skip, opt_state.gradient_step, mean)
    return run(state.step + 1, grads)


def reset_moments(optimizer: optax.GradientTransformation, opt_state, before: dict, after: dict):
    """``opt_state`` with every params-shaped entry (Adam's moments, accumulated gradients) zeroed
    where ``after`` differs from ``before`` (the values a method's schedule rewrote)."""
    changed = jax.tree.map(lambda a, b: a != b, before, after)
    return optax.tree_utils.tree_map_params(
        optimizer, lambda v, c: jnp.where(c, jnp.zeros_like(v), v), opt_state, changed,
        transform_non_params=lambda v: v)


def _check_stateful(cfg: Optional[AdapterConfig], schedule: Optional[Schedule]) -> None:
    method = get(cfg.method) if cfg is not None else None
    if method is not None and method.schedule is not None and schedule is None:
        raise ConfigError(
            f"Method {cfg.method!r} is stateful: pass schedule=make_schedule(cfg, total_steps) to make_train_step "
            f"and init_state (and split the params with partition())."
        )


def _single_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, cfg: Optional[AdapterConfig],
                 schedule: Optional[Schedule]) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """The unjitted ``step(state, frozen, batch) -> (state, metrics)`` of one adapter (see ``make_train_step``)."""

    def step(state: TrainState, frozen: dict, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        buffers = state.buffers or {}
        if schedule is not None and state.method_state is None:
            raise ConfigError("The state has no method state: build it with init_state(..., schedule=schedule, frozen=frozen).")
        if schedule is not None and get(cfg.method).buffers and not buffers:
            raise ConfigError(
                f"Method {cfg.method!r} rewrites its buffers {get(cfg.method).buffers} during training; they must be in "
                f"the train state: split the params with partition(params, cfg) and pass buffers= to init_state."
            )

        def objective(trainable):
            params = combine(trainable, buffers, frozen)
            task_loss, aux = loss_fn(params, batch, step_rng)
            reg = penalty(params, cfg) if cfg is not None else jnp.float32(0.0)
            return task_loss + reg, (task_loss, reg, aux)

        (_, (task_loss, reg, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        method_state = state.method_state
        if schedule is not None:
            updated = trainable
            method_state, trainable, buffers = _run_schedule(schedule, state, opt_state, trainable, buffers, frozen, grads)
            if schedule.reset_moments:
                opt_state = reset_moments(optimizer, opt_state, updated, trainable)
        grad_norm = optax.tree.norm(grads)
        # one scalar per step that the host can check in batches (no sync per step): a NaN or inf
        # loss, penalty or gradient anywhere makes the global norm or the objective non-finite
        finite = jnp.isfinite(task_loss + reg) & jnp.isfinite(grad_norm)
        metrics = {"loss": task_loss, "penalty": reg, "grad_norm": grad_norm, "finite": finite, **aux}
        new_state = TrainState(
            step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng,
            buffers=buffers, method_state=method_state,
        )
        return new_state, metrics

    return step


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    cfg: Optional[AdapterConfig] = None,
    *,
    schedule: Optional[Schedule] = None,
    state_sharding=None,
    frozen_sharding=None,
    batch_sharding=None,
    donate: bool = True,
    mesh=None,
    rules=None,
    batched: Optional[str] = None,
) -> Callable[[TrainState, dict, dict], tuple[TrainState, dict]]:
    """A jitted ``step(state, frozen, batch) -> (state, metrics)``.

    ``loss_fn(params, batch, rng) -> (loss, aux)`` sees the recombined params; the MPC penalty
    of ``cfg`` is added to it. ``metrics`` holds ``loss``, ``penalty``, ``grad_norm``, the loss
    function's ``aux`` and ``finite`` (a bool: loss, penalty and every gradient finite this
    step). ``schedule`` (``make_schedule(cfg, total_steps)``) runs a stateful method's update
    after each optimizer update. Shardings (``jax.sharding`` objects or pytrees of them) are
    passed to ``jax.jit`` when given, so data-parallel or FSDP layouts need no change here.

    With a ``mesh`` (``decomp_jax.parallel.sharding.make_mesh``) and no explicit shardings, every sharding is
    derived at the first call from the arguments' structure: params by ``rules`` (a
    ``sharding.RULES`` preset name, a list of (regex, spec) pairs, or None for the architecture's
    preset), factor leaves from their kernels, optimizer and method state following the trainable
    leaves, the batch's leading axis over ``("data", "fsdp")``. Arguments not laid out that way are
    placed first (``sharding.place``), so host arrays can be passed.

    ``batched``: train N adapters of one structure at once (N seeds, N learning rates, N users' tasks) in
    one step over one copy of ``frozen``: the state is ``stack_states([state_1, ..., state_N])`` (each
    adapter its own leaves, optimizer state and RNG), the step is ``jax.vmap`` of the single step, and
    ``metrics`` hold one value per adapter. ``"shared"``: one batch for all; ``"stacked"``: a batch with
    a leading axis N, one per adapter. Each adapter's run equals its own single-adapter run. With a
    ``mesh`` each adapter's leaves are laid out as its single run's (the axis N replicated), the batch
    split over ``("data", "fsdp")`` on its example axis.
    """

    _check_stateful(cfg, schedule)
    if batched not in (None, "shared", "stacked"):
        raise ConfigError(f"batched={batched!r}: choose 'shared' (one batch for every adapter) or 'stacked' (a "
                          f"leading axis N on the batch, one per adapter), or None.")

    step = _single_step(loss_fn, optimizer, cfg, schedule)
    jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    explicit = any(s is not None for s in (state_sharding, frozen_sharding, batch_sharding))
    if batched is not None:
        if explicit:
            raise ConfigError("batched training derives its shardings from mesh=: drop the explicit shardings.")
        step = jax.vmap(step, in_axes=(0, None, 0 if batched == "stacked" else None))
        if mesh is None:
            return jax.jit(step, **jit_kwargs)
    if mesh is not None and not explicit:
        return _meshed_step(step, jit_kwargs, cfg, mesh, rules, batched)
    if explicit:
        jit_kwargs["in_shardings"] = (state_sharding, frozen_sharding, batch_sharding)
        jit_kwargs["out_shardings"] = (state_sharding, None)
    return jax.jit(step, **jit_kwargs)


def _meshed_step(step, jit_kwargs, cfg, mesh, rules, batched=None):
    """``step`` jitted with the shardings of ``sharding`` derived from the first arguments of each
    tree structure (cached); arguments are placed onto the mesh when they are not already. ``batched``:
    ``step`` is the vmapped step of stacked states (and, ``"stacked"``, stacked batches)."""
    compiled: dict = {}
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    along_n = lambda shardings: jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), shardings)

    def run(state: TrainState, frozen: dict, batch: dict):
        key = (jax.tree.structure(state), jax.tree.structure(frozen), jax.tree.structure(batch),
               tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(batch)))
        if key not in compiled:
            one = first(state) if batched else state  # one adapter's state: its layout, the N axis replicated
            params = combine(one.trainable, one.buffers or {}, frozen)
            specs = sh.param_specs(params, mesh, rules, cfg=cfg)
            state_sh, frozen_sh = sh.follow(one, specs, mesh), sh.follow(frozen, specs, mesh)
            if batched == "stacked":
                batch_sh = along_n(sh.batch_sharding(first(batch), mesh, strict=True))
            else:
                batch_sh = sh.batch_sharding(batch, mesh, strict=True)
            if batched:
                state_sh = along_n(state_sh)
            fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                         **jit_kwargs)
            compiled[key] = (fn, state_sh, frozen_sh, batch_sh)
        fn, state_sh, frozen_sh, batch_sh = compiled[key]
        return fn(sh.place(state, state_sh), sh.place(frozen, frozen_sh), sh.place(batch, batch_sh))

    run.mesh = mesh
    return run


def make_eval_step(predict_fn: Callable[[Any, dict], jax.Array], *, batch_sharding=None, mesh=None) -> Callable:
    """A jitted ``eval_step(trainable, frozen, batch) -> predictions`` (pass
    ``combine(state.buffers, frozen)`` as ``frozen`` for a method with buffers in the state). With a
    ``mesh``, the batch's leading axis is split over ``("data", "fsdp")`` where they divide it (else
    replicated); the params keep the shardings they were placed with."""

    def eval_step(trainable, frozen, batch):
        return predict_fn(combine(trainable, frozen), batch)

    if mesh is not None and batch_sharding is None:
        jitted = jax.jit(eval_step)

        def run(trainable, frozen, batch):
            return jitted(trainable, frozen, sh.place(batch, sh.batch_sharding(batch, mesh)))

        return run
    if batch_sharding is not None:
        return jax.jit(eval_step, in_shardings=(None, None, batch_sharding))
    return jax.jit(eval_step)


def state_shapes(trainable, optimizer, *, buffers=None, schedule=None, frozen=None, rng=None):
    """The ``TrainState`` of ``init_state`` as ``ShapeDtypeStruct``s (``jax.eval_shape``: nothing is computed)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.eval_shape(lambda t, b, f, r: init_state(t, optimizer, r, buffers=b, schedule=schedule, frozen=f),
                          trainable, buffers or {}, frozen, rng)


def init_state_sharded(trainable, optimizer, rng, mesh, specs, *, buffers=None, schedule=None, frozen=None):
    """``init_state`` built directly in its sharded layout: one jitted call whose ``out_shardings``
    come from ``jax.eval_shape`` (no leaf is first materialised on one device). ``specs``:
    ``param_specs`` of the whole adapted tree."""
    shapes = state_shapes(trainable, optimizer, buffers=buffers, schedule=schedule, frozen=frozen, rng=rng)
    out = follow(shapes, specs, mesh)
    build = jax.jit(lambda t, b, f, r: init_state(t, optimizer, r, buffers=b, schedule=schedule, frozen=f),
                    out_shardings=out)
    return build(trainable, buffers or {}, frozen, rng)


def train_shardings(params, cfg: Optional[AdapterConfig], mesh, optimizer, *, rules=None, schedule=None,
                    fsdp_min_size: int = FSDP_MIN_SIZE, logical_rules=None):
    """``(state_sharding, frozen_sharding)`` for training ``params`` (the whole adapted tree) with
    ``cfg``: pytrees of ``NamedSharding`` for ``init_state``'s ``TrainState`` and the frozen part of
    ``partition(params, cfg)``."""
    specs = param_specs(params, mesh, rules, cfg=cfg, fsdp_min_size=fsdp_min_size, logical_rules=logical_rules)
    params = unbox(params)
    if cfg is not None:
        trainable, buffers, frozen = partition(params, cfg)
    else:
        trainable, buffers, frozen = params, {}, {}
    shapes = state_shapes(trainable, optimizer, buffers=buffers, schedule=schedule, frozen=frozen)
    return follow(shapes, specs, mesh), follow(frozen, specs, mesh)
