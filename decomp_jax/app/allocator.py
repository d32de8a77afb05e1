"""The host memory allocator of ``decomp-jax``'s compute commands (train, eval, bench, merge).

XLA:CPU takes a compiled step's temporary buffer (the activations and gradients: 2.2 GiB for a LoRA
step of SmolLM2-135M at 4 x 256 tokens) from the process's allocator at every execution and gives it
back at the end; glibc's malloc returns a block that large to the kernel at once, so the next step
page-faults all of it again (~600,000 minor faults a step, measured with ``getrusage``), and its
``MALLOC_*`` settings do not change that. jemalloc without its separate arena for large blocks
(``oversize_threshold:0``, whose pages it purges at once) keeps freed pages for its usual ten seconds
(``dirty_decay_ms``) and hands them to the next step: 0.01-0.1 GiB of faults a step instead of 2.2-2.4,
and the step 0.85-0.9x as long on this CPU (SmolLM2 at 4 x 256: LoRA 4.05 -> 3.44 s, full fine-tuning
5.0 -> 4.5 s). Memory a step stops using is still returned after those ten seconds (never purging at
all, ``dirty_decay_ms:-1``, was as fast but ran the interleaved decoder bench out of memory).

A process chooses its allocator when it starts, so the command line re-executes itself once with
jemalloc in ``LD_PRELOAD`` when ``find_jemalloc`` finds the library (Debian/Ubuntu: ``apt install
libjemalloc2``; or ``DECOMP_JAX_JEMALLOC=/path/libjemalloc.so.2``) and it is not loaded yet. Same PID
(``exec``), same arguments. ``DECOMP_JAX_ALLOCATOR=system`` keeps the system allocator. A
``MALLOC_CONF`` you set is kept as it is. Library use (``import decomp_jax``) is unaffected: preload
jemalloc yourself (``LD_PRELOAD=... MALLOC_CONF=oversize_threshold:0,background_thread:true python ...``).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

ENV_CHOICE = "DECOMP_JAX_ALLOCATOR"  # "system": do not switch
ENV_PATH = "DECOMP_JAX_JEMALLOC"  # the library's path, where it is not in a standard place
ENV_DONE = "DECOMP_JAX_REEXEC"  # set in the re-executed process: never loop
CONF = "oversize_threshold:0,background_thread:true"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/opt/homebrew/lib/libjemalloc.2.dylib",
)


def find_jemalloc(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The jemalloc shared library to preload: ``$DECOMP_JAX_JEMALLOC`` when it names a file, else the
    first of ``CANDIDATES`` that exists; None when there is none (or on a system without ``LD_PRELOAD``)."""
    env = os.environ if env is None else env
    given = env.get(ENV_PATH)
    if given:
        return given if os.path.isfile(given) else None
    if not sys.platform.startswith("linux"):
        return None
    return next((path for path in CANDIDATES if os.path.isfile(path)), None)


def active() -> str:
    """``"jemalloc"`` when it is loaded in this process, else ``"system"``."""
    try:
        with open("/proc/self/maps") as maps:
            return "jemalloc" if "libjemalloc" in maps.read() else "system"
    except OSError:
        return "system"


def jemalloc_env(env: Mapping[str, str], library: str) -> dict:
    """``env`` with ``library`` first in ``LD_PRELOAD`` and our ``MALLOC_CONF`` (unless one is set),
    marked as re-executed."""
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    out["LD_PRELOAD"] = " ".join([library] + [p for p in preload if p != library])
    out.setdefault("MALLOC_CONF", CONF)
    out[ENV_DONE] = "1"
    return out


def maybe_reexec(argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` (program first) running under jemalloc, when it is found, not
    loaded yet, not refused (``DECOMP_JAX_ALLOCATOR=system``) and this process is not itself the
    re-executed one. Returns (doing nothing) otherwise."""
    if os.environ.get(ENV_CHOICE, "").lower() == "system" or os.environ.get(ENV_DONE) or active() == "jemalloc":
        return
    library = find_jemalloc()
    if library is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], list(argv), jemalloc_env(os.environ, library))


__all__ = ["active", "find_jemalloc", "jemalloc_env", "maybe_reexec"]
