"""The generator behind /v1/images/generations, with iteration-level batching across requests.

Every request becomes a `Trajectory` (its images' sampler state). One loop, running each denoiser call in the
model thread the other queues share, takes all active trajectories (up to `max_batch` images), stacks their
inputs (each row with its own timestep, conditioning and guidance scale) into ONE denoiser call, and advances
each trajectory by its own sampler. A request that arrives while others are mid-way joins at the next call
(continuous batching, as LLM servers do with tokens); finished ones leave. Rows of the denoiser are
independent, so a request gets the images `duomo generate` makes with the same seed (to float rounding).
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from duomo.api.generate import GeneratorPipeline, to_pil
from duomo.errors import DuomoError, InputError
from duomo.models.diffusion.samplers import Trajectory
from duomo.serve.batcher import BatcherClosedError, BatchObserver, QueueFullError
from duomo.tasks.diffusion.generate import (
    GenerateOptions,
    check_prompts,
    decode,
    encode_prompts,
    latent_shape,
)

log = logging.getLogger("duomo.serve")


@dataclass
class GenerationJob:
    """One request's images on their way: conditioning, guidance, sampler state, and where the result goes."""

    trajectory: Trajectory
    cond: tuple[torch.Tensor, torch.Tensor | None]
    uncond: tuple[torch.Tensor, torch.Tensor | None]
    guidance: float
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        """Images in this job."""
        return self.cond[0].shape[0]


