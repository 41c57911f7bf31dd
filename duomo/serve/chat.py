"""The chat model behind /v1/chat/completions, with iteration-level (continuous) batching.

A request is prefilled on its own (its prompt, images included, through the model once: a cache and the first
logits), then joins the running decode batch: every step, each active request picks its next token with its
own settings and random stream, finished requests leave (their cache rows dropped), and ONE forward pass of
the language model decodes the next token of all the others; new requests join between steps (their caches
padded on the left to the batch's length). A cancelled request (client gone, time limit) leaves at the next
step. Text reaches each request through its own queue, piece by piece, for streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from duomo.api.chat import ChatPipeline
from duomo.errors import DuomoError, InputError
from duomo.models.lm.model import LMCache
from duomo.serve.batcher import BatcherClosedError, BatchObserver, QueueFullError
from duomo.tasks.lm.decode import Completion, DecodeSettings, TextStream, pick

log = logging.getLogger("duomo.serve")


@dataclass
class ChatJob:
    """One request's decoding: its settings, sampler stream, cache until it joins, last logits, output."""

    settings: DecodeSettings
    history: list[int]
    stream: TextStream
    limit: int  # most new tokens (settings and context length)
    prompt_tokens: int
    queue: asyncio.Queue
    cache: LMCache | None = None
    logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    finish: str | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)


class ChatService:
    """A chat pipeline, its bounded intake, and the loop that decodes all active requests together."""

    def __init__(
        self,
        pipeline: ChatPipeline,
        executor: Any,
        *,
        name: str,
        max_batch: int = 16,
        max_queue: int = 64,
        max_tokens: int = 512,
        observer: BatchObserver | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.executor = executor
        self.name = name
        self.max_batch, self.max_queue, self.max_tokens = max_batch, max_queue, max_tokens
        self.observer = observer
        self.waiting: list[ChatJob] = []
        self.active: list[ChatJob] = []
        self.cache: LMCache | None = None  # the active rows' keys/values, row i = active[i]
        self.decode_calls = 0
        self.abandoned = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # --- requests -----------------------------------------------------------------------------------------
    async def complete(
        self, messages: Sequence[dict[str, str]], images: Sequence[Any], settings: DecodeSettings
    ) -> AsyncIterator[str | Completion]:
        """Text pieces of the reply as they are decoded, then the `Completion` (with `prompt_tokens` set on
        the service's usage record)."""
        if self._closing or self._task is None or self._task.done():
            raise BatcherClosedError("the server is shutting down and takes no new requests; retry elsewhere")
        if settings.max_tokens > self.max_tokens:
            raise InputError(f"max_tokens must be at most {self.max_tokens} on this server")
        if len(self.waiting) >= self.max_queue:
            if self.observer:
                self.observer.rejected("chat")
            raise QueueFullError(
                f"the chat queue is full ({len(self.waiting)} requests waiting); retry after a moment",
                retry_after=2,
            )
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(self.executor, self._prefill, list(messages), list(images), settings)
        self.waiting.append(job)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    return
        finally:
            job.cancelled = True  # a consumer that stops early (disconnect, time limit) frees its row

    def _prefill(self, messages: list, images: list, settings: DecodeSettings) -> ChatJob:
        """Prompt through the model once (in the model thread): the request's cache and first logits."""
        ids, cache, logits, length = self.pipeline.prepare(messages, images)
        room = self.pipeline.lm.config.max_positions - length
        return ChatJob(
            settings=settings,
            history=list(ids),
            stream=TextStream(self.pipeline.tokenizer, settings.stop),
            limit=min(settings.max_tokens, room),
            prompt_tokens=length,
            queue=asyncio.Queue(),
            cache=cache,
            logits=logits,
            generator=settings.generator(),
        )

    # --- the loop -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="duomo-chat")

    async def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop intake; let running requests finish (up to `timeout` s) when `drain`, fail the rest."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout if drain else 0)
            except TimeoutError:
                self._task.cancel()
        for job in self.waiting + self.active:
            job.queue.put_nowait(BatcherClosedError("the server shut down before this finished"))
        self.waiting, self.active, self.cache = [], [], None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            joining = self._take_waiting()
            if not self.active and not joining:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self.executor, self._step, joining)
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("chat decoding step failed")
                error = exc if isinstance(exc, DuomoError) else DuomoError(f"decoding failed: {exc}")
                for job in self.active + joining:
                    job.queue.put_nowait(error)
                self.active, self.cache = [], None
                continue
            if self.observer:
                self.observer.batch("chat", len(outputs), time.perf_counter() - started)
            for job, piece, done in outputs:
                if piece:
                    job.queue.put_nowait(piece)
                if done is not None:
                    job.queue.put_nowait(done)

    def _take_waiting(self) -> list[ChatJob]:
        """Waiting requests that fit into the batch now."""
        joining = []
        while self.waiting and len(self.active) + len(joining) < self.max_batch:
            job = self.waiting.pop(0)
            if job.cancelled:
                self.abandoned += 1
                continue
            joining.append(job)
        if self.observer:
            self.observer.queue_depth("chat", len(self.waiting))
        return joining

    @torch.inference_mode()
    def _step(self, joining: list[ChatJob]) -> list[tuple[ChatJob, str, Completion | None]]:
        """Join new rows, pick every row's next token, drop finished rows, decode the rest in one call."""
        if joining:
            caches = ([self.cache] if self.cache is not None else []) + [j.cache for j in joining]
            self.cache = LMCache.concat(caches)
            for job in joining:
                job.cache = None
            self.active += joining
        outputs: list[tuple[ChatJob, str, Completion | None]] = []
        keep, tokens = [], []
        end_ids = self.pipeline.end_ids
        for row, job in enumerate(self.active):
            if job.cancelled:
                self.abandoned += 1
                continue
            token = pick(job.logits, job.history, job.settings, job.generator)
            piece = ""
            if token in end_ids:
                job.finish = "stop"
            else:
                job.history.append(token)
                piece = job.stream.push(token)
                if job.stream.stopped:
                    job.finish = "stop"
                elif len(job.stream.ids) >= job.limit:
                    job.finish = "length"
            if job.finish is not None:
                piece += job.stream.finish()
                done = Completion(list(job.stream.ids), job.stream.final_text(), job.finish)
                done.prompt_tokens = job.prompt_tokens  # type: ignore[attr-defined]
                outputs.append((job, piece, done))
            else:
                outputs.append((job, piece, None))
                keep.append(row)
                tokens.append(token)
        if not keep:
            self.active, self.cache = [], None
            return outputs
        rows = torch.tensor(keep)
        assert self.cache is not None
        if len(keep) != len(self.active):
            self.cache = self.cache.select(rows)
        self.active = [self.active[i] for i in keep]
        lm = self.pipeline.lm
        device = lm.embed_tokens.weight.device
        logits = lm(torch.tensor(tokens, device=device)[:, None], cache=self.cache)[:, -1]
        self.decode_calls += 1
        for job, row_logits in zip(self.active, logits, strict=True):
            job.logits = row_logits
        return outputs
