"""ONNX Runtime backend for CLIP towers: export both towers to ONNX, optionally int8, and run them.

A folder written by `export_onnx` holds `image.onnx` (pixels [B, 3, S, S] -> L2-normalised embeddings),
`text.onnx` (token ids [B, context_length] -> L2-normalised embeddings, dynamic batch) and `config.json` (the
duomo model config, its metadata, the temperature, the precision). The text graph takes full-length rows:
for CLIP's causal tower positions after the end token cannot change the pooled one, and MiniLM masks its
padding, so this is equivalent to duomo's trimming (tested equal within 1e-5).

int8 (`quantize_onnx`): ONNX Runtime's dynamic quantisation of the matrix multiplies, per-channel weights.
Signed 8-bit weights at full range are about twice as fast, but on a CPU without VNNI ONNX Runtime's kernel
adds pairs of u8 x s8 products in 16 bits and saturates (cosine 0.979 on ViT-B-32, measured elsewhere);
so a probe (`signed_int8_is_exact`: one quantised matrix multiply, its error against fp32) decides, per
machine: s8 where it is at least as exact as u8 with `reduce_range`, else u8 with `reduce_range` (7-bit
activations: it never saturates).
`OnnxCLIP` has CLIP's `encode_image` / `encode_text` / `logit_scale` / `config`, so `duomo.Pipeline` (and
`embed`, `index`, `search`, `serve`) use it unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.files import read_json, write_json
from duomo.models.clip.config import CLIPConfig

FORMAT = "duomo-onnx"
IMAGE_FILE, TEXT_FILE, CONFIG_FILE = "image.onnx", "text.onnx", "config.json"
OPSET = 17
# The matrix multiplies (attention and MLP projections: nearly all of the work) go to int8; convolutions (a
# conv stem, patchify) stay fp32: quantising them cost the most cosine on trained conv-stem towers (measured).
QUANTIZED_OPS = ["MatMul", "Gemm"]


def _require_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("the ONNX backend needs onnxruntime: pip install 'duomo[onnx]'") from exc
    return onnxruntime


class _ImageGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)


class _TextGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


@contextlib.contextmanager
def _full_length(model: nn.Module) -> Iterator[None]:
    """Towers that trim padding to the longest row (a data-dependent length) keep every column instead."""
    towers = [m for m in model.modules() if hasattr(m, "trim_padding")]
    saved = [m.trim_padding for m in towers]
    try:
        for m in towers:
            m.trim_padding = False
        yield
    finally:
        for m, value in zip(towers, saved, strict=True):
            m.trim_padding = value


def export_onnx(model: nn.Module, out: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a duomo CLIP model's two towers as an ONNX folder (fp32), atomically."""
    cfg: CLIPConfig | None = getattr(model, "config", None)
    if not isinstance(cfg, CLIPConfig):
        raise CheckpointError("ONNX export takes a duomo CLIP model (with a CLIPConfig)")
    from duomo.data.tokenizers import build_tokenizer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model = model.float().eval()
    size = cfg.vision.image_size
    tokens = build_tokenizer(cfg.text)(["a photo of a cat", "a red star"])
    try:
        with torch.no_grad(), _full_length(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for graph, example, name, file in (
                (_ImageGraph(model), torch.zeros(2, 3, size, size), "pixels", IMAGE_FILE),
                (_TextGraph(model), tokens, "tokens", TEXT_FILE),
            ):
                torch.onnx.export(
                    graph.eval(),  # a fresh wrapper is in train mode: BatchNorm would use batch statistics
                    (example,),
                    str(tmp / file),
                    input_names=[name],
                    output_names=["embeddings"],
                    dynamic_axes={name: {0: "batch"}, "embeddings": {0: "batch"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
        bias = getattr(model, "logit_bias", None)
        write_json(
            {
                "format": FORMAT,
                "version": 1,
                "precision": "fp32",
                "model": cfg.to_dict(),
                "meta": meta or {},
                "logit_scale": float(model.logit_scale.detach()),
                "logit_bias": None if bias is None else float(bias.detach()),
                "context_length": int(tokens.shape[1]),
            },
            tmp / CONFIG_FILE,
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@functools.cache
def signed_int8_is_exact() -> bool:
    """Whether full-range signed int8 weights multiply without saturating here: one 256x256 matrix multiply
    quantised both ways, its relative error against fp32 (measured once per process, ~50 ms)."""
    _require_ort()
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (256, 256)).astype(np.float32)
    x = rng.uniform(0, 1, (64, 256)).astype(np.float32)  # all-positive activations: u8 near 255, worst case
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 256])],
        [numpy_helper.from_array(weight, "w")],
    )
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), f"{tmp}/f.onnx")
        for signed in (True, False):
            kind = QuantType.QInt8 if signed else QuantType.QUInt8
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(
                    f"{tmp}/f.onnx",
                    f"{tmp}/q.onnx",
                    per_channel=True,
                    weight_type=kind,
                    reduce_range=not signed,
                )
            out = ort.InferenceSession(f"{tmp}/q.onnx", providers=["CPUExecutionProvider"]).run(
                None, {"x": x}
            )[0]
            errors[signed] = float(np.linalg.norm(out - x @ weight) / np.linalg.norm(x @ weight))
    return errors[True] <= errors[False]


