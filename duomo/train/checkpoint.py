"""Training checkpoints: the full state needed to resume exactly, written atomically, read safely.

A checkpoint is one `torch.save` file of plain containers and tensors (no pickled classes), so it loads with
`torch.load(weights_only=True)`. Besides model, optimiser, scheduler and GradScaler it holds the step, the
data position (epoch, micro-batch within the epoch) and every rank's Python, NumPy and torch RNG states.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duomo.errors import CheckpointError
from duomo.io.files import atomic_write

FORMAT, VERSION = "duomo-train", 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss), "kind": kind},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states `rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate wants nested tuples; some serialisers hand lists back."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_path(out: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` goes: OUT/checkpoints/step-00000100.pt."""
    return Path(out) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The step-N.pt files of a folder (or of its checkpoints/ subfolder), oldest first."""
    folder = Path(folder)
    if (folder / CHECKPOINT_DIR).is_dir():
        folder = folder / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, out: str | Path) -> Path | None:
    """The checkpoint `resume` names: a file, a run folder (its newest), or "latest" (the newest in `out`).

    "latest" with no checkpoint yet returns None (start fresh), so a preemptible job can always pass it.
    """
    if resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
        raise CheckpointError(f"no step-N.pt checkpoints in {path}")
    raise CheckpointError(f"resume checkpoint {path} does not exist (use --resume latest to pick the newest)")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training state atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, "version": VERSION, **state}, tmp))
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training state with `torch.load(weights_only=True)`, onto the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, or a pickled object weights_only refuses
        raise CheckpointError(f"{path} is not a readable duomo training checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a duomo training checkpoint (a model checkpoint? use --pretrained)"
        )
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer duomo (version {state['version']}); upgrade duomo"
        )
    return state


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0 keeps all)."""
    if keep > 0:
        for path in list_checkpoints(out)[:-keep]:
            path.unlink(missing_ok=True)
            shards = path.with_suffix(".dcp")  # a sharded (FSDP) checkpoint's folder
            if shards.is_dir():
                import shutil

                shutil.rmtree(shards, ignore_errors=True)
