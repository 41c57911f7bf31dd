"""The shipped `digits-minilm` (frozen MiniLM text tower, LiT) reads real handwritten digits zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import duomo
from duomo.data.digits import CLASSES, EVAL_TEMPLATES, TRAIN_TEMPLATES, DigitsDataset

pytestmark = pytest.mark.skipif(
    "digits-minilm" not in duomo.list_pretrained(), reason="no digits-minilm checkpoint in duomo/weights"
)


def test_digits_minilm_is_small_and_leaves_minilm_out() -> None:
    folder = Path(duomo.__file__).parent / "weights" / "digits-minilm"
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 5_000_000  # the 90 MB text tower is not copied


def test_digits_minilm_reads_test_digits_with_prompts_never_used_in_training() -> None:
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    pipe = duomo.load("digits-minilm", device="cpu")
    data = DigitsDataset("test", image_size=pipe.config.vision.image_size)
    samples = [data[i] for i in range(0, len(data), 6)]  # 60 test scans
    probs = pipe.zero_shot_probs([s["image"] for s in samples], CLASSES, templates=EVAL_TEMPLATES)
    truth = torch.tensor([s["label"] for s in samples])
    accuracy = float((probs.argmax(dim=1) == truth).float().mean())
    assert accuracy >= 0.85, f"zero-shot top-1 {accuracy:.2f} (chance 0.10; 0.98 measured on the full split)"
