"""Many processes (hosts) on one job: JAX's own ``jax.distributed`` runtime, wrapped with clear errors.

One process per host (or per GPU group) runs the same command; ``initialize`` connects them through
the coordinator (process 0), after which ``jax.devices()`` lists every process's devices and a
``Mesh`` over them spans the hosts. The rest of decomp_jax works unchanged on the resulting global
arrays; this module adds the few host-side helpers that multi-process code needs:

- ``to_host(tree)``: NumPy copies of arrays that may span other processes' devices (a collective:
  every process calls it); ``is_primary()``: process 0, the one that prints and writes files;
  ``barrier(name)``: wait for every process.
- ``process_rows`` / ``global_batch``: each process builds only its own rows of a global batch and
  ``jax.make_array_from_process_local_data`` assembles the global array.

Failure behaviour: when a process dies, the others stop too, within ``heartbeat_timeout`` seconds
(JAX's coordination service terminates them; on CPU, gloo's collectives fail at once). Neither says
clearly which process died, and a process that JAX aborts cannot print anything more. So
``supervise`` (what ``decomp-jax train`` does with several processes) runs the training in a child
process and keeps a heartbeat file per process in ``output_dir/.processes``; when its child stops
abnormally it reads the others' heartbeats and names the process that died first. A coordinator
that cannot be reached within ``init_timeout`` seconds is reported by name here, before JAX would
abort the process.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress as _suppress
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from decomp_jax.errors import ConfigError

HEARTBEAT_TIMEOUT = 30  # seconds without a heartbeat before a process counts as dead (JAX's default: 100)
INIT_TIMEOUT = 300  # seconds to wait for the coordinator and every process to join

ENV = {"coordinator": "DECOMP_JAX_COORDINATOR", "num_processes": "DECOMP_JAX_NUM_PROCESSES",
       "process_id": "DECOMP_JAX_PROCESS_ID"}


class DistributedError(ConfigError):
    """The processes of a multi-process job could not be connected; the message says why and what to do."""


def settings(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
             process_id: Optional[int] = None) -> Optional[dict]:
    """The explicit multi-process settings from the arguments, else the ``DECOMP_JAX_*`` environment
    variables (``ENV``); None when neither names any (one process, or JAX's auto-detection)."""
    values = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV.items():
        if values[key] is None and os.environ.get(var):
            values[key] = os.environ[var]
    if all(v is None for v in values.values()):
        return None
    missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k, v in values.items() if v is None]
    if missing:
        raise DistributedError(f"A multi-process run needs --coordinator HOST:PORT, --num-processes N and --process-id I "
                               f"together; missing {', '.join(missing)}.")
    try:
        n, i = int(values["num_processes"]), int(values["process_id"])
    except ValueError:
        raise DistributedError(f"--num-processes and --process-id are integers, got {values['num_processes']!r} and "
                               f"{values['process_id']!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {i}.")
    address = str(values["coordinator"])
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234, the address of "
                               f"process 0's host and a free port).")
    return {"coordinator": address, "num_processes": n, "process_id": i}


def _wait_for_coordinator(address: str, timeout: float, process_id: int) -> None:
    """Return once a TCP connection to ``address`` succeeds; raise ``DistributedError`` after ``timeout``."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"Process {process_id} could not reach the coordinator at {address} within {timeout:.0f} s "
                    f"({err.strerror or err}). Start process 0 (--process-id 0) on that host, check the address "
                    f"and port, or raise --init-timeout.") from None
            time.sleep(0.2)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False, init_timeout: float = INIT_TIMEOUT,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> bool:
    """Connect this process to the others (``jax.distributed.initialize``); call it before any JAX
    computation. Explicit settings come from the arguments or ``DECOMP_JAX_*`` variables; ``auto``
    lets JAX detect them (Cloud TPU pods, SLURM, Open MPI, Kubernetes; ``JAX_COORDINATOR_ADDRESS``).
    Returns False (nothing done) for a single process. On CPU the collectives use gloo."""
    given = settings(coordinator, num_processes, process_id)
    if given is None and not auto:
        return False
    if given is not None and given["num_processes"] == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts (and tests); ignored on GPU/TPU
    kwargs = {"initialization_timeout": int(init_timeout), "heartbeat_timeout_seconds": int(heartbeat_timeout)}
    if given is None:
        try:
            jax.distributed.initialize(**kwargs)
        except (ValueError, RuntimeError) as err:
            raise DistributedError(f"--distributed: JAX found no cluster to join ({' '.join(str(err).split())}). "
                                   f"Outside TPU pods, SLURM, Open MPI and Kubernetes, give --coordinator HOST:PORT "
                                   f"--num-processes N --process-id I.") from err
        return True
    if given["process_id"] != 0:  # JAX aborts the process when registration times out: check first
        _wait_for_coordinator(given["coordinator"], init_timeout, given["process_id"])
    else:
        _check_port_free(given["coordinator"])
    jax.distributed.initialize(given["coordinator"], given["num_processes"], given["process_id"], **kwargs)
    return True


def _check_port_free(address: str) -> None:
    port = int(address.rpartition(":")[2])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the coordinator's server does
        try:
            s.bind(("", port))
        except OSError as err:
            raise DistributedError(f"Process 0 cannot serve as coordinator on port {port}: {err.strerror or err}. "
                                   f"Choose a free port in --coordinator (another job may hold this one).") from None


def is_primary() -> bool:
    """True on process 0 (the process that prints progress and writes run files)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _needs_gather(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated


def to_host(tree) -> Any:
    """NumPy copies of ``tree``'s leaves. Arrays sharded over other processes' devices are gathered
    (``multihost_utils.process_allgather``): with several processes every process must call this."""
    leaves, treedef = jax.tree.flatten(tree)
    if any(_needs_gather(x) for x in leaves):
        from jax.experimental import multihost_utils

        leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) if _needs_gather(x) else x
                  for x in leaves]
    return jax.tree.unflatten(treedef, [np.asarray(x) for x in jax.device_get(leaves)])


