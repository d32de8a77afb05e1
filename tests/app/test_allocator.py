"""The compute commands' allocator switch (decomp_jax.app.allocator): jemalloc where it is installed."""

import os
import subprocess
import sys

from decomp_jax.app import allocator

PRINT_ACTIVE = "from decomp_jax.app import allocator; print(allocator.active())"


def _run(code, **env):
    base = {k: v for k, v in os.environ.items() if k != allocator.ENV_CHOICE}  # conftest sets it for the CLI tests
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**base, **env}).stdout.splitlines()


def test_jemalloc_env_prepends_the_library_and_keeps_the_users_settings():
    env = allocator.jemalloc_env({"LD_PRELOAD": "/x/liba.so:/lib/jm.so", "PATH": "/bin"}, "/lib/jm.so")
    assert env["LD_PRELOAD"] == "/lib/jm.so /x/liba.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == "oversize_threshold:0,background_thread:true" and env[allocator.ENV_DONE] == "1"
    assert allocator.jemalloc_env({"MALLOC_CONF": "narenas:2"}, "/lib/jm.so")["MALLOC_CONF"] == "narenas:2"
    assert allocator.find_jemalloc({allocator.ENV_PATH: "/nonexistent/libjemalloc.so.2"}) is None


def test_reexec_runs_the_program_under_jemalloc_when_installed_and_never_when_refused():
    """The re-executed program has jemalloc loaded where the library is found (this machine: Debian's
    libjemalloc2 when installed), else the system allocator; DECOMP_JAX_ALLOCATOR=system keeps it."""
    code = ("import sys; from decomp_jax.app import allocator; "
            f"allocator.maybe_reexec([sys.executable, '-c', {PRINT_ACTIVE!r}]); print('not re-executed')")
    expected = ["jemalloc"] if allocator.find_jemalloc() else ["not re-executed"]
    assert _run(code) == expected
    assert _run(code, DECOMP_JAX_ALLOCATOR="system") == ["not re-executed"]
    assert _run(code, DECOMP_JAX_REEXEC="1") == ["not re-executed"]  # the re-executed process never loops
