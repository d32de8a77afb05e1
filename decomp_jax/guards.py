"""Nothing lost, nothing silent: atomic writes, output folders, run locks, checksums, file errors
and non-finite checks shared by the runner, the exporters and the checkpoints.

- ``atomic_write_text`` / ``atomic_write_bytes`` / ``atomic_save_safetensors``: the file is
  written to a temporary name in the same folder and renamed over the target, so a crash or a
  failed serialisation leaves the previous file intact (never a truncated one).
- ``atomic_folder(out_dir, ours=..., overwrite=...)``: a context manager that yields a temporary
  sibling folder to write into; on success it replaces ``out_dir`` by it, so ``out_dir`` is either
  the old folder, untouched, or the complete new one. It replaces only a folder that is absent,
  empty, or holds nothing but what the same writer wrote before (``ours``); anything else (a run
  folder, a folder of runs, the current directory, the user's own files) is refused with
  ``OutputExistsError``, or with ``overwrite=True`` the new files are moved into it and its other
  files are kept. Nothing it did not create is ever deleted.
- Temporary names carry the writer's pid and host (``.NAME.PID@HOST.XXXX.tmp``); the next writer of
  the same target removes those whose process is gone (a writer killed with SIGKILL leaves them).
- ``folder_lock(folder)``: one exclusive lock per run folder (``.decomp_jax.lock``, an ``flock`` that
  the kernel releases when its process dies) holding the holder's pid, host, start time and command;
  a second holder is refused naming them (``FolderInUseError``), a lock left by a dead process is
  taken over with a warning.
- Checksums: ``atomic_save_safetensors`` records a SHA-256 of the tensors (names, dtypes, shapes,
  bytes) in the file's metadata; ``load_safetensors`` verifies it (``ChecksumError`` names the file).
- ``read_text`` / ``read_json``: a file that is not UTF-8 or not valid JSON raises a
  ``FileFormatError`` naming the file, the line and what to do.
- ``nonfinite_leaves(tree)`` / ``check_finite(tree, what, fix)``: the '/'-joined paths of leaves
  holding NaN or inf, and a ``NonFiniteError`` naming them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np


class NonFiniteError(FloatingPointError):
    """NaN or inf where a finite value is needed; the message names the leaves and the fix."""


class OutputExistsError(FileExistsError):
    """An output folder holds something its writer did not write; the message names it and the fix."""


class FolderInUseError(OSError):
    """Another live process holds a run folder's lock; the message names it."""


class UnwritableFolderError(OSError):
    """A folder that cannot be created or written; the message names it and the setting to change."""


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be (not UTF-8, not JSON, truncated, ...); the
    message names the file and the fix."""


class ChecksumError(FileFormatError):
    """A file's contents do not match the checksum written with them."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- temporary names that say whose they are -------------------------------------------------------

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _owner() -> str:
    """``PID@HOST``: who writes a temporary file or folder."""
    return f"{os.getpid()}@{_host()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _temporaries(target: Path) -> Iterator[tuple[Path, int, str, str]]:
    """``(path, pid, host, kind)`` of the temporary files and folders that writers of ``target``
    left beside it (``kind``: ``tmp``, being written; ``old``, the previous target moved aside)."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)@([A-Za-z0-9_-]+)\..*\.(tmp|old)$")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match:
            yield entry, int(match.group(1)), match.group(2), match.group(3)


_TEMPORARY = re.compile(r"^\..+\.\d+@[A-Za-z0-9_-]+\..*\.(tmp|old)$")


def _is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporary files or folders our writers make (``_tmp_sibling``)."""
    return _TEMPORARY.match(name) is not None


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders beside ``target`` left by writers of this host whose
    process is gone (killed mid-write); a previous ``target`` a killed writer had moved aside and not
    replaced is put back. Returns what was removed."""
    target = Path(target)
    removed = []
    for path, pid, host, kind in _temporaries(target):
        if host != _host() or pid == os.getpid() or pid_alive(pid):
            continue
        if kind == "old" and not target.exists() and not os.path.lexists(target):
            os.replace(path, target)  # killed between moving the old folder aside and renaming the new one
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A new empty file beside ``path`` with the permissions a plain ``open(path, "w")`` gives
    (``mkstemp`` makes it private), named after its writer."""
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


# --- atomic files ----------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


