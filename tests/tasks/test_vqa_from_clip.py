"""A BEiT-3 started from the shipped shapes-minilm image tower (frozen) learns VQA on held-out combinations.

A short version of the README recipe: the same model, start and loss, fewer steps and images.
"""

from __future__ import annotations

import pytest
import torch

import duomo
from duomo.models.beit3_init import freeze_vision, start_backbone
from duomo.tasks.vqa import ShapesVQA, evaluate_vqa, finetune_vqa, new_vqa_model


@pytest.mark.slow
@pytest.mark.skipif(
    "shapes-minilm" not in duomo.list_pretrained(), reason="no shapes-minilm in duomo/weights"
)
def test_clip_started_vqa_answers_colours_of_unseen_pairs() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = new_vqa_model("beit3-tiny-conv", start_backbone("beit3-tiny-conv", "shapes-minilm"))
    freeze_vision(model)
    train = ShapesVQA("train", 600, model.beit3.cfg, model.answers, seed=0)
    finetune_vqa(model, train, steps=STEPS, batch_size=32, lr=1e-3, loss="ce")
    held = evaluate_vqa(model, ShapesVQA("heldout", 60, model.beit3.cfg, model.answers, seed=1))
    # chance is 1/8 for a colour; the question names the object by a shape never seen in that colour
    assert held["accuracy_colour"] >= 0.5, held
    assert held["accuracy"] > 2 * held["majority_baseline"], held


STEPS = 250
