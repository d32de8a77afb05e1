"""Module paths that moved when the package took its layers, and the aliases that keep the old paths
importable for one release (``decomp_jax.inject`` is ``decomp_jax.core.inject``, ...). Importing an old
path warns (DeprecationWarning) and returns the module at its new path itself, so private names,
monkeypatching and the method registry are shared."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

MOVED = {
    "decomp_jax.config": "decomp_jax.core.config",
    "decomp_jax.inject": "decomp_jax.core.inject",
    "decomp_jax.execution": "decomp_jax.core.execution",
    "decomp_jax.prompts": "decomp_jax.core.prompts",
    "decomp_jax.penalties": "decomp_jax.core.penalties",
    "decomp_jax.weighted": "decomp_jax.core.weighted",
    "decomp_jax.methods": "decomp_jax.core.methods",
    "decomp_jax.convert": "decomp_jax.models.convert",
    "decomp_jax.causal_lm": "decomp_jax.models.causal_lm",
    "decomp_jax.distributed": "decomp_jax.parallel.distributed",
    "decomp_jax.metrics": "decomp_jax.tasks.metrics",
    "decomp_jax.train": "decomp_jax.training.train",
    "decomp_jax.checkpoint": "decomp_jax.training.checkpoint",
    "decomp_jax.experiment": "decomp_jax.app.experiment",
    "decomp_jax.runs": "decomp_jax.app.runs",
    "decomp_jax.study": "decomp_jax.app.sweep",
    "decomp_jax.bench_decoder": "decomp_jax.app.bench_decoder",
    "decomp_jax.bench": "decomp_jax.app.bench",
    "decomp_jax.cli": "decomp_jax.app.cli",
    "decomp_jax.allocator": "decomp_jax.app.allocator",
}
"""Each old module path and its new path: importing the old one warns and returns the new one."""


def redirect(old: str) -> None:
    """Make ``old`` (an alias module being imported) the module at its new path, with its submodules."""
    new = MOVED[old]
    warnings.warn(f"{old} moved to {new}; import it from there (the old path goes in the next release).",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        sys.modules[f"{old}.{info.name}"] = importlib.import_module(f"{new}.{info.name}")


def keep_public_names(package) -> None:
    """An old path whose last part is also a public name of ``package`` (``decomp_jax.inject``: the module
    moved, ``dj.inject`` is the function) is registered now as its new module, so that importing it later
    never rebinds that name on the package (the import system sets a loaded submodule as an attribute
    of its parent)."""
    for old, new in MOVED.items():
        parent, leaf = old.rsplit(".", 1)
        if parent == package.__name__ and leaf in getattr(package, "__all__", ()) and new in sys.modules:
            sys.modules.setdefault(old, sys.modules[new])