def process_rows(size: int, sharding) -> slice:
    """The contiguous rows of a leading axis of ``size`` that this process's devices hold under
    ``sharding`` (the whole axis with one process)."""
    index = sharding.addressable_devices_indices_map((size,))
    starts = sorted({(s[0].start or 0, size if s[0].stop is None else s[0].stop) for s in index.values()})
    lo, hi = starts[0][0], max(stop for _, stop in starts)
    covered = sum(stop - start for start, stop in starts)
    if covered != hi - lo:
        raise ValueError(f"This process's devices hold non-contiguous rows {starts} of a batch of {size}; build the "
                         f"mesh with jax.make_mesh (devices grouped by process).")
    return slice(lo, hi)


def global_batch(local: dict, sharding, size: int) -> dict:
    """Global arrays of a batch of ``size`` rows (leading axis split by ``sharding``) from this process's
    rows ``local`` (see ``process_rows``)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (size,) + np.shape(v)[1:])
            for k, v in local.items()}


# --- supervision: naming the process that died --------------------------------------------------------

CHILD_ENV = "DECOMP_JAX_SUPERVISED"  # set in the child that trains
BEAT_S = 0.5  # seconds between heartbeats


def _die_with_parent() -> None:  # the child ends when its supervisor is killed (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_beat(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_beats(folder: Path) -> dict[str, dict]:
    beats = {}
    for path in folder.glob("*.json"):
        try:
            beats[path.stem] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
    return beats


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def supervise(argv: Sequence[str], out_dir: str | os.PathLike, process_id: Optional[int]) -> int:
    """Run ``decomp-jax *argv`` (this process's share of a multi-process job) in a child process,
    keep this process's heartbeat in ``out_dir/.processes/I.json`` while it runs, and when it stops
    abnormally name the process of the job that stopped first. Returns the child's exit status
    (2 after a failure this function explains). ``process_id`` None (JAX detects it): the heartbeat
    is named by host and pid."""
    folder = Path(out_dir) / ".processes"
    created = not Path(out_dir).exists()
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    label = str(process_id) if process_id is not None else f"{host}-{os.getpid()}"
    mine = folder / f"{label}.json"
    child = subprocess.Popen([sys.executable, "-m", "decomp_jax.app.cli", *argv], env={**os.environ, CHILD_ENV: "1"},
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            _write_beat(mine, {"pid": child.pid, "host": host, "time": time.time()})
            stop.wait(BEAT_S)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    forwarded = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        stop.set()
        thread.join()
    ended = time.time()
    _write_beat(mine, {"pid": child.pid, "host": host, "time": ended, "exit": code})

    def clean_up():
        mine.unlink(missing_ok=True)
        with _suppress(OSError):
            folder.rmdir()  # the last process to finish removes the folder
            if created:
                Path(out_dir).rmdir()  # (only when empty: a run that failed before writing anything)

    if code == 0:
        clean_up()
        return 0
    before = _read_beats(folder)
    time.sleep(3 * BEAT_S)  # a live peer beats meanwhile; a dead one does not
    after = _read_beats(folder)
    silent = sorted(i for i, b in after.items() if i != label and "exit" not in b
                    and before.get(i, {}).get("time") == b.get("time"))
    exited = sorted((b["time"], i) for i, b in after.items() if i != label and b.get("exit") not in (None, 0))
    first = exited[0] if exited and exited[0][0] <= ended else None
    if silent:
        who = "; ".join(f"process {i} (pid {after[i]['pid']} on {after[i]['host']}) stopped sending heartbeats "
                        f"{ended - after[i]['time']:.1f} s before" for i in silent)
        cause = f"a peer died: {who}"
    elif first is not None:
        i = first[1]
        cause = f"process {i} (pid {after[i]['pid']} on {after[i]['host']}) {_exit_text(after[i]['exit'])} first"
    elif code == 2:  # the child's own one-line error said it all
        clean_up()
        return 2
    else:
        cause = "no other process had stopped before it (see the messages above)"
    kept = Path(out_dir) / "checkpoints"
    advice = (f"Checkpoints already written in {kept} are kept: start every process again with --resume."
              if kept.is_dir() and any(p.name.isdigit() for p in kept.iterdir()) else "No checkpoint was written yet.")
    print(f"decomp-jax: error: process {label}'s training {_exit_text(code)}; {cause}. {advice}",
          file=sys.stderr, flush=True)
    return 2


__all__ = ["DistributedError", "ENV", "HEARTBEAT_TIMEOUT", "INIT_TIMEOUT", "barrier", "global_batch", "initialize",
           "is_primary", "process_rows", "settings", "supervise", "to_host"]
