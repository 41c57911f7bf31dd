"""skip_init: a model built for loading skips random initialisation, and nothing else changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import duomo
from duomo.errors import CheckpointError
from duomo.io import load_into
from duomo.models import create_model
from duomo.nn import skip_init


def test_init_functions_do_nothing_inside_and_come_back_after() -> None:
    before = nn.init.normal_
    x = torch.full((4,), 7.0)
    with skip_init():
        nn.init.normal_(x)
        nn.init.zeros_(x)
        assert torch.equal(x, torch.full((4,), 7.0))
    assert nn.init.normal_ is before
    nn.init.zeros_(x)
    assert not x.any()


def test_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError), skip_init():
        raise RuntimeError("boom")
    x = torch.ones(3)
    nn.init.zeros_(x)
    assert not x.any()


def test_a_loaded_model_is_the_same_either_way(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    pipe = duomo.load("ViT-micro")
    pipe.save(tmp_path / "m")
    loaded = duomo.load(tmp_path / "m")  # built under skip_init
    for (name, a), (_, b) in zip(
        pipe.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        pipe.model.encode_image(images), loaded.model.encode_image(images), rtol=0, atol=0
    )


def test_a_missing_weight_is_still_refused() -> None:
    with skip_init():
        model = create_model("ViT-micro")
    state = create_model("ViT-micro").state_dict()
    state.pop("visual.cls_token")
    with pytest.raises(CheckpointError, match="missing key"):
        load_into(model, state)
