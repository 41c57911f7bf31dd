"""The served model: images decode off the event loop; text/image batchers share one model thread."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from duomo.api import Pipeline
from duomo.data.images import DRAFT_FACTOR, load_image
from duomo.errors import ImageError, InputError
from duomo.serve.batcher import BatchObserver, DynamicBatcher, QueueFullError, model_executor
from duomo.serve.settings import ServeSettings
from duomo.tasks.clip.zero_shot import DEFAULT_TEMPLATES, build_classifier, classify, expand_templates

T = TypeVar("T")
ImageSource = str | bytes  # a base64 string, a data: URL, or raw file bytes
LABEL_CACHE_SIZE = 4096


def image_bytes(source: ImageSource, what: str = "image") -> bytes | str:
    """Raw bytes, a data: URL (kept as is for load_image) or a base64 string -> something load_image may read.

    A plain string is never treated as a file path: the server must not read files a client names.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{what} is empty (0 bytes); send the contents of an image file")
        return source
    if not isinstance(source, str):
        raise InputError(f"{what} must be a base64 string or a data: URL")
    text = source.strip()
    if text.startswith("data:"):
        if not text[5:].lower().startswith("image/"):
            raise ImageError(
                f"{what} is a data URL of type {text[5:].split(';', 1)[0]!r}; send data:image/..."
            )
        return text
    if not text:
        raise ImageError(f"{what} is empty; send base64 bytes of an image file or a data:image/... URL")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{what} is neither valid base64 nor a data:image/... URL") from exc
    if not data:
        raise ImageError(f"{what} decodes to 0 bytes; send the contents of an image file")
    return data


class DecodeLimiter:
    """At most `slots` images decode at once (decoded pixels are big); beyond `max_waiting` callers, 429."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.waiting = 0
        self._sem: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in a worker thread once a decode slot is free."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.slots)
        if self.waiting >= self.max_waiting:
            raise QueueFullError("too many images are waiting to be decoded; retry after a moment")
        self.waiting += 1
        try:
            async with self._sem:
                return await run_in_threadpool(fn, *args)
        finally:
            self.waiting -= 1


class ModelService:
    """Embeds texts and images through dynamic batchers; classifies zero-shot with cached label vectors."""

    def __init__(
        self, pipeline: Pipeline, settings: ServeSettings, observer: BatchObserver | None = None
    ) -> None:
        """Build the batchers (started later, on the event loop, by `start`)."""
        self.pipeline = pipeline
        self.settings = settings
        self.executor = model_executor()
        common = dict(
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            executor=self.executor,
            observer=observer,
        )
        self.text = DynamicBatcher(self._encode_texts, name="text", **common)
        self.image = DynamicBatcher(self._encode_pixels, name="image", **common)
        self.decoder = DecodeLimiter(settings.decode_threads, settings.max_queue)
        self.logit_scale = float(pipeline.model.logit_scale.detach().float().exp().clamp(max=100))
        self._labels: OrderedDict[tuple[str, tuple[str, ...]], np.ndarray] = OrderedDict()

    @property
    def name(self) -> str:
        """The served model's name."""
        return self.pipeline.name

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.pipeline.embed_dim

    async def start(self) -> None:
        """Start both batchers."""
        await self.text.start()
        await self.image.start()

    async def close(self, drain: bool = True) -> None:
        """Drain (or fail) queued work, then stop the model thread."""
        await self.text.close(drain=drain, timeout=self.settings.drain_timeout_s)
        await self.image.close(drain=drain, timeout=self.settings.drain_timeout_s)
        self.executor.shutdown(wait=False)

    @torch.inference_mode()
    def _encode_texts(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """Model thread: tokenize and embed a batch of texts -> (unit vector, token count) each."""
        tokens = self.pipeline.tokenizer(list(texts))
        counts = (tokens != 0).sum(dim=-1).tolist() if isinstance(tokens, torch.Tensor) else [0] * len(texts)
        if isinstance(tokens, torch.Tensor):  # the text tower skips trailing padding itself
            tokens = tokens.to(self.pipeline.device)
        emb = self.pipeline.model.encode_text(tokens, normalize=True).float().cpu().numpy()
        return [(emb[i], int(counts[i])) for i in range(len(texts))]

    def _encode_pixels(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        """Model thread: embed a batch of preprocessed images."""
        emb = self.pipeline.encode_pixels(torch.stack(pixels)).numpy()
        return list(emb)

    def _preprocess(self, source: ImageSource, what: str) -> torch.Tensor:
        """Worker thread: decode (within the pixel limit) and transform one image."""
        size = DRAFT_FACTOR * self.pipeline.transform.image_size  # big JPEGs decode at reduced scale
        image = load_image(
            image_bytes(source, what), max_pixels=self.settings.max_image_pixels, min_side=size
        )
        return self.pipeline.preprocess(image)

    async def embed_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Unit vectors [N, D] and the total token count."""
        if not texts:
            return np.zeros((0, self.dim), np.float32), 0
        results = await self.text.submit_many(list(texts))
        return np.stack([r[0] for r in results]), sum(r[1] for r in results)

    async def embed_images(self, sources: Sequence[ImageSource], what: str = "images") -> np.ndarray:
        """Unit vectors [N, D]; images decode in worker threads, so a bad one fails before any batch."""
        if not sources:
            return np.zeros((0, self.dim), np.float32)
        pixels = [
            await self.decoder.run(self._preprocess, src, f"{what}[{i}]" if len(sources) > 1 else what)
            for i, src in enumerate(sources)
        ]
        return np.stack(await self.image.submit_many(pixels))

    async def label_vectors(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """One unit vector per label (mean of its prompt embeddings), cached across requests."""
        key_t = tuple(templates)
        found = {lb: self._labels[(lb, key_t)] for lb in labels if (lb, key_t) in self._labels}
        missing = [lb for lb in dict.fromkeys(labels) if lb not in found]
        if missing:
            try:
                prompts = expand_templates(missing, templates)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
            chunk = self.settings.max_inputs  # whole requests must fit in the queue
            vecs = []
            for start in range(0, len(prompts), chunk):
                vecs.append((await self.embed_texts(prompts[start : start + chunk]))[0])
            prompt_vecs = torch.from_numpy(np.concatenate(vecs))
            emb = build_classifier(missing, templates, lambda _: prompt_vecs).numpy()  # the library's math
            found.update(zip(missing, emb, strict=True))
        for lb in labels:  # refresh (or insert) in LRU order
            self._labels[(lb, key_t)] = found[lb]
            self._labels.move_to_end((lb, key_t))
        while len(self._labels) > LABEL_CACHE_SIZE:
            self._labels.popitem(last=False)
        out = np.stack([found[lb] for lb in labels])
        return out

    async def classify(
        self, image: ImageSource, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> list[tuple[str, float]]:
        """(label, probability) pairs, best first."""
        templates = (
            list(templates) if templates else list(self.pipeline.meta.get("templates") or DEFAULT_TEMPLATES)
        )
        image_vec = (await self.embed_images([image], what="image"))[0]
        classifier = await self.label_vectors(labels, templates)
        probs = classify(torch.from_numpy(image_vec)[None], torch.from_numpy(classifier), self.logit_scale)
        probs = probs[0].numpy()
        order = np.argsort(-probs, kind="stable")
        return [(labels[i], float(probs[i])) for i in order]
