"""Training metrics: one JSON object per line (metrics.jsonl) and the curves drawn from it (curves.png)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("duomo.train")

PLOTTED = ("loss", "lr", "logit_scale", "grad_norm", "samples_per_s")


class MetricsLog:
    """Appends metric records to a JSONL file; on resume, drops the records past the resumed step."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate(self, step: int) -> None:
        """Keep only the records with record["step"] <= step (the rest belong to a run that was cut off)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Draw each metric against the step into one PNG; None when matplotlib is missing or there is no data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no training curves (pip install 'duomo[train]')")
        return None
    keys = [k for k in PLOTTED if any(isinstance(r.get(k), int | float) for r in records)]
    if not records or not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        if points:
            ax.plot(*zip(*points, strict=True), lw=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "loss" and points and min(v for _, v in points) > 0:
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
