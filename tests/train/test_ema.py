"""The trainer's exponential moving average: the update rule, exact resume, and what gets exported."""

from __future__ import annotations

import torch
from torch import nn
from train_helpers import ColourSquares, make_trainer

from duomo.train.ema import EMA


def test_ema_update_rule_and_applied_restores_weights() -> None:
    model = nn.Linear(3, 2)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    holder = nn.Sequential(model, frozen)
    ema = EMA(holder, 0.9)
    assert ema.names == ["0.weight", "0.bias"]  # frozen parameters are not averaged
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(holder)  # first decay: min(0.9, 1/10) = 0.1 -> 90% of the way to the new weights
    assert torch.allclose(ema.shadow["0.weight"], start + 0.9, atol=1e-6)
    now = model.weight.detach().clone()
    with ema.applied(holder):
        assert torch.allclose(model.weight, start + 0.9, atol=1e-6)
    assert torch.equal(model.weight, now)
    assert ema.current_decay() == min(0.9, 2 / 11)


def test_trainer_ema_resumes_exactly_and_is_exported(tmp_path) -> None:
    opts = {"steps": 6, "batch_size": 8, "save_every": 3, "dataset": ColourSquares(32), "ema": 0.8}
    straight = make_trainer(tmp_path / "straight", **opts)
    straight.fit()
    first = make_trainer(tmp_path / "resumed", **opts)
    first.fit(until=3)
    resumed = make_trainer(tmp_path / "resumed", resume="latest", **opts)
    resumed.fit()
    for name, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[name]), name
    assert resumed.ema.updates == 6

    from duomo.io import load_native

    _, exported, _ = load_native(tmp_path / "straight" / "model")
    live = straight.model.state_dict()
    name = "visual.proj" if "visual.proj" in straight.ema.shadow else straight.ema.names[0]
    assert torch.allclose(exported[name].float(), straight.ema.shadow[name])  # the average, not the live one
    assert not torch.equal(exported[name], live[name])
