"""A BEiT-3 started from the shipped shapes-minilm image tower (frozen) learns VQA on held-out combinations.

A short version of the README recipe: the same model, start and loss, fewer steps and images.
"""

from __future__ import annotations

import pytest
import torch

import duomo
from duomo.models.beit3 import VQAModel
from duomo.models.beit3.from_clip import freeze_vision
from duomo.tasks.beit3.data import vqa_source, vqa_table
from duomo.tasks.beit3.start import start_backbone
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.tasks.beit3.vqa import evaluate_vqa
from duomo.train.objectives.beit3 import VQAObjective


@pytest.mark.slow
@pytest.mark.skipif(
    "shapes-minilm" not in duomo.list_pretrained(), reason="no shapes-minilm in duomo/weights"
)
def test_clip_started_vqa_answers_colours_of_unseen_pairs(tmp_path) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = start_backbone("beit3-tiny-conv", "shapes-minilm")
    cfg = backbone.cfg
    train = vqa_table(vqa_source("shapes", cfg, 600, seed=0), cfg)
    model = VQAModel(backbone, train.extra["answers"], "ce")
    freeze_vision(model)
    run = beit3_train_config(
        out=str(tmp_path / "vqa"), steps=STEPS, batch_size=32, lr=1e-3, quiet=True, plot=False
    )
    fit_task(model, VQAObjective("ce"), train, run, "vqa")
    held = evaluate_vqa(model, vqa_table(vqa_source("shapes:heldout", cfg, 60, seed=1), cfg, model.answers))
    # chance is 1/8 for a colour; the question names the object by a shape never seen in that colour
    assert held["accuracy_colour"] >= 0.5, held
    assert held["accuracy"] > 2 * held["majority_baseline"], held


STEPS = 250
