"""Floor 6, the application behind ``decomp-jax``: experiment configs and runs, run folders (restore,
merge, export, import), sweeps and their reports, the benchmarks, the allocator, and ``cli``.

May import: every lower floor. Only ``cli`` imports our modules inside functions (start-up time).
"""
