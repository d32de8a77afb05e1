"""Nothing lost, nothing silent: atomic writes and non-finite checks shared by the runner,
the exporters and the checkpoints.

- ``atomic_write_text`` / ``atomic_write_bytes`` / ``atomic_save_safetensors``: the file is
  written to a temporary name in the same folder and renamed over the target, so a crash or a
  failed serialisation leaves the previous file intact (never a truncated one).
- ``atomic_folder(out_dir)``: a context manager that yields a temporary sibling folder to write
  into; on success it replaces ``out_dir`` by it (an existing ``out_dir`` is moved aside first
  and removed only after the rename), on failure it removes the temporary folder, so ``out_dir``
  is either the old folder, untouched, or the complete new one, and a failed command leaves no
  empty folder behind.
- ``nonfinite_leaves(tree)`` / ``check_finite(tree, what, fix)``: the '/'-joined paths of leaves
  holding NaN or inf, and a ``NonFiniteError`` naming them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np


class NonFiniteError(FloatingPointError):
    """NaN or inf where a finite value is needed; the message names the leaves and the fix."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A new empty file beside ``path`` with the permissions a plain ``open(path, "w")`` gives
    (``mkstemp`` makes it private)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


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


def atomic_save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file`` through a temporary file: a failure leaves ``path`` as it was."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, ".safetensors")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``safetensors.numpy.load_file`` whose errors name the file (a truncated or foreign file
    otherwise fails with a bare header message)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())}); "
                         f"it is damaged or was not written by safetensors: write it again.") from err


@contextlib.contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; when the block succeeds it becomes ``out_dir``.

    Files already in an existing ``out_dir`` are not carried over: the folder is replaced whole,
    as an export or a merged model is one unit. When the block raises, ``out_dir`` is untouched
    (or still absent) and the temporary folder is removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another output path.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it (mkdtemp makes it private)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
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