def int8_scheme() -> str:
    """The int8 weight scheme for this machine: "s8" (full range) or "u8-reduce-range"."""
    return "s8" if signed_int8_is_exact() else "u8-reduce-range"


def quantize_onnx(src: str | os.PathLike, out: str | os.PathLike, scheme: str | None = None) -> Path:
    """An int8 copy of an ONNX folder: dynamic quantisation of the matrix multiplies, per-channel weights,
    in `scheme` (default: `int8_scheme()`, measured)."""
    _require_ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scheme = scheme or int8_scheme()
    root = logging.getLogger()
    level = root.level
    if scheme not in ("s8", "u8-reduce-range"):
        raise ConfigError(f"unknown int8 scheme {scheme!r}; choose s8 or u8-reduce-range")

    src, out = Path(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger for every graph
        for file in (IMAGE_FILE, TEXT_FILE):
            quantize_dynamic(
                str(src / file),
                str(tmp / file),
                per_channel=True,
                reduce_range=scheme != "s8",
                weight_type=QuantType.QInt8 if scheme == "s8" else QuantType.QUInt8,
                op_types_to_quantize=QUANTIZED_OPS,
            )
        config = read_json(src / CONFIG_FILE)
        config["precision"] = "int8"
        config["int8_scheme"] = scheme
        write_json(config, tmp / CONFIG_FILE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        root.setLevel(level)
    return out


def onnx_cache(name: str, weights: str | os.PathLike | None = None, int8: bool = False) -> Path:
    """Where `duomo.load(name, backend="onnxruntime...")` keeps its export: `$DUOMO_CACHE` (default
    ~/.cache/duomo) / onnx / a name for the model, its weights and their modification times."""
    import hashlib

    parts = [str(name), str(weights or "")]
    for item in (name, weights):
        if item is not None and Path(item).exists():
            path = Path(item).resolve()
            parts += [str(path), str(path.stat().st_mtime_ns)]
    key = hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(str(name)).name)[:40]
    root = Path(os.environ.get("DUOMO_CACHE", Path.home() / ".cache" / "duomo"))
    return root / "onnx" / f"{slug}-{key}-{'int8' if int8 else 'fp32'}"


def export_onnx_folder(model: nn.Module, out: Path, meta: dict[str, Any] | None, int8: bool) -> Path:
    """`export_onnx`, and with `int8` its quantised copy, into `out`."""
    if not int8:
        return export_onnx(model, out, meta)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        export_onnx(model, Path(tmp) / "fp32", meta)
        return quantize_onnx(Path(tmp) / "fp32", out)


def is_onnx_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `export_onnx`."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return read_json(config).get("format") == FORMAT
    except (CheckpointError, AttributeError):
        return False


class OnnxCLIP(nn.Module):
    """The two towers of an ONNX folder behind CLIP's interface (inference only, CPU)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        ort = _require_ort()
        folder = Path(folder)
        data = read_json(folder / CONFIG_FILE)
        self.config = CLIPConfig.from_dict(data["model"])
        self.precision = data.get("precision", "fp32")
        self.dtype = torch.float32
        self.register_buffer("logit_scale", torch.tensor(float(data["logit_scale"])))
        bias = data.get("logit_bias")
        self.logit_bias = None if bias is None else torch.tensor(float(bias))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.image = ort.InferenceSession(
                str(folder / IMAGE_FILE), options, providers=["CPUExecutionProvider"]
            )
            self.text = ort.InferenceSession(
                str(folder / TEXT_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(
                f"{folder} holds an unreadable ONNX graph ({exc}); export it again"
            ) from exc
        self.meta = dict(data.get("meta") or {})

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (the graph normalises; `normalize` is CLIP's API)."""
        feed = {"pixels": np.ascontiguousarray(pixels.detach().float().cpu().numpy())}
        out = self.image.run(None, feed)[0]
        return torch.from_numpy(out)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] of token ids [B, context_length]."""
        out = self.text.run(
            None, {"tokens": np.ascontiguousarray(tokens.detach().cpu().numpy().astype(np.int64))}
        )[0]
        return torch.from_numpy(out)


def load_onnx(folder: str | os.PathLike) -> tuple[OnnxCLIP, dict[str, Any]]:
    """(model, metadata) of an ONNX folder."""
    model = OnnxCLIP(folder)
    return model, {**model.meta, "backend": "onnxruntime", "precision": model.precision}


def cosine_check(
    reference: nn.Module, candidate: nn.Module, pixels: torch.Tensor, batch_size: int = 32
) -> dict[str, float]:
    """Min and mean cosine of the candidate's image embeddings to the reference's, and top-1 agreement of
    nearest neighbours among the images themselves."""
    ref, cand = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size]
            ref.append(reference.encode_image(chunk, normalize=True).float())
            cand.append(candidate.encode_image(chunk, normalize=True).float())
    a, b = torch.cat(ref), torch.cat(cand)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "images": float(len(a))}


__all__ = ["OnnxCLIP", "cosine_check", "export_onnx", "is_onnx_folder", "load_onnx", "quantize_onnx"]
