"""Moved to ``decomp_jax.app.runs`` (this alias of the old path goes in the next release)."""

from decomp_jax.moved import redirect

redirect(__name__)
