"""OpenAI's CLIP TorchScript archives (`ViT-B-32.pt`, ...) read as data: nothing in them is ever executed.

`torch.jit.save` writes a zip whose single top folder holds `data.pkl` (the module tree, pickled by
torch/csrc/jit/serialization/pickler.cpp), `data/<key>` (raw little-endian tensor storages),
`constants.pkl`, `code/` (TorchScript source, which also declares each module class's
`__parameters__` and `__buffers__`), `version` and `byteorder`. In `data.pkl` every module is
`GLOBAL '__torch__.<qualname>'`, `NEWOBJ` with no arguments, then `BUILD` with a dict of its attributes;
every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`
with `storage` a persistent id `("storage", torch.<Type>Storage, key, location, numel)`.
The unpickler below understands exactly that and refuses everything else.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from duomo.errors import CheckpointError
from duomo.io.files import StateDict, check_tensor_storage, check_zip_entries

STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class StorageType:
    """Stands in for `torch.<Type>Storage` inside a persistent id: only its dtype matters."""

    dtype: torch.dtype


class ScriptObject:
    """Inert record of one TorchScript object: its class name and the state `BUILD` gave it."""

    type_name = "__torch__"
    state: Any = None

    def __init__(self) -> None:  # NEWOBJ calls __new__ only; REDUCE with arguments fails here
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _record_class(qualname: str, cache: dict[str, type]) -> type:
    if qualname not in cache:
        cache[qualname] = type("ScriptObject", (ScriptObject,), {"type_name": qualname})
    return cache[qualname]


def _identity(value: Any, *_: Any) -> Any:
    return value


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, *_: Any
) -> torch.Tensor:
    """A view into a storage read from the archive; shapes are checked, nothing else is called."""
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if not isinstance(storage, torch.Tensor) or ints is None or not all(type(i) is int for i in ints):
        raise CheckpointError("malformed tensor record in the TorchScript archive")
    return storage.as_strided(size, stride, offset)


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,  # the (empty) backward hooks of each tensor
    ("torch", "device"): str,
}
# List and type-tag markers of TorchScript's pickler: they return their first argument unchanged.
ALLOWED |= {
    ("torch.jit._pickle", f"build_{kind}list"): _identity for kind in ("int", "tensor", "double", "bool")
}
ALLOWED[("torch.jit._pickle", "restore_type_tag")] = _identity


class ArchiveUnpickler(pickle._Unpickler):  # the Python implementation, so that BUILD can be restricted
    """Unpickles a TorchScript `data.pkl` into ScriptObject records and tensors, refusing anything else."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, archive: zipfile.ZipFile, prefix: str, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Module classes become inert records; tensor rebuilding and storage types map to duomo's own."""
        if module == "__torch__" or module.startswith("__torch__."):
            return _record_class(f"{module}.{name}", self.classes)
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        raise CheckpointError(
            f"TorchScript archive references {module}.{name}, which is not model data; refusing it"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """A storage `("storage", type, key, location, numel)` read from the archive's `data/<key>` entry."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id {pid!r:.80} in the TorchScript archive")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, StorageType) or not re.fullmatch(r"\d+", str(key)) or type(numel) is not int:
            raise CheckpointError(f"malformed storage record {pid!r:.80} in the TorchScript archive")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            storage = torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            if storage.numel() < numel:
                raise CheckpointError(f"storage {key} is truncated in the TorchScript archive")
            self.storages[key] = storage
        return self.storages[key]

    def load_build(self) -> None:
        """BUILD: only module records may receive state (no `__setstate__` of any other type runs)."""
        state = self.stack.pop()
        if not isinstance(self.stack[-1], ScriptObject):
            raise CheckpointError("TorchScript archive sets the state of a non-module object; refusing it")
        self.stack[-1].__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    """The folder holding data.pkl: `<name>/` for torch.jit.save archives ('' if at the root)."""
    candidates = [n[: -len("data.pkl")] for n in archive.namelist() if re.fullmatch(r"([^/]+/)?data\.pkl", n)]
    if len(candidates) != 1:
        raise CheckpointError(f"expected one data.pkl in the archive, found {len(candidates)}")
    return candidates[0]


def _check_byte_order(archive: zipfile.ZipFile, prefix: str, path: str | os.PathLike) -> None:
    """Storages hold raw bytes in the writer's byte order; no `byteorder` entry means little-endian."""
    name = f"{prefix}byteorder"
    order = archive.read(name).decode().strip() if name in archive.namelist() else "little"
    if order != "little":
        raise CheckpointError(f"{path} stores {order}-endian tensors; only little-endian is supported")


def _declared_tensors(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """Per module class, the parameter and buffer names its TorchScript source declares."""
    declared: dict[str, set[str]] = {}
    code = f"{prefix}code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code) : -3].replace("/", ".")
        text = archive.read(name).decode("utf-8", "replace")
        for block in re.split(r"^(?=class )", text, flags=re.M):
            head = re.match(r"class (\w+)\(", block)
            lists = dict(re.findall(r"^\s+__(parameters|buffers)__ = \[([^\]]*)\]", block, flags=re.M))
            if head and "parameters" in lists and "buffers" in lists:
                names = re.findall(r'"([^"]+)"', lists["parameters"] + lists["buffers"])
                declared[f"{module}.{head.group(1)}"] = set(names)
    return declared


def _collect(
    obj: ScriptObject, declared: dict[str, set[str]], prefix: str, out: StateDict, parents: frozenset[int]
) -> None:
    """Walk module records depth-first, keeping declared parameters/buffers (all tensors if undeclared)."""
    if id(obj) in parents:  # memo references can make cycles; real module trees have none
        raise CheckpointError("the module tree in the TorchScript archive contains a cycle")
    parents = parents | {id(obj)}
    if not isinstance(obj.state, dict):
        return  # a scripted class with custom __getstate__: no module weights inside
    keep = declared.get(obj.type_name)
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor) and (keep is None or name in keep):
            out[prefix + str(name)] = value
        elif isinstance(value, ScriptObject):
            _collect(value, declared, f"{prefix}{name}.", out, parents)


def read_torchscript(path: str | os.PathLike) -> StateDict:
    """Flat state dict (parameters and buffers, as `ScriptModule.state_dict()`) of a TorchScript archive."""
    check_zip_entries(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            _check_byte_order(archive, prefix, path)
            root = ArchiveUnpickler(archive, prefix, archive.read(f"{prefix}data.pkl")).load()
            if not isinstance(root, ScriptObject):
                raise CheckpointError(f"{path} does not hold a TorchScript module")
            out: StateDict = {}
            _collect(root, _declared_tensors(archive, prefix), "", out, frozenset())
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is a damaged TorchScript archive ({exc}); download it again") from exc
    except (
        pickle.UnpicklingError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        RuntimeError,
        RecursionError,
    ) as exc:
        raise CheckpointError(f"{path} is not a readable TorchScript model archive ({exc})") from exc
    if not out:
        raise CheckpointError(f"{path} holds no tensors")
    check_tensor_storage(out, str(path))
    return {k: v.contiguous() for k, v in out.items()}
