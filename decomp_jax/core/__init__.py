"""Floor 2, the adapter core: pure functions on parameter trees.

``tree`` (paths, layouts, stacked layers, split/combine; no registry) < ``methods`` (the ``Method``
registry and every method's formulas) < ``config`` (``AdapterConfig``) < ``named`` (how named adapters
are stored) < ``inject`` (inject, merge, unmerge, masks, partition) < ``prompts`` (prompt and prefix
tuning at run time) < ``execution`` (factored execution: ``adapt``) < ``mix`` (several adapters at
once), ``penalties`` (MPC), ``weighted`` (weighted combinations), ``nnx`` (NNX models).

May import: floor 0 (``errors``, ``guards``, ``quant``) and floor 1 (``models``, ``data``).
"""
