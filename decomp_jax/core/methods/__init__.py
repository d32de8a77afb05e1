"""The method registry: ``get(name)``, ``names()``, and one module per family or stateful method
(``base`` < ``lowrank`` < ``spectral``, ``dora``, ``scaling``, ``adapters`` < ``adalora`` < ``dash``,
``flexlora`` < ``prompt``). Each method is a ``Method`` (``base``): its factors, init and formula.

May import: floors 0-1 and ``core.tree``.
"""

from decomp_jax.core.methods.base import Method, Schedule, get, names, register, registry
from decomp_jax.core.methods import adalora, adapters, dash, dora, flexlora, lowrank, scaling, spectral  # noqa: F401  (register)
from decomp_jax.core.methods import prompt  # noqa: F401  (prompt_tuning, prefix_tuning: kind="prompt")

__all__ = ["Method", "Schedule", "get", "names", "register", "registry"]
