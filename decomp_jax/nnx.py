"""Flax NNX models (``decomp_jax.nnx``): an adapter injected into an NNX model object, in place, run in
factored execution; the public face of ``core.nnx``."""

from decomp_jax.core.nnx import (
    SUPPORTED, AdapterBuffer, AdapterParam, adapted_class, inject, kernel_view, merge, resolved_config,
)

__all__ = ["AdapterBuffer", "AdapterParam", "SUPPORTED", "adapted_class", "inject", "kernel_view", "merge",
           "resolved_config"]
