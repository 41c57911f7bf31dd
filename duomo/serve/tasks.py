"""The BEiT-3 task models behind /vqa and /caption: loaded once, run in the shared model thread.

Each configured task has a `DynamicBatcher` of batch size 1 on the model service's executor: its queue is
bounded (429 beyond `max_queue`), it reports to the metrics as queue `vqa` / `caption`, it drains on shutdown,
and each request is one model call, interleaved with the embedding batches instead of holding them up.
Images decode and go through the model's eval transform in worker threads first (through the model service's
decode limiter, within the pixel limit), so queued requests hold small pixel tensors, not decoded images.
The model thread then does what `duomo.tasks.beit3.vqa.answer` / `...caption.caption_image` do after
their preprocessing (tests/serve/test_serve_vqa_caption.py checks the server answers what they answer).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from duomo.data.images import load_image
from duomo.data.transforms import image_transform
from duomo.io.beit3_tasks import load_task
from duomo.serve.batcher import BatchObserver, DynamicBatcher
from duomo.serve.errors import ApiError
from duomo.serve.service import DecodeLimiter, ImageSource, image_bytes
from duomo.serve.settings import ServeSettings
from duomo.tasks.beit3.caption_guide import CaptionGuide

TASKS = {
    "vqa": ("VQA", "--vqa-model", "vqa_model", "duomo beit3-train vqa --out DIR"),
    "caption": ("captioning", "--caption-model", "caption_model", "duomo beit3-train caption --out DIR"),
}


def model_name(path: Path) -> str:
    """A task model's served name: its folder's name."""
    return Path(os.path.abspath(Path(path).expanduser())).name or str(path)


class TaskService:
    """The optional VQA and captioning models, each with its own bounded queue on the model thread."""

    def __init__(
        self,
        settings: ServeSettings,
        executor: Any,
        decoder: DecodeLimiter,
        observer: BatchObserver | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """Load the models named in `settings` onto `device` (CheckpointError if a folder is not one)."""
        self.settings = settings
        self.device = torch.device(device)
        self.decoder = decoder
        self.models: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        self.queues: dict[str, DynamicBatcher] = {}
        self.transforms: dict[str, Callable[[Image.Image], torch.Tensor]] = {}
        self.caption_guide: CaptionGuide | None = None
        run = {"vqa": self._run_vqa, "caption": self._run_caption}
        for task in TASKS:
            path = getattr(settings, TASKS[task][2])
            if path is None:
                continue
            model, config = load_task(Path(path).expanduser(), task)
            self.models[task] = model.to(self.device)
            self.names[task] = model_name(path)
            cfg = self.models[task].beit3.cfg
            self.transforms[task] = image_transform(cfg.image_size, cfg.mean, cfg.std)
            if task == "caption":
                from duomo.tasks.beit3.caption_guide import resolve_guide

                recorded = config.get("vision_init")
                self.caption_guide = resolve_guide(recorded, settings.caption_guide, device=str(self.device))
            self.queues[task] = DynamicBatcher(
                run[task],
                name=task,
                max_batch=1,  # one request per model call: a long beam search must not hold up embeddings
                max_wait_ms=0,
                max_queue=settings.max_queue,
                executor=executor,
                observer=observer,
            )

    def describe(self) -> dict[str, str | None]:
        """What /healthz says: the served model of each task, None where none is configured."""
        return {task: self.names.get(task) for task in TASKS}

    def require(self, task: str) -> str:
        """The served model's name for `task`; 503 naming the flag to pass when none is configured."""
        if task not in self.models:
            what, flag, field, train = TASKS[task]
            raise ApiError(
                503,
                f"this server has no {what} model; start it with `duomo serve {flag} DIR` (DIR: a folder "
                f"written by `{train}`), or set ServeSettings.{field}",
                code="not_configured",
            )
        return self.names[task]

    async def start(self) -> None:
        """Start the task queues."""
        for queue in self.queues.values():
            await queue.start()

    async def close(self, drain: bool = True) -> None:
        """Drain (or fail) queued requests; call before the model service shuts the shared thread down."""
        for queue in self.queues.values():
            await queue.close(drain=drain, timeout=self.settings.drain_timeout_s)

    def _pixels(self, task: str, source: ImageSource) -> torch.Tensor:
        """Worker thread: decode one image from request bytes (within the pixel limit) and transform it."""
        image = load_image(image_bytes(source, "image"), max_pixels=self.settings.max_image_pixels)
        return self.transforms[task](image)

    def _run_vqa(self, items: list[tuple[torch.Tensor, str]]) -> list[tuple[str, float]]:
        """Model thread: `answer` on preprocessed pixels (`best_answer`: top answer, its probability)."""
        from duomo.data.tokenizers import build_tokenizer
        from duomo.tasks.beit3.data import TEXT_LENGTH
        from duomo.tasks.beit3.vqa import best_answer

        model = self.models["vqa"]
        out = []
        with torch.inference_mode():
            for pixels, question in items:
                tok = build_tokenizer(model.beit3.cfg)  # beit3.spm from $DUOMO_BEIT3_SPM
                ids, pad = tok.encode_with_padding([question], TEXT_LENGTH)
                out.append(best_answer(model, pixels.unsqueeze(0), ids, pad))
        return out

    def _run_caption(
        self, items: list[tuple[torch.Tensor, int | None, int | None, bool]]
    ) -> list[tuple[str, str | None]]:
        """Model thread: `caption_image` on preprocessed pixels: (caption, the guide's name or None)."""
        from duomo.tasks.beit3.caption import MAX_CAPTION, generate

        model = self.models["caption"]
        out = []
        with torch.inference_mode():
            for pixels, beam, max_len, guided in items:
                guide = self.caption_guide if guided else None
                images = pixels.unsqueeze(0).to(self.device)
                text = generate(model, images, beam, max_len or MAX_CAPTION, guide=guide)[0]
                out.append((text, guide.name if guide is not None else None))
        return out

    async def _submit(self, task: str, item: tuple) -> Any:
        """Queue one item on a task's queue; 504 after `task_timeout_s` (the item is then dropped unless it
        already runs: the model thread cannot be interrupted mid-call)."""
        limit = self.settings.task_timeout_s
        try:
            return await asyncio.wait_for(self.queues[task].submit(item), limit)
        except TimeoutError as exc:
            hint = "; try beam 1 or a shorter max_length" if task == "caption" else ""
            message = f"the {task} request took longer than {limit:g} s (queue plus model){hint}"
            raise ApiError(504, message, code="timeout") from exc

    async def answer(self, image: ImageSource, question: str) -> tuple[str, float]:
        """(answer, probability) for a question about an image."""
        pixels = await self.decoder.run(self._pixels, "vqa", image)
        return await self._submit("vqa", (pixels, question))

    async def caption(
        self, image: ImageSource, beam: int | None = None, max_len: int | None = None, guide: bool = True
    ) -> tuple[str, str | None]:
        """The caption of an image and the name of the CLIP that guided its decoding (None: unguided)."""
        pixels = await self.decoder.run(self._pixels, "caption", image)
        return await self._submit("caption", (pixels, beam, max_len, guide))
