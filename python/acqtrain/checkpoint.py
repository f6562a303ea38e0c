"""Atomic, rotating checkpoints with every RNG state, and careful loading.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
os.replace'd over its final name (and the directory fsync'ed), so a crash leaves either the old
set of files or the new one — never a half-written file under a checkpoint name. Loading a file
that torch.load cannot read (e.g. truncated by a full disk) is an error naming the file; when
resuming from a directory the newest readable checkpoint is used and skipped ones are reported.
"""
from __future__ import annotations

import glob
import os
import pickle
import random
import re
import sys
import tempfile

import numpy as np
import torch

from .errors import AcqError

FORMAT = "acq-checkpoint-v1"
_LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                         getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]
_NAME = re.compile(r"ckpt-epoch(\d+)\.pt$")


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:  # written before checkpoints became weights_only-loadable
        np.random.set_state(npy)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    """Replace a text file atomically (same temp-file / fsync / rename protocol as checkpoints)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(directory)


def checkpoint_path(directory: str, epoch: int) -> str:
    return os.path.join(directory, f"ckpt-epoch{epoch:04d}.pt")


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint files in `directory`, oldest first."""
    found = []
    for p in glob.glob(os.path.join(directory, "ckpt-epoch*.pt")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: str, epoch: int, state: dict, keep: int = 3) -> str:
    os.makedirs(directory, exist_ok=True)
    path = checkpoint_path(directory, epoch)
    atomic_save({"format": FORMAT, **state}, path)
    for old in list_checkpoints(directory)[:-keep]:
        os.unlink(old)
    return path


def _read(path: str) -> dict:
    # weights_only: a checkpoint holds tensors and plain Python values only, so loading one never runs
    # pickled code; the numpy globals admit the RNG state of checkpoints written before that was so
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AcqError(f"{path} is not an acq checkpoint (it holds Python objects that are not loaded: "
                       f"{str(exc).splitlines()[-1][:160]})") from None
    except Exception as exc:
        raise AcqError(f"checkpoint {path} is unreadable (truncated or corrupt: {type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise AcqError(f"{path} is not an acq checkpoint")
    return obj


def load_checkpoint(path: str) -> tuple[dict, str]:
    """(state, file) from a checkpoint file, or from the newest readable one in a directory."""
    if os.path.isdir(path):
        candidates = list_checkpoints(path) or list_checkpoints(os.path.join(path, "checkpoints"))
        if not candidates:
            raise AcqError(f"no checkpoints (ckpt-epoch*.pt) in {path}")
        errors = []
        for p in reversed(candidates):
            try:
                return _read(p), p
            except AcqError as exc:
                errors.append(str(exc))
                print(f"acq: skipping {exc}", file=sys.stderr)
        raise AcqError("; ".join(errors))
    if not os.path.isfile(path):
        raise AcqError(f"checkpoint not found: {path}")
    return _read(path), path


def check_config_matches(saved: dict, current: dict, path: str) -> None:
    # the teacher is identified by the hash of its weights (check_teacher), not by how its path was typed
    saved = {k: v for k, v in saved.items() if k != "teacher_weights"}
    current = {k: v for k, v in current.items() if k != "teacher_weights"}
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff[:6])
        raise AcqError(f"checkpoint {path} is from another configuration ({detail})")


def check_teacher(state: dict, teacher_sha256: str, teacher_name: str, path: str) -> None:
    """A resumed run must distil from the very teacher it started with (same weights, wherever the file is)."""
    saved = state.get("teacher_sha256")
    if saved is not None and saved != teacher_sha256:
        raise AcqError(f"teacher {teacher_name} has changed since checkpoint {path} was written "
                       f"(weights hash {teacher_sha256[:12]} vs {saved[:12]} in the checkpoint)")
