"""The package's version (``decomp_jax.__version__``, ``decomp-jax --version``; pyproject.toml holds the same)."""

VERSION = "0.2.0"
