"""Reduced precision is used only where it is measured to be at least as fast as fp32."""

from __future__ import annotations

import logging

import pytest
import torch

import duomo
import duomo.nn.precision as precision


def test_the_probe_measures_something() -> None:
    speed = precision.matmul_speedup("cpu", torch.bfloat16)
    assert speed > 0
    assert precision.faster_than_fp32("cpu", torch.float32)


@pytest.mark.parametrize(("speedup", "dtype"), [(0.2, torch.float32), (2.0, torch.bfloat16)])
def test_load_falls_back_to_fp32_only_where_bf16_is_slow(monkeypatch, caplog, speedup, dtype) -> None:  # noqa: ANN001
    monkeypatch.setattr(precision, "matmul_speedup", lambda device, dt: speedup)
    monkeypatch.setattr(duomo.api, "matmul_speedup", lambda device, dt: speedup)
    with caplog.at_level(logging.WARNING, logger="duomo"):
        pipe = duomo.load("shapes-tiny", device="cpu", precision="bf16")
    assert pipe.dtype == dtype
    assert ("slower than fp32" in caplog.text) == (dtype == torch.float32)


def test_training_in_slow_bf16_falls_back_to_fp32(monkeypatch, tmp_path, caplog) -> None:  # noqa: ANN001
    from duomo.train.config import TrainConfig
    from duomo.train.data import map_loader_factory
    from duomo.train.objectives.clip import ClassifierObjective
    from duomo.train.trainer import Trainer

    monkeypatch.setattr(precision, "matmul_speedup", lambda device, dt: 0.2)
    model = torch.nn.Linear(4, 2)
    cfg = TrainConfig(steps=1, precision="bf16", out=str(tmp_path), quiet=True, plot=False)
    rows = [{"features": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(64)]

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.scale = model, 1.0

    with caplog.at_level(logging.WARNING, logger="duomo.train"):
        trainer = Trainer(
            Head(), ClassifierObjective(features=True), map_loader_factory(rows, 64), cfg, freeze=[]
        )
    assert trainer.amp_dtype is None and "training in fp32" in caplog.text
