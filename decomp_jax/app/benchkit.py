"""What the benchmarks (``app.bench``, ``app.bench_decoder``) share: timing, peak memory (the device's
or the process's), XLA's memory estimate of a compiled step, the machine (allocator, PyTorch device,
whether torch and peft import), the timing noise of a ratio and a target's verdict, and number formats.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from decomp_jax.app.allocator import active


# ---------------------------------------------------------------------------------------------
# memory


def _hwm_path() -> Optional[str]:
    return "/proc/self/status" if sys.platform.startswith("linux") and os.path.exists("/proc/self/status") else None


def reset_peak() -> None:
    """Start a new peak-memory window where the OS allows it (Linux: reset VmHWM)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the device's peak where it reports one, else the process's peak RSS."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without the API
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    path = _hwm_path()
    if path:
        match = re.search(r"VmHWM:\s+(\d+)\s*kB", Path(path).read_text())
        if match:
            return int(match.group(1)) * 1024, "rss_hwm"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale, "rss_lifetime"


def tree_bytes(tree) -> int:
    """The bytes of a tree's arrays."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def xla_memory(compiled) -> Optional[int]:
    """XLA's estimate of a compiled step's memory: arguments + temporaries + outputs - aliased (donated)
    bytes (``memory_analysis``). Not its ``peak_memory_in_bytes``: on the CPU backend that leaves the
    temporaries (the activations and gradients) out. None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


# ---------------------------------------------------------------------------------------------
# timing and the machine


def time_calls(call: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """The seconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def allocator_name() -> str:
    """The memory allocator this process runs with (``app.allocator.active``)."""
    return active()


def peft_available() -> bool:
    """Whether torch and peft import."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_device() -> str:
    """``"cuda"`` when JAX runs on a GPU and torch sees one, else ``"cpu"``."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# targets and formats


def spread(*pairs) -> Optional[float]:
    """The timing noise of a ratio: the largest relative gap between median and min among the
    (median, min) pairs it is made of; None when a min is unknown."""
    if any(m is None or lo is None for m, lo in pairs):
        return None
    return max((m - lo) / m for m, lo in pairs)


def verdict(t: dict) -> str:
    """``PASS`` or ``FAIL`` for a target row; a failure by less than its timing noise says so."""
    if t["passed"]:
        return "PASS"
    noise = t.get("noise")
    if noise is not None and isinstance(t["value"], float) and t["value"] <= float(t["target"].split()[-1]) * (1 + noise):
        return f"FAIL (within timing noise {100 * noise:.0f}%)"
    return "FAIL"


def fmt_or_empty(x, spec=".3f") -> str:
    """``x`` formatted with ``spec``; ``""`` for None."""
    return "" if x is None else format(x, spec)


def xla_temp(compiled) -> Optional[int]:
    """The temporaries alone of ``xla_memory`` (activations, scores, gradients: what grows with the
    sequence), None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    return None if m is None else int(m.temp_size_in_bytes)


def mib(x: Optional[int]) -> str:
    """Bytes in MiB, no decimals; ``"?"`` for None."""
    return "?" if x is None else f"{x / 2**20:.0f}"


def write_json_and_markdown(result: dict, out_dir, stem: str, text: str) -> dict:
    """``{stem}.json`` (``result``) and ``{stem}.md`` (``text``) in ``out_dir`` (created): ``{"json": path, "md": path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(text)
    return paths
