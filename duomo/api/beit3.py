"""Python API for BEiT-3 task folders: `duomo.load(folder)` gives the pipeline of the folder's task.

vqa = duomo.load("runs/beit3/vqa");          vqa.ask(["cat.png"], ["what color is the cat?"])
cap = duomo.load("runs/beit3/caption");      cap.caption(["cat.png"])
ret = duomo.load("runs/beit3/retrieval");    ret.encode_image([...]), ret.encode_text([...])
cls = duomo.load("runs/beit3/classify");     cls.classify(["cat.png"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from duomo.data.images import ImageLike
from duomo.data.tokenizers import build_tokenizer
from duomo.data.transforms import image_transform, preprocess_images
from duomo.errors import InputError
from duomo.io.beit3_tasks import load_task
from duomo.tasks.beit3.caption import MAX_CAPTION, caption_image
from duomo.tasks.beit3.caption_guide import DEFAULT_WEIGHT
from duomo.tasks.beit3.classify import classify_image
from duomo.tasks.beit3.data import TEXT_LENGTH
from duomo.tasks.beit3.vqa import answer


def _images(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    items = list(images) if isinstance(images, list | tuple) else [images]
    if not items:
        raise InputError("give at least one image")
    return items


class TaskPipeline:
    """A BEiT-3 task model with its folder config (task, head settings, provenance) on a device."""

    task = ""

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], device: torch.device, name: str = ""):
        self.model = model.to(device).eval()
        self.config = config
        self.device = device
        self.name = name
        self.spm_path: str | os.PathLike | None = None  # unilm's beit3.spm for a "beit3-spm" config

    @property
    def vision_init(self) -> str | None:
        """The CLIP whose image tower started the vision pathway (recorded at training), if any."""
        return self.config.get("vision_init")

    def pixels(self, images: list[ImageLike]) -> torch.Tensor:
        """Images -> the model's normalised pixels on its device."""
        cfg = self.model.beit3.cfg
        return preprocess_images(images, image_transform(cfg.image_size, cfg.mean, cfg.std)).to(self.device)


class VQAPipeline(TaskPipeline):
    """`ask(images, questions)` -> [(answer, probability)]."""

    task = "vqa"

    @property
    def answers(self) -> list[str]:
        """The answer vocabulary."""
        return self.model.answers

    def ask(
        self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str]
    ) -> list[tuple[str, float]]:
        """The answer to each (image, question) pair; one image may take several questions."""
        items = _images(images)
        qs = [questions] if isinstance(questions, str) else list(questions)
        if len(items) == 1 and len(qs) > 1:
            items = items * len(qs)
        if len(items) != len(qs):
            raise InputError(f"{len(items)} images for {len(qs)} questions; give one question per image")
        return [answer(self.model, img, q, self.spm_path) for img, q in zip(items, qs, strict=True)]


class CaptionPipeline(TaskPipeline):
    """`caption(images)` -> captions, guided by the recorded CLIP by default."""

    task = "caption"

    def caption(
        self,
        images: ImageLike | Sequence[ImageLike],
        beam: int | None = None,
        max_len: int = MAX_CAPTION,
        guide: str | None = "auto",
        guide_weight: float = DEFAULT_WEIGHT,
    ) -> list[str]:
        """One caption per image (see `duomo.tasks.beit3.caption.caption_image`)."""
        return [
            caption_image(
                self.model, img, beam, max_len, self.spm_path, guide, guide_weight, self.vision_init
            )
            for img in _images(images)
        ]


class RetrievalPipeline(TaskPipeline):
    """`encode_image`, `encode_text`: L2-normalised embeddings in one space."""

    task = "retrieval"

    @torch.no_grad()
    def encode_image(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Embeddings [N, D] (float32, CPU)."""
        return self.model.encode_image(self.pixels(_images(images))).float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Embeddings [N, D] (float32, CPU)."""
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise InputError("encode_text takes one or more strings")
        ids, pad = build_tokenizer(self.model.beit3.cfg, spm_path=self.spm_path).encode_with_padding(
            items, TEXT_LENGTH
        )
        return self.model.encode_text(ids.to(self.device), pad.to(self.device)).float().cpu()


class ClassifyPipeline(TaskPipeline):
    """`classify(images, top_k)` -> [[(class, probability)]]."""

    task = "classify"

    @property
    def classes(self) -> list[str]:
        """The class names."""
        return self.model.classes

    def classify(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 1
    ) -> list[list[tuple[str, float]]]:
        """The top_k classes of each image."""
        return [classify_image(self.model, img, top_k) for img in _images(images)]


class PretrainedPipeline(TaskPipeline):
    """A masked-data-modelling folder: the pretrained model, to fine-tune with `duomo beit3-train --init`."""

    task = "mdm"


PIPELINES: dict[str, type[TaskPipeline]] = {
    p.task: p for p in (VQAPipeline, CaptionPipeline, RetrievalPipeline, ClassifyPipeline, PretrainedPipeline)
}


def load_task_pipeline(path: str | os.PathLike, device: torch.device | str = "cpu") -> TaskPipeline:
    """The pipeline of a BEiT-3 task folder."""
    model, config = load_task(Path(path).expanduser())
    return PIPELINES[config["task"]](model, config, torch.device(device), str(path))
