"""How a bulk job spreads model calls over CPU cores: W workers x T threads, chosen by measurement.

On this project's 2-core build machine two 1-thread workers embed 4-10% more images/s than one 2-thread
worker (a matrix multiply split across cores pays a synchronisation per op; two independent calls do not).
Which layout wins depends on the CPU, the model and the batch, so `LayoutEncoder` measures it on the job's own
batches: in "auto", the first batches alternate between the candidate layouts (no work is wasted: every
measured batch is a batch of the job), the faster per image is kept for the rest of the job, and the
choice is remembered (per model, batch size, core count and torch version) so the next job starts with it.

Workers are threads of this process, each running the model on a slice of the batch with T intra-op
threads: the model is held once (two processes would hold it twice), and torch releases the GIL in its ops.
Only torch models on the CPU have a layout; other backends and devices run as they are. The cores counted are
torch's thread count (`torch.set_num_threads`, `OMP_NUM_THREADS`): a process given one thread runs 1x1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from duomo.errors import InputError
from duomo.io.files import write_json

log = logging.getLogger("duomo.layout")

PROBE_ROUNDS = 2  # batches per candidate before choosing
_LAYOUT = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Layout:
    """`workers` concurrent model calls, each with `threads` intra-op threads."""

    workers: int
    threads: int

    def __str__(self) -> str:
        return f"{self.workers}x{self.threads}"


def parse_layout(text: str | None) -> Layout | None:
    """ "auto" (or None) -> None (measure); "WxT" -> Layout(W, T)."""
    if text is None or text == "auto":
        return None
    match = _LAYOUT.match(text.strip())
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise InputError(f"--layout must be auto or WORKERSxTHREADS like 2x1 or 1x2, got {text!r}")
    return Layout(int(match.group(1)), int(match.group(2)))


def candidate_layouts(cores: int) -> list[Layout]:
    """One worker using every core, and one 1-thread worker per core (the two ends worth measuring)."""
    cores = max(1, cores)
    return [Layout(1, cores)] if cores == 1 else [Layout(1, cores), Layout(cores, 1)]


def _memory_file() -> Path:
    """$DUOMO_LAYOUTS, else $XDG_CACHE_HOME (or ~/.cache)/duomo/layouts.json."""
    if os.environ.get("DUOMO_LAYOUTS"):
        return Path(os.environ["DUOMO_LAYOUTS"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duomo" / "layouts.json"


class LayoutEncoder:
    """Wraps `encode(pixels) -> embeddings` so that each call runs under the chosen layout.

    `layout=None` measures: the first PROBE_ROUNDS batches per candidate alternate, then the faster is kept.
    `key` names what the measurement is about (model, batch size); with a key, the choice is remembered.
    """

    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        layout: Layout | None = None,
        key: str | None = None,
        cores: int | None = None,
        remember: bool = True,
        active: bool = True,
    ) -> None:
        """`active=False`: call `encode` as it is (a backend or device without a layout to choose)."""
        self.encode = encode
        self.active = active
        self.cores = cores or torch.get_num_threads()  # the cores this process was given to use
        self.key = f"{key}|cores={self.cores}|torch={torch.__version__}" if key else None
        self.remember = remember and self.key is not None
        self.candidates = candidate_layouts(self.cores)
        self.timings: dict[str, list[float]] = {str(c): [] for c in self.candidates}
        self.layout = layout or self._remembered()
        self.how = "given" if layout else ("remembered" if self.layout else "measuring")
        if self.layout is None and len(self.candidates) == 1:  # one core: nothing to choose between
            self.layout, self.how = self.candidates[0], "one core"
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.encode(pixels)
        layout = self.layout or self._next_probe()
        start = time.perf_counter()
        out = self._run(layout, pixels)
        if self.layout is None:
            self.timings[str(layout)].append((time.perf_counter() - start) / max(1, len(pixels)))
            self._maybe_choose()
        return out

    def _next_probe(self) -> Layout:
        counts = [len(self.timings[str(c)]) for c in self.candidates]
        return self.candidates[counts.index(min(counts))]

    def _maybe_choose(self) -> None:
        if min(len(t) for t in self.timings.values()) < PROBE_ROUNDS:
            return
        medians = {name: statistics.median(t) for name, t in self.timings.items()}
        best = min(self.candidates, key=lambda c: medians[str(c)])
        self.layout, self.how = best, "measured"
        log.info("layout %s chosen: seconds per image %s", best, medians)
        if self.remember:
            self._store(best)

    def describe(self) -> str:
        """One line for the user: the layout and how it was chosen (with the measured gain); "" while the job
        was too short to choose one, or when there is no layout to choose."""
        if self.layout is None or not self.active:
            return ""
        text = f"layout {self.layout} (workers x threads, {self.how}"
        medians = {n: statistics.median(t) for n, t in self.timings.items() if t}
        if self.how == "measured" and len(medians) > 1:
            others = [m for n, m in medians.items() if n != str(self.layout)]
            text += f": {min(others) / medians[str(self.layout)]:.2f}x the other layout's images/s"
        return text + ")"

    def _run(self, layout: Layout, pixels: torch.Tensor) -> torch.Tensor:
        saved = torch.get_num_threads()
        torch.set_num_threads(layout.threads)
        try:
            workers = min(layout.workers, len(pixels))
            if workers <= 1:
                return self.encode(pixels)
            slices = torch.tensor_split(pixels, workers)
            with self._lock:
                if self._pool is None or self._pool._max_workers < workers:  # noqa: SLF001
                    self._pool = ThreadPoolExecutor(workers, thread_name_prefix="duomo-layout")
            futures = [self._pool.submit(self.encode, part) for part in slices[1:]]
            first = self.encode(slices[0])
            return torch.cat([first, *(f.result() for f in futures)])
        finally:
            torch.set_num_threads(saved)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> LayoutEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- memory of past choices ----------------------------------------------------------------------------
    def _remembered(self) -> Layout | None:
        if not self.remember:
            return None
        try:
            stored = json.loads(_memory_file().read_text()).get(self.key)
        except (OSError, ValueError, AttributeError):
            return None
        try:
            return parse_layout(stored) if stored else None
        except InputError:
            return None

    def _store(self, layout: Layout) -> None:
        path = _memory_file()
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
            if not isinstance(data, dict):
                data = {}
            data[self.key] = str(layout)
            write_json(data, path)
        except (OSError, ValueError) as exc:  # a read-only home only costs the next job a measurement
            log.debug("cannot remember the layout in %s: %s", path, exc)


def layout_encoder(pipeline: object, layout: str | None, batch_size: int) -> LayoutEncoder:
    """The encoder a bulk job should call (and close): the chosen or measured layout for torch models on
    the CPU; the pipeline's own `encode_pixels`, as it is, for other backends and devices."""
    chosen = parse_layout(layout)
    encode = pipeline.encode_pixels  # type: ignore[attr-defined]
    device = str(getattr(pipeline, "device", "cpu"))
    backend = (getattr(pipeline, "meta", None) or {}).get("backend", "torch")
    if backend != "torch" or not device.startswith("cpu"):
        if chosen is not None:
            log.warning("--layout applies to torch models on the CPU; %s runs as it is", device)
        return LayoutEncoder(encode, remember=False, active=False)
    key = f"{getattr(pipeline, 'name', '?')}|batch={batch_size}"
    return LayoutEncoder(encode, chosen, key=key)
