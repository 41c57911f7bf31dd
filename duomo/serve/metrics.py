"""Prometheus metrics written by hand (text exposition format 0.0.4): counters, gauges and histograms."""

from __future__ import annotations

import math
import threading
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    """Cumulative-bucket histogram per label set."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = defaultdict(lambda: [0] * (len(self.buckets) + 1))
        self._sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, labels: Labels = ()) -> None:
        """Record one observation."""
        counts = self._counts[labels]
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        self._sums[labels] += value

    def render(self) -> list[str]:
        """Exposition lines (HELP, TYPE, _bucket, _sum, _count)."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, counts in sorted(self._counts.items()):
            total = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                total += count
                le = (("le", _fmt_value(bound)),)
                lines.append(f"{self.name}_bucket{_fmt_labels(labels, le)} {total}")
            lines.append(f"{self.name}_sum{_fmt_labels(labels)} {_fmt_value(self._sums[labels])}")
            lines.append(f"{self.name}_count{_fmt_labels(labels)} {total}")
        return lines


class Scalar:
    """A counter or gauge per label set."""

    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self._values: dict[Labels, float] = defaultdict(float)

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        """Add to the value."""
        self._values[labels] += amount

    def set(self, value: float, labels: Labels = ()) -> None:
        """Set the value (gauges)."""
        self._values[labels] = value

    def get(self, labels: Labels = ()) -> float:
        """The current value (0 if never touched)."""
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in sorted(self._values.items())]
        return lines


class ServerMetrics:
    """Everything /metrics reports; also the batchers' observer. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = Scalar(
            "duomo_requests_total", "HTTP requests by endpoint, method and status.", "counter"
        )
        self.latency = Histogram(
            "duomo_request_duration_seconds", "HTTP request latency by endpoint.", LATENCY_BUCKETS
        )
        self.batch_size = Histogram("duomo_batch_size", "Items per model batch, by queue.", BATCH_BUCKETS)
        self.forward = Histogram(
            "duomo_batch_duration_seconds", "Model time per batch, by queue.", LATENCY_BUCKETS
        )
        self.depth = Scalar("duomo_queue_depth", "Items waiting for a batch, by queue.", "gauge")
        self.rejected_total = Scalar(
            "duomo_queue_rejected_total", "Requests refused because a queue was full.", "counter"
        )

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request."""
        with self._lock:
            self.requests.inc((("endpoint", endpoint), ("method", method), ("status", str(status))))
            self.latency.observe(seconds, (("endpoint", endpoint),))

    def queue_depth(self, queue: str, depth: int) -> None:
        """Batcher observer: queue depth now."""
        with self._lock:
            self.depth.set(depth, (("queue", queue),))

    def batch(self, queue: str, size: int, seconds: float) -> None:
        """Batcher observer: one batch ran."""
        with self._lock:
            self.batch_size.observe(size, (("queue", queue),))
            self.forward.observe(seconds, (("queue", queue),))

    def rejected(self, queue: str) -> None:
        """Batcher observer: one submit refused for a full queue."""
        with self._lock:
            self.rejected_total.inc((("queue", queue),))

    def render(self) -> str:
        """The whole exposition text."""
        with self._lock:
            parts = [
                self.requests,
                self.latency,
                self.batch_size,
                self.forward,
                self.depth,
                self.rejected_total,
            ]
            return "\n".join(line for metric in parts for line in metric.render()) + "\n"
