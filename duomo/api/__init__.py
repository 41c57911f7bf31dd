"""Python API: `duomo.load(...)` gives a `Pipeline` that embeds images and texts and classifies zero-shot."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from duomo.data.images import DRAFT_FACTOR, load_image
from duomo.data.tokenizers import build_tokenizer
from duomo.data.transforms import image_transform
from duomo.errors import InputError
from duomo.io.beit3_tasks import is_task_folder
from duomo.io.generator import is_generator_folder
from duomo.io.onnx import export_onnx_folder, is_onnx_folder, onnx_cache
from duomo.io.resolve import WEIGHTS_DIR, default_model_name, list_pretrained, read_model  # noqa: F401 (re-exported)
from duomo.models import CLIP
from duomo.nn.precision import faster_than_fp32, matmul_speedup
from duomo.tasks.clip.zero_shot import DEFAULT_TEMPLATES, build_classifier, classify

log = logging.getLogger("duomo")

ImageInput = str | os.PathLike | bytes | Image.Image | torch.Tensor
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_list(items: Any, kind: type | tuple[type, ...]) -> list[Any]:
    """Accept one item or a sequence of items."""
    if isinstance(items, kind) and not (isinstance(items, torch.Tensor) and items.ndim == 4):
        return [items]
    if isinstance(items, torch.Tensor):
        return list(items)
    return list(items)


class Pipeline:
    """A CLIP-style model with its tokenizer and image transform: the thing users call."""

    def __init__(
        self, model: CLIP, device: str | torch.device = "cpu", name: str = "", meta: dict | None = None
    ):
        self.model = model.eval()
        self.config = model.config
        self.name = name
        self.meta = meta or {}
        self.device = torch.device(device)
        self.dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.tokenizer = build_tokenizer(self.config.text)
        vision = self.config.vision
        self.transform = image_transform(vision.image_size, mean=vision.mean, std=vision.std)

    @property
    def embed_dim(self) -> int:
        """Size of the shared embedding space."""
        return self.config.embed_dim

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (path, bytes, PIL or an already preprocessed [3, H, W] tensor) -> model pixels."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise InputError(f"image tensors must be preprocessed [3, H, W]; got {tuple(image.shape)}")
            return image
        return self.transform(load_image(image, min_side=DRAFT_FACTOR * self.transform.image_size))

    @torch.no_grad()
    def encode_image(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, on the CPU) for one image or many."""
        items = _as_list(images, (str, os.PathLike, bytes, Image.Image, torch.Tensor))
        if not items:
            raise InputError("encode_image needs at least one image")
        out = []
        for chunk in _batches(items, batch_size):
            pixels = torch.stack([self.preprocess(img) for img in chunk]).to(self.device, self.dtype)
            out.append(self.model.encode_image(pixels, normalize=True).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings [N, D] of preprocessed pixels [N, 3, H, W] (one forward pass)."""
        return self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, on the CPU) for one string or many."""
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            raise InputError("encode_text needs at least one text")
        bad = [type(t).__name__ for t in items if not isinstance(t, str)]
        if bad:
            raise InputError(f"encode_text takes strings; got {bad[0]}")
        out = []
        for chunk in _batches(items, batch_size):
            tokens = self.tokenizer(list(chunk))
            tokens = tokens.to(self.device) if isinstance(tokens, torch.Tensor) else tokens
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out)

    def zero_shot_probs(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Probabilities [N_images, N_labels] over the given labels, from prompt-ensembled text embeddings."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels:
            raise InputError("zero-shot classification needs at least one label")
        templates = list(templates) if templates else list(self.meta.get("templates") or DEFAULT_TEMPLATES)
        try:
            classifier = build_classifier(labels, templates, self.encode_text)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        scale = float(self.model.logit_scale.detach().exp().clamp(max=100))
        return classify(self.encode_image(images), classifier, scale)

    def zero_shot_classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """For each image, (label, probability) pairs ranked best first (the top_k of them, if given)."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        probs = self.zero_shot_probs(images, labels, templates)
        k = min(top_k or len(labels), len(labels))
        top = probs.topk(k, dim=-1)
        return [
            [(labels[i], float(p)) for p, i in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    def similarity(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities [N_images, N_texts]."""
        return self.encode_image(images) @ self.encode_text(texts).T

    def save(self, path: str | os.PathLike, fmt: str = "duomo") -> Path:
        """Write the model in duomo's format (or "hf" / "openclip"); `duomo.load(path)` reads it back."""
        from duomo.io import export, save_native

        if fmt == "duomo":
            return save_native(self.model, Path(path), meta=self.meta or None)
        return export(self.model, Path(path), fmt)

    def to(self, device: str | torch.device) -> Pipeline:
        """Move the model to another device."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    return dev


def load(
    name_or_path: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    quick_gelu: bool | None = None,
    backend: str = "torch",
) -> Pipeline:
    """Load a model by config name, shipped checkpoint name, local path (any supported format) or hub id.

    `weights` loads a checkpoint into a named config; without weights a config name gives random weights.
    A folder written by `duomo beit3-train` gives that task's pipeline (`duomo.api.beit3`); a generator
    (`shapes-gen`, a folder from `duomo train --task text-to-image`), a diffusers Stable Diffusion folder or a
    single-file SD 1.x/2.x checkpoint a `GeneratorPipeline` with `.generate`.
    `backend`: "torch", or "onnxruntime" / "onnxruntime-int8": the model's towers exported once to an ONNX
    folder in duomo's cache (`duomo.io.onnx.onnx_cache`) and run on ONNX Runtime, behind the same Pipeline.
    """
    name = str(name_or_path) if name_or_path is not None else default_model_name()
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "torch" and not is_onnx_folder(name):  # an ONNX folder is its own backend
        folder = onnx_cache(name, weights, int8=backend.endswith("int8"))
        if not is_onnx_folder(folder):
            source = load(name, weights, "cpu", None, quick_gelu)
            export_onnx_folder(source.model, folder, source.meta, int8=backend.endswith("int8"))
        name, weights = str(folder), None
    dev = _resolve_device(device)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision or "fp32"]
    if dtype == torch.float16 and dev.type == "cpu":
        raise InputError("fp16 inference needs a GPU; on the CPU use precision='bf16' or 'fp32'")
    if not faster_than_fp32(dev, dtype):  # measured, once per process: no silent 5x slowdown
        speed = matmul_speedup(dev.type, dtype)
        log.warning(
            "%s runs %.1fx slower than fp32 on this %s (no native support, measured): loading in fp32",
            precision,
            1 / max(speed, 1e-9),
            dev.type,
        )
        dtype = torch.float32
    from duomo.api.chat import is_chat_model

    if is_chat_model(name):  # a chat folder (shapes-chat), LLaVA, or a language model (smollm2, GGUF)
        from duomo.api.chat import load_chat_pipeline

        return load_chat_pipeline(name, dev)
    if is_task_folder(name):
        from duomo.api.beit3 import load_task_pipeline

        return load_task_pipeline(name, dev)
    if (Path(name) / "model_index.json").is_file():  # a diffusers (Stable Diffusion) pipeline folder
        from duomo.api.generate import GeneratorPipeline
        from duomo.io.diffusers import read_diffusers

        model, meta = read_diffusers(name)
        return GeneratorPipeline(model.to(dev, dtype), dev, name=name, meta=meta)
    if name.endswith((".safetensors", ".ckpt")):
        from duomo.io.ldm import ldm_state, read_ldm

        state = ldm_state(name)
        if state is not None:  # a single-file Stable Diffusion checkpoint
            from duomo.api.generate import GeneratorPipeline

            model, meta = read_ldm(name, state=state)
            return GeneratorPipeline(model.to(dev, dtype), dev, name=Path(name).stem, meta=meta)
    generator = generator_path(name)
    if generator is not None:
        from duomo.api.generate import load_generator_pipeline

        return load_generator_pipeline(generator, dev, dtype)
    model, meta = read_model(name, weights, quick_gelu)
    if meta.get("backend") == "onnxruntime":
        if dev.type != "cpu" or dtype != torch.float32:
            raise InputError(
                "an ONNX folder runs on the CPU in its own precision; drop device= and precision="
            )
    else:
        model = model.to(dev, dtype)
    return Pipeline(model, dev, name=name, meta=meta)


def generator_path(name: str | os.PathLike) -> Path | None:
    """The generator folder a name means (a shipped name or a path), or None when it is not one."""
    shipped = WEIGHTS_DIR / str(name)
    if is_generator_folder(shipped):
        return shipped
    return Path(name) if is_generator_folder(name) else None


def list_generators() -> list[str]:
    """Names of the generators shipped inside the package."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if is_generator_folder(p))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dimension."""
    return F.normalize(x, dim=-1)
