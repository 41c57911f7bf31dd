"""Safe reading and atomic writing of weight files: safetensors or `torch.load(weights_only=True)`."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from duomo.errors import CheckpointError
from duomo.limits import MAX_ZIP_RATIO

StateDict = dict[str, torch.Tensor]
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Training wrappers: OpenCLIP writes {"epoch", "name", "state_dict", "optimizer"}; others use "model".
WRAPPER_KEYS = ("state_dict", "model", "module")


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a `torch.jit.save` archive: a zip holding `constants.pkl` or `code/` beside `data.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names)


def clean_state_dict(obj: Any, source: str = "checkpoint") -> StateDict:
    """Unwrap `{"state_dict": ...}` training checkpoints and strip DDP `module.` prefixes."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict of named tensors")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. OpenCLIP's "epoch" beside the weights when no wrapper key matched
        key = str(key)
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    if not out:
        raise CheckpointError(f"{source} holds no tensors; is it a model checkpoint?")
    return out


def check_zip_entries(path: str | os.PathLike) -> None:
    """Refuse a zip (torch or TorchScript checkpoint) with an entry that would decompress to more than
    MAX_ZIP_RATIO times its stored size: torch writes entries uncompressed, so such an entry is a bomb, and
    it would be inflated whole before any tensor is checked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is a damaged zip archive ({exc}); download it again") from exc
    for info in infos:
        stored = max(info.compress_size, 1)
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_ZIP_RATIO * stored + (1 << 20):
            raise CheckpointError(
                f"{path}: entry {info.filename!r} would inflate from {info.compress_size:,} to "
                f"{info.file_size:,} bytes; refusing a checkpoint that compresses this well (a zip bomb?)"
            )


def check_tensor_storage(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse tensors that claim more elements than their storage holds (a stride-0 or overlapping view of
    a small storage, which `.contiguous()` would expand to any size)."""
    for name, tensor in sd.items():
        needed = tensor.numel() * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if needed > held:
            raise CheckpointError(
                f"{source}: tensor {name!r} of shape {tuple(tensor.shape)} needs {needed:,} bytes but its "
                f"data holds {held:,} (a strided view); re-save the state dict with contiguous tensors"
            )


def load_weights(path: str | os.PathLike) -> StateDict:
    """Read a .safetensors file or a torch state dict (weights only) into a cleaned flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        try:
            return clean_state_dict(load_file(str(path)), str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}); it may be truncated: download it again"
            ) from exc
    if is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript archive; read it with duomo.io.read_torchscript")
    check_zip_entries(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        if refused:
            raise CheckpointError(
                f"{path} holds Python objects besides tensors ({refused[0]}); duomo never unpickles those: "
                "re-save its state dict with torch.save(model.state_dict()) or as .safetensors"
            ) from exc
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint: it may be corrupt; download it again"
        ) from exc
    # torch's weights-only unpickler fails on damaged bytes with assorted types (IndexError, EOFError, ...)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({reason}); "
            "it may be truncated or corrupt: download or export it again"
        ) from exc
    state = clean_state_dict(obj, str(path))
    check_tensor_storage(state, str(path))
    return state


def safetensors_keys(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a .safetensors file, reading only its header."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); download it again"
        ) from exc


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary sibling file, fsync it, then rename it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def contiguous(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Detached contiguous CPU copies, as safetensors wants (it refuses shared or strided memory)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_safetensors(
    sd: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write a state dict as .safetensors atomically."""
    meta = {"format": "pt", **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(contiguous(sd), tmp, metadata=meta))


def save_torch(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict with torch.save atomically (loadable with weights_only=True)."""
    atomic_write(path, lambda tmp: torch.save(contiguous(sd), tmp))


def write_json(data: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")

    atomic_write(path, write)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, turning syntax errors into CheckpointError."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot read {path}: {exc}; restore the file or export the checkpoint again"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds JSON {type(data).__name__}, expected an object")
    return data
