"""Optimiser set-up: weight-decay groups, frozen towers, the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import make_trainer, tiny_model

from duomo.train.config import TrainConfig
from duomo.train.optim import build_optimizer, build_scheduler, lr_factor, no_decay_names, param_groups


def test_weight_decay_groups_of_a_clip_model() -> None:
    model = tiny_model()
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    decayed = sorted(set(names) - skip)
    # exactly the matrices of linear and conv layers: attention, MLP, patch embedding, projections
    assert all(names[n].ndim >= 2 for n in decayed)
    assert all(
        n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight", "patch_embed.weight"))
        for n in decayed
    )
    for name in (
        "logit_scale",
        "visual.cls_token",
        "visual.pos_embed",
        "text.pos_embed",
        "text.token_embed.weight",
    ):
        assert name in skip, name
    assert all(n in skip for n in names if n.endswith(".bias") or ".norm" in n)
    groups = param_groups(model, 0.2)
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_frozen_parameters_are_left_out() -> None:
    model = tiny_model()
    model.visual.requires_grad_(False)
    opt = build_optimizer(model, 1e-3, 0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.visual.parameters())
    assert all(id(p) in in_opt for p in model.text.parameters())
    assert id(model.logit_scale) in in_opt


def test_warmup_then_cosine_values() -> None:
    warmup, total = 10, 110
    assert lr_factor(0, warmup, total) == pytest.approx(0.1)
    assert lr_factor(4, warmup, total) == pytest.approx(0.5)
    assert lr_factor(9, warmup, total) == pytest.approx(1.0)
    assert lr_factor(10, warmup, total) == pytest.approx(1.0)
    assert lr_factor(60, warmup, total) == pytest.approx(0.5)
    assert lr_factor(110, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(110, warmup, total, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(85, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(50, warmup, total, "const") == 1.0


def test_schedule_matches_open_clip_cosine_lr() -> None:
    scheduler_mod = pytest.importorskip("open_clip_train.scheduler")
    param = torch.nn.Parameter(torch.zeros(1))
    theirs_opt = torch.optim.SGD([param], lr=1.0)
    theirs = scheduler_mod.cosine_lr(theirs_opt, 3e-4, 7, 50)
    ours_opt = torch.optim.SGD([param], lr=3e-4)
    ours = build_scheduler(ours_opt, 7, 50)
    for step in range(50):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(theirs(step), rel=1e-12, abs=1e-18)
        ours_opt.step()
        ours.step()


def test_trainer_applies_the_schedule_per_step(tmp_path) -> None:
    trainer = make_trainer(tmp_path, steps=8, warmup=3, lr=1e-2)
    trainer.fit()
    lrs = [r["lr"] for r in trainer.metrics.read()]
    assert lrs == pytest.approx([1e-2 * lr_factor(s, 3, 8) for s in range(8)])


def test_train_config_json_round_trip_and_errors(tmp_path) -> None:
    from duomo.errors import ConfigError

    cfg = TrainConfig(steps=5, lr=1e-3, grad_clip=None)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.replace(lr=None, steps=9).lr == 1e-3  # None: a flag that was not given
    with pytest.raises(ConfigError, match="unknown training config fields"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        TrainConfig.from_json(tmp_path / "bad.json")
