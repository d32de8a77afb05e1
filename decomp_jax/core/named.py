"""Many adapters on one base: named adapters in one tree, switching between them, mixed batches.

Layout. The unnamed adapter (``"default"``, as in HF PEFT) keeps the plain leaf names every other
function reads (``lora_a`` beside ``kernel``). An adapter named ``name`` stores each of its leaves
``x`` as ``x@name`` in the same dict (a prompt method's subtree as ``prompt_tuning@name``), so any
number of adapters, of any methods and ranks, sit beside one copy of the frozen base. The base
leaves an adapter added to a tree trains (a head in ``train_extra``, BitFit's biases) are its own
copies (``classifier/kernel@name``, also ``@default``), as PEFT's ``modules_to_save`` keeps one copy per
adapter; only a lone unnamed adapter injected into plain base params trains them in place, as before.

- ``inject(params, cfg, key, name="task_b")`` adds an adapter (``attach`` adds one made elsewhere:
  trained, imported from PEFT, combined by ``add_weighted_adapter``);
- ``select(params, name)`` is that adapter alone in the plain layout: every single-adapter function
  (``adapt``, ``merge``, ``export_peft``, checkpoints, ``add_weighted_adapter``) takes it;
  ``select(params, None)`` is the base alone;
- ``trainable_mask(params, cfg, name=...)`` / ``partition(..., name=...)`` train one adapter of the tree;
- ``adapt_many(apply_fn, cfgs)`` runs several at once: ``apply(params, x, adapter_weights=w)`` with
  ``w`` of shape ``(N,)`` (one weight per adapter, in ``cfgs``' order: one-hot switches, several ones
  sum the adapters as PEFT's ``set_adapter([...])``) or ``(batch, N)`` (each example its own adapter, a
  zero row the base model). ``w`` is data: switching never recompiles. Per adapted layer the output
  is ``(1 - sum_i w_i) y_base + sum_i w_i y_i``; a one-hot row gives exactly that adapter's layer.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

from flax.traverse_util import unflatten_dict

from decomp_jax.core.methods import names, registry
from decomp_jax.core.tree import TOKEN_LEAF, Path, flat_params
from decomp_jax.errors import ConfigError

SEP = "@"
DEFAULT = "default"


# --- the layout ----------------------------------------------------------------------------------

def owner_of(path: Path) -> Optional[str]:
    """The adapter a leaf's path names (``x@name`` in any component), None for a plain path."""
    for part in path:
        if SEP in str(part):
            return str(part).rsplit(SEP, 1)[1]
    return None


def plain_path(path: Path) -> Path:
    return tuple(str(p).rsplit(SEP, 1)[0] if SEP in str(p) else p for p in path)


def named_path(path: Path, name: str, prompt: bool) -> Path:
    """The path of a plain leaf of adapter ``name`` (a prompt method's subtree renamed at its root)."""
    if name == DEFAULT:
        return path
    if prompt:
        return (f"{path[0]}{SEP}{name}",) + path[1:]
    return path[:-1] + (f"{path[-1]}{SEP}{name}",)


@functools.lru_cache(maxsize=1)
def all_factor_names() -> frozenset:
    return frozenset(n for m in registry().values() for n in m.factor_names) | {TOKEN_LEAF}


@functools.lru_cache(maxsize=1)
def _prompt_names() -> frozenset:
    return frozenset(names("prompt"))


def _default_leaf(path: Path, layers: Mapping[Path, set]) -> bool:
    """Whether a plain leaf belongs to the unnamed adapter: a factor leaf beside a layer's matrix, the
    trainable token rows beside a table, or a prompt method's subtree."""
    if path and str(path[0]) in _prompt_names():
        return True
    siblings = layers.get(path[:-1], set())
    return path[-1] in all_factor_names() and ("kernel" in siblings or "embedding" in siblings)


def _layers(flat) -> dict[Path, set]:
    out: dict[Path, set] = {}
    for path in flat:
        out.setdefault(path[:-1], set()).add(path[-1])
    return out


def check_name(name) -> None:
    if not isinstance(name, str) or not name or SEP in name or "/" in name:
        raise ConfigError(f"An adapter name is a non-empty string without {SEP!r} or '/' (e.g. 'task_a'); got {name!r}.")


def adapter_names(params) -> list[str]:
    """The adapters ``params`` hold: ``"default"`` (the unnamed one) first when present, then the named
    ones in sorted order."""
    flat = flat_params(params)
    layers = _layers(flat)
    named = sorted({o for o in map(owner_of, flat) if o is not None})
    default = DEFAULT in named or any(owner_of(p) is None and _default_leaf(p, layers) for p in flat)
    return ([DEFAULT] if default else []) + [n for n in named if n != DEFAULT]


def has_named(params) -> bool:
    """Whether ``params`` hold a named adapter (a leaf ``x@name``)."""
    return any(owner_of(p) is not None for p in flat_params(params))


def select(params, name: Optional[str]) -> dict:
    """Adapter ``name`` alone over the base, in the plain layout (its ``x@name`` leaves named ``x``, its
    own copies of base leaves in their place, every other adapter dropped); ``None``: the base alone."""
    flat = flat_params(params)
    if name is not None:
        check_name(name)
        held = adapter_names(params)
        if name not in held:
            raise ConfigError(f"params hold no adapter named {name!r}; they hold {held}. Add one with "
                              f"dj.inject(params, cfg, key, name={name!r}).")
    layers = _layers(flat)
    out, own = {}, {}
    for path, value in flat.items():
        owner = owner_of(path)
        if owner is None:
            if name != DEFAULT and _default_leaf(path, layers):
                continue
            out[path] = value
        elif owner == name:
            own[plain_path(path)] = value
    out.update(own)
    return unflatten_dict(out)


def stored_path(path: Path, name: str) -> Path:
    """Where a plain layer leaf of adapter ``name`` sits in a tree of several."""
    return named_path(path, name, prompt=False)


# --- several adapters in one forward pass --------------------------------------------------------
