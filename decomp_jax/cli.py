"""Moved to ``decomp_jax.app.cli`` (this alias of the old path goes in the next release)."""

if __name__ == "__main__":  # python -m decomp_jax.cli
    from decomp_jax.app.cli import main

    raise SystemExit(main())

from decomp_jax.moved import redirect  # noqa: E402

redirect(__name__)
