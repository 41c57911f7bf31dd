"""Output paths checked before any work: a command never computes for minutes and then fails to write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from duomo.errors import InputError


def check_out_dir(out: Path, keep: bool) -> None:
    """`out` may be written: an empty or new folder (or, with `keep`, an existing one) on a writable disk."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not keep:
        raise InputError(
            f"{out} exists and is not empty; pass --overwrite or --resume latest, or choose another folder"
        )
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"cannot write to {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}: permission denied; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to {parent}: {exc.strerror or exc}; choose another --out") from exc


def check_out_file(out: Path) -> None:
    """`out` may be written as a file: not a folder, and its folder (or the nearest existing parent) is
    a writable folder."""
    if out.is_dir():
        raise InputError(f"{out} is a folder; give a file name")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent}: permission denied; choose another output")
