"""The checkpoints shipped inside the package work, and a short training run on shapes learns.

- `duomo.load("shapes-tiny")` classifies freshly generated shapes images zero-shot (seen and held-out
  colour-shape combinations) far above chance, and gets the README demo right;
- the shipped checkpoint stays small (it is part of the wheel);
- 120 steps of `duomo.train.run.train` on the shapes world with a micro config learn (loss falls from ln(B),
  zero-shot accuracy on colours of held-out shapes is far above chance).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import duomo
from duomo.data.shapes import COLOURS, SHAPES, ShapesDataset, demo_samples

WEIGHTS = Path(duomo.__file__).parent / "weights"
MAX_CHECKPOINT_BYTES = 8_000_000

pytestmark = pytest.mark.skipif(
    "shapes-tiny" not in duomo.list_pretrained(), reason="no shapes-tiny checkpoint in duomo/weights"
)


@pytest.fixture(scope="module")
def pipe() -> duomo.Pipeline:
    return duomo.load("shapes-tiny", device="cpu")


def accuracy(pipe: duomo.Pipeline, split: str, n: int, seed: int) -> tuple[float, float]:
    """(zero-shot top-1 with the checkpoint's own templates, chance) on n fresh images of a split."""
    ds = ShapesDataset(split, size=n, image_size=pipe.config.vision.image_size, seed=seed)
    samples = [ds[i] for i in range(n)]
    probs = pipe.zero_shot_probs([s["image"] for s in samples], ds.classes)
    truth = torch.tensor([s["label"] for s in samples])
    return float((probs.argmax(dim=1) == truth).float().mean()), 1 / len(ds.classes)


def test_shapes_tiny_is_the_default_and_small() -> None:
    assert duomo.default_model_name() == "shapes-tiny"
    folder = WEIGHTS / "shapes-tiny"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= MAX_CHECKPOINT_BYTES, f"shapes-tiny is {size / 1e6:.1f} MB"
    meta = json.loads((folder / "config.json").read_text())["meta"]
    assert meta["templates"] and all("{}" in t for t in meta["templates"])


def test_shapes_tiny_classifies_heldout_combinations(pipe: duomo.Pipeline) -> None:
    # colour-shape pairs never seen in training; images generated now, with a seed no training run used
    acc, chance = accuracy(pipe, "heldout", 30, seed=20_251)
    assert acc >= 3 * chance, f"held-out zero-shot top-1 {acc:.2f} (chance {chance:.2f})"


def test_shapes_tiny_classifies_seen_combinations(pipe: duomo.Pipeline) -> None:
    acc, chance = accuracy(pipe, "val", 30, seed=20_251)
    assert acc >= 10 * chance, f"val zero-shot top-1 {acc:.2f} (chance {chance:.2f})"


def test_shapes_tiny_gets_the_readme_demo_right(pipe: duomo.Pipeline) -> None:
    samples = demo_samples(pipe.config.vision.image_size)
    labels = sorted({s["label_name"] for s in samples} | set(pipe.meta.get("demo_labels", [])))
    ranked = pipe.zero_shot_classify([s["image"] for s in samples], labels, top_k=1)
    pairs = zip(samples, ranked, strict=True)
    wrong = [(s["label_name"], r[0][0]) for s, r in pairs if r[0][0] != s["label_name"]]
    # chance is 1 in 8; the shipped checkpoint gets 6 of 8 (docs/benchmarks.md): guards against regressions
    assert len(wrong) <= 3, f"demo mistakes (truth, predicted): {wrong}"


MICRO = {
    "embed_dim": 32,
    "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
    "text": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_short_training_on_shapes_learns(tmp_path: Path) -> None:
    from duomo.train.config import TrainConfig
    from duomo.train.run import train

    (tmp_path / "micro.json").write_text(json.dumps(MICRO))
    batch = 32
    cfg = TrainConfig(
        model=str(tmp_path / "micro.json"), data="shapes", data_size=4096, steps=120, batch_size=batch,
        lr=3e-3, warmup=5, wd=0.0, workers=0, out=str(tmp_path / "run"), quiet=True, plot=False,
        save_every=10_000, log_every=10,
    )  # fmt: skip
    result = train(cfg)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses[0] > 0.95 * math.log(batch)  # starts at chance ...
    assert min(losses[-3:]) < 0.8 * math.log(batch)  # ... and learns
    micro = duomo.load(str(result["model"]), device="cpu")
    # colour of unseen colour-shape pairs: one classifier per colour, its prompts ensembled over the 8 shapes
    ds = ShapesDataset("heldout", size=60, image_size=32, seed=7)
    samples = [ds[i] for i in range(len(ds))]
    colours = list(COLOURS)
    probs = micro.zero_shot_probs(
        [s["image"] for s in samples], colours, [f"a {{}} {shape}" for shape in SHAPES]
    )
    truth = torch.tensor([colours.index(s["label_name"].split()[0]) for s in samples])
    acc = float((probs.argmax(dim=1) == truth).float().mean())
    chance = 1 / len(colours)
    assert acc >= 3 * chance, f"colour zero-shot top-1 {acc:.2f} after 120 steps (chance {chance:.2f})"