CHECKSUM_KEY = "decomp_jax_sha256"  # in a safetensors file's metadata


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: each name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def atomic_save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file`` through a temporary file (a failure leaves ``path`` as it was),
    with the tensors' SHA-256 in the metadata (``CHECKSUM_KEY``) for ``load_safetensors`` to verify."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(arrays)}
    tmp = _tmp_sibling(path, ".safetensors")
    try:
        save_file(arrays, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # (safetensors writes a new file: the mode of open(path, "w"))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (``{}`` when it has none)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise ValueError(f"header size {size}")
        return dict(json.loads(fh.read(size)).get("__metadata__") or {})


def load_safetensors(path: str | os.PathLike, fix: str = "write it again") -> dict[str, np.ndarray]:
    """``safetensors.numpy.load_file`` whose errors name the file (a truncated or foreign file
    otherwise fails with a bare header message); a file written by ``atomic_save_safetensors`` is
    checked against its checksum (``ChecksumError``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
        meta = safetensors_metadata(path)
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise FileFormatError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())}); "
                              f"it is damaged or was not written by safetensors: {fix}.") from err
    saved = meta.get(CHECKSUM_KEY)
    if saved is not None and saved != tensors_sha256(tensors):
        raise ChecksumError(f"{path} is corrupted: its tensors do not match the checksum written with them "
                            f"(a changed byte on disk or in a copy); {fix}.")
    return tensors


# --- files that name themselves in their errors ----------------------------------------------------

def read_text(path: str | os.PathLike, fix: str = "re-save it as UTF-8", encoding: str = "utf-8") -> str:
    """The text of ``path``; bytes that are not ``encoding`` raise a ``FileFormatError`` naming the file,
    the line and the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FileFormatError(f"{path} is not {encoding.upper().replace('-SIG', '')} text: byte 0x{data[err.start]:02x} "
                              f"at offset {err.start} (line {line}) cannot be decoded; {fix}.") from None


def read_json(path: str | os.PathLike, fix: str = "write it again") -> Any:
    """The JSON value in ``path``; a file that is not UTF-8 or not JSON raises a ``FileFormatError``
    naming the file, the line and column, and ``fix``."""
    text = read_text(path, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                              f"{fix}.") from None


# --- output folders --------------------------------------------------------------------------------

RUN_FILES = ("checkpoints", "metrics.json", "metrics.jsonl", "adapter.safetensors")  # what marks a run folder
LOCK_NAME = ".decomp_jax.lock"


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a training run's folder (``decomp-jax train``'s output_dir)."""
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES + (LOCK_NAME,))


def manifest_files(folder: Path, manifest: str) -> set[str]:
    """The entries a writer recorded in its ``manifest`` JSON (``{"files": [...]}``) in ``folder``, and the
    manifest itself; empty when there is none (then nothing in the folder counts as the writer's)."""
    try:
        files = json.loads((folder / manifest).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {*files, manifest} if isinstance(files, list) else set()


def write_manifest(folder: Path, manifest: str, info: Mapping[str, Any]) -> dict:
    """Write ``info`` with the list of ``folder``'s entries (``"files"``) as the JSON file ``manifest``: what
    ``manifest_files`` reads back, so that a later run of the same writer may replace them. Returns it."""
    record = {**info, "files": sorted(p.name for p in Path(folder).iterdir() if p.name != manifest)}
    atomic_write_text(Path(folder) / manifest, json.dumps(record, indent=2))
    return record


def _refusal(out_dir: Path, foreign: list[str]) -> Optional[str]:
    """Why ``out_dir`` (holding the entries ``foreign`` that its writer did not write) must not be
    replaced, in words."""
    here = Path.cwd().resolve()
    resolved = out_dir.resolve()
    if resolved == here or resolved in here.parents:
        return "is the current directory" if resolved == here else f"holds the current directory ({here})"
    if not foreign:
        return None
    if is_run_folder(out_dir):
        return "is a training run's folder (" + ", ".join(n for n in RUN_FILES if (out_dir / n).exists()) + ")"
    runs = sorted(name for name in foreign if is_run_folder(out_dir / name))
    if runs:
        return f"holds run folders ({', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''})"
    return f"holds files it did not write ({', '.join(sorted(foreign)[:5])}{' ...' if len(foreign) > 5 else ''})"


def check_output_folder(out_dir: str | os.PathLike, *, ours: Optional[Callable[[Path], set[str]]] = None,
                        overwrite: bool = False, writer: str = "this command") -> bool:
    """``atomic_folder``'s check, for a command to make before its slow work: raises ``OutputExistsError``
    when ``out_dir`` must not be replaced (and not ``overwrite``); returns whether the output will be
    written into the existing folder (``overwrite`` of a folder holding other entries)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder; choose another output path.")
    entries = sorted(p.name for p in out_dir.iterdir() if not _is_temporary(p.name)) if out_dir.is_dir() else []
    mine = ours(out_dir) if (ours is not None and entries) else set()
    why = _refusal(out_dir, [e for e in entries if e not in mine])
    if why is not None and not overwrite:
        raise OutputExistsError(f"{out_dir} {why}; {writer} writes a folder of its own and would replace it. Write to "
                                f"a new or empty folder, or pass --overwrite to write into this one (files of the "
                                f"same names are replaced, the others kept).")
    return why is not None


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, ours: Optional[Callable[[Path], set[str]]] = None,
                  overwrite: bool = False, writer: str = "this command") -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; when the block succeeds it becomes ``out_dir``.

    ``ours(out_dir)``: the entries of an existing ``out_dir`` that an earlier run of the same writer
    wrote. A folder that holds only those (or nothing) is replaced whole, as an export or a merged
    model is one unit. Anything else (a run folder, a folder of runs, the current directory or the
    user's own files) is refused with ``OutputExistsError`` before anything is written, unless
    ``overwrite``: then each new entry is moved into ``out_dir`` (replacing one of the same name) and
    the folder's other entries are kept. When the block raises, ``out_dir`` is untouched (or still
    absent) and the temporary folder is removed.
    """
    out_dir = Path(out_dir)
    into = check_output_folder(out_dir, ours=ours, overwrite=overwrite, writer=writer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_owner()}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it (mkdtemp makes it private)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if into:
        _move_into(tmp, out_dir)
        return
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_owner()}.", suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _move_into(tmp: Path, out_dir: Path) -> None:
    """Move every entry of ``tmp`` into the existing folder ``out_dir`` (an entry of the same name is
    replaced), then remove ``tmp``."""
    try:
        for entry in sorted(tmp.iterdir()):
            target = out_dir / entry.name
            old = None
            if target.is_dir() and not target.is_symlink():  # a folder is not replaced by a rename: set it aside
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_owner()}.", suffix=".old", dir=out_dir))
                os.rmdir(old)
                os.replace(target, old)
            os.replace(entry, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- interrupts ------------------------------------------------------------------------------------

@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block has ended, then act on the first one as it would
    have been acted on (``KeyboardInterrupt``, or the process's own handler): a checkpoint being written
    is finished, and no writer thread is left behind mid-file. Off the main thread: no effect."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if received:
        handler = previous[received[0]]
        if callable(handler):
            handler(received[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), received[0])


# --- one run per folder ----------------------------------------------------------------------------

def _holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        value = json.loads(text) if text.strip() else {}
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def lock_holder(folder: str | os.PathLike) -> Optional[dict]:
    """The holder (``pid``, ``host``, ``started``, ``command``) of ``folder``'s lock when a live process
    holds it, else None."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd) or {"pid": "?"}
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "train.output_dir") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) for the block: a second process is
    refused with ``FolderInUseError`` naming the holder; the lock of a process that died is taken over
    (a warning names it). ``what`` names the setting to change in the refusal."""
    import fcntl

    folder = Path(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as err:
            raise UnwritableFolderError(f"{what}={str(folder)!r} cannot be created or written ({type(err).__name__}: "
                                        f"{err.strerror or err}); choose a folder you can write.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUseError(f"{folder} is in use by another run: {_describe(holder)}. Wait for it to finish, "
                                   f"or choose another {what}.") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # its last holder may have removed the file between our open and flock: lock the one in place
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            warnings.warn(f"took over the lock of {folder} left by {_describe(previous)}, which is no longer running.",
                          stacklevel=3)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300] if sys.argv else ""}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield path
    finally:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
        except OSError:
            pass
        os.close(fd)


# --- non-finite values -----------------------------------------------------------------------------

def nonfinite_leaves(tree) -> list[str]:
    """'/'-joined paths of the leaves of ``tree`` (nested dicts, arrays) that hold NaN or inf."""
    import jax

    bad = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.asarray(jax.device_get(leaf))
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad.append("/".join(_key_name(k) for k in keys))
    return bad


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def check_finite(tree, what: str, fix: str) -> None:
    """Raise ``NonFiniteError`` naming the non-finite leaves of ``tree``: ``what`` says whose
    leaves they are (``"the adapter of runs/x at step 40"``), ``fix`` what to do."""
    bad = nonfinite_leaves(tree)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{what} holds NaN or inf in {len(bad)} leaves ({shown}); {fix}")
