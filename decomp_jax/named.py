"""Many adapters on one base (``dj.named``): named adapters in one tree, switching between them, mixed
batches. The public face of three core modules: the storage layout (``core.named``: ``select``,
``adapter_names``, ...), adding and training one adapter of a tree (``core.inject``: ``attach``,
``own_leaves``, ``named_mask``; ``inject``/``trainable_mask``/``partition`` take ``name=``) and running
several at once (``core.mix``: ``adapt_many``, ``adapter_weights``). See ``core.named`` for the layout."""

from decomp_jax.core.inject import attach, named_mask, own_leaves
from decomp_jax.core.mix import adapt_many, adapter_weights
from decomp_jax.core.named import DEFAULT, SEP, adapter_names, has_named, select, stored_path

__all__ = ["DEFAULT", "SEP", "adapt_many", "adapter_names", "adapter_weights", "attach", "has_named", "named_mask",
           "own_leaves", "select", "stored_path"]
