"""Output locations checked before any work: a run must not train for hours and then fail to write."""
from __future__ import annotations

import os

from .errors import AcqError


def check_output_dir(path: str, flag: str) -> None:
    """AcqError unless `path` is a directory, or can be created, where this process can write. Nothing is
    created here (the first write creates it)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise AcqError(f"{flag} {path} exists and is not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise AcqError(f"{flag} {path} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise AcqError(f"{flag} {path} is not writable ({probe} is not writable by this user)")
