"""The method registry: ``get(name)``, ``names()``, and one module per family."""

from decomp_jax.methods.base import Method, get, names, register, registry
from decomp_jax.methods import dora, lowrank, scaling  # noqa: F401  (register the methods)

__all__ = ["Method", "get", "names", "register", "registry"]