class GenerationService:
    """A generator, its bounded intake, and the loop that steps all active requests together."""

    def __init__(
        self,
        pipeline: GeneratorPipeline,
        executor: Any,
        *,
        name: str,
        max_batch: int = 16,
        max_queue: int = 64,
        max_n: int = 10,
        max_steps: int = 100,
        max_side: int = 1024,
        observer: BatchObserver | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model = pipeline.model
        self.executor = executor
        self.name = name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_n, self.max_steps, self.max_side = max_n, max_steps, max_side
        self.observer = observer
        self.waiting: list[GenerationJob] = []
        self.active: list[GenerationJob] = []
        self.denoiser_calls = 0
        self.abandoned = 0  # jobs dropped mid-way because their request was cancelled (timeout, disconnect)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # --- requests -----------------------------------------------------------------------------------------
    def sizes(self) -> list[str]:
        """Sizes a request may ask for: the generator's own and its whole multiples up to max_side."""
        base = self.pipeline.image_size
        return [f"{base * k}x{base * k}" for k in range(1, self.max_side // base + 1)]

    def check(self, n: int, steps: int | None, size: str | None) -> int:
        """Refuse out-of-bounds requests (InputError -> 400); returns the upscale factor of `size`."""
        if not 1 <= n <= self.max_n:
            raise InputError(f"n must be between 1 and {self.max_n}")
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise InputError(f"steps must be between 1 and {self.max_steps}")
        if size in (None, "", "auto"):
            return 1
        if size not in self.sizes():
            allowed = ", ".join(self.sizes()[:6]) + (" ..." if len(self.sizes()) > 6 else "")
            raise InputError(f"size {size!r} is not served; this generator makes {allowed}")
        return int(size.split("x")[0]) // self.pipeline.image_size

    async def generate(
        self,
        prompt: str,
        n: int = 1,
        negative: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        size: str | None = None,
    ) -> list[bytes]:
        """PNG bytes of `n` images of `prompt` (image i seeded seed + i; a random seed when None)."""
        if self._closing or self._task is None or self._task.done():
            raise BatcherClosedError("the server is shutting down and takes no new requests; retry elsewhere")
        factor = self.check(n, steps, size)
        check_prompts(prompt)
        if negative is not None:
            check_prompts(negative, "negative prompt")
        queued = sum(j.rows for j in self.waiting)
        if queued + n > self.max_queue:
            if self.observer:
                self.observer.rejected("generate")
            raise QueueFullError(
                f"the generate queue is full ({queued} of {self.max_queue} images waiting); "
                "retry after a moment",
                retry_after=5,
            )
        seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        opts = GenerateOptions(steps=steps, guidance=guidance, sampler=sampler, seed=seed).resolved(
            self.model
        )
        loop = asyncio.get_running_loop()
        trajectory, cond, uncond = await loop.run_in_executor(
            self.executor, self._admit, prompt, n, negative or "", opts
        )
        job = GenerationJob(trajectory, cond, uncond, float(opts.guidance), loop.create_future())
        self.waiting.append(job)
        assert self._wakeup is not None
        self._wakeup.set()
        # cancelling this coroutine (time limit, client gone) cancels the future: the loop drops the job
        images: torch.Tensor = await job.future
        return await loop.run_in_executor(None, _pngs, images, factor)

    def _admit(
        self, prompt: str, n: int, negative: str, opts: GenerateOptions
    ) -> tuple[Trajectory, Any, Any]:
        """Encode the prompts and set up the sampler state (in the model thread)."""
        device = self.pipeline.device
        with torch.no_grad():
            cond = encode_prompts(self.model, [prompt] * n, device)
            uncond = encode_prompts(self.model, [negative] * n, device)
        dtype = next(self.model.denoiser.parameters()).dtype
        shape = latent_shape(self.model)
        schedule = self.model.noise_schedule
        trajectory = Trajectory(schedule, opts.sampler, opts.steps, shape, opts.seed, n, device, dtype)
        return trajectory, cond, uncond

    # --- the loop -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the stepping loop on the running event loop."""
        if self._task is not None and not self._task.done():
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="duomo-generate")

    async def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop intake; let running jobs finish (up to `timeout` s) when `drain`, fail the rest."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout if drain else 0)
            except TimeoutError:
                self._task.cancel()
        for job in self.waiting + self.active:
            if not job.future.done():
                job.future.set_exception(BatcherClosedError("the server shut down before this finished"))
        self.waiting, self.active = [], []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            self._take_waiting()
            if not self.active:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            started = time.perf_counter()
            batch = list(self.active)
            try:
                finished = await loop.run_in_executor(self.executor, self._step, batch)
            except Exception as exc:  # a failed step fails its jobs, not the server
                log.exception("generation step failed")
                error = exc if isinstance(exc, DuomoError) else DuomoError(f"generation failed: {exc}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                self.active = [j for j in self.active if j not in batch]
                continue
            if self.observer:
                self.observer.batch("generate", sum(j.rows for j in batch), time.perf_counter() - started)
            for job, images in finished:
                if not job.future.done():
                    job.future.set_result(images)
            done = {id(job) for job, _ in finished}
            self.abandoned += sum(1 for j in self.active if id(j) not in done and j.future.cancelled())
            self.active = [j for j in self.active if id(j) not in done and not j.future.cancelled()]

    def _take_waiting(self) -> None:
        """Move waiting jobs into the active set while they fit in `max_batch` images (one always fits)."""
        rows = sum(j.rows for j in self.active)
        while self.waiting and (not self.active or rows + self.waiting[0].rows <= self.max_batch):
            job = self.waiting.pop(0)
            if job.future.cancelled():
                self.abandoned += 1
                continue
            self.active.append(job)
            rows += job.rows
        if self.observer:
            self.observer.queue_depth("generate", sum(j.rows for j in self.waiting))

    @torch.no_grad()
    def _step(self, jobs: Sequence[GenerationJob]) -> list[tuple[GenerationJob, torch.Tensor]]:
        """One denoiser call for every row of every job, each job advanced by its own sampler."""
        inputs = [job.trajectory.model_input() for job in jobs]
        x = torch.cat([x for x, _ in inputs])
        t = torch.cat([t for _, t in inputs])
        states = torch.cat([j.uncond[0] for j in jobs] + [j.cond[0] for j in jobs])
        pooled = None
        if jobs[0].cond[1] is not None:
            pooled = torch.cat([j.uncond[1] for j in jobs] + [j.cond[1] for j in jobs])
        dtype = x.dtype
        out = self.model.denoise(
            torch.cat([x, x]),
            torch.cat([t, t]),
            states.to(dtype),
            None if pooled is None else pooled.to(dtype),
        )
        self.denoiser_calls += 1
        out_uncond, out_cond = out.chunk(2)
        finished = []
        start = 0
        for job in jobs:
            rows = slice(start, start + job.rows)
            start += job.rows
            guided = out_uncond[rows] + job.guidance * (out_cond[rows] - out_uncond[rows])
            job.trajectory.advance(guided)
            if job.trajectory.done:
                finished.append((job, decode(self.model, job.trajectory.result())))
        return finished


def _pngs(images: torch.Tensor, factor: int) -> list[bytes]:
    """PNG bytes of [B, 3, H, W] images in [0, 1], upscaled by a whole `factor` (nearest-neighbour)."""
    out = []
    for image in to_pil(images):
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out
