"""Training a text-to-image generator through the one trainer: the loss falls, resume is exact (EMA too),
the exported folder generates, and bad set-ups are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import duomo
from duomo.errors import ConfigError, InputError
from duomo.io import save_native
from duomo.models.clip.config import CLIPConfig, TextConfig, VisionConfig
from duomo.models.factory import create_model
from duomo.tasks.diffusion.train import build_trainer, train_generator
from duomo.train.config import TrainConfig

GENERATOR = {
    "architecture": "text-to-image",
    "denoiser_kind": "dit",
    "denoiser": {"image_size": 8, "patch_size": 2, "width": 16, "layers": 1, "heads": 2, "frequency_dim": 16},
    "pooled": True,
    "image_size": 8,
    "schedule": {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    },
    "sampler": "dpm",
    "steps": 3,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("gen-train")
    torch.manual_seed(0)
    clip = create_model(
        CLIPConfig(
            embed_dim=8,
            vision=VisionConfig(image_size=8, patch_size=4, width=16, layers=1, heads=2),
            text=TextConfig(context_length=16, width=16, layers=1, heads=2),
        )
    )
    save_native(clip, base / "clip")
    (base / "gen.json").write_text(json.dumps(GENERATOR))
    return {"clip": str(base / "clip"), "config": str(base / "gen.json"), "base": base}


def config(setup: dict, out: str, **overrides: object) -> TrainConfig:
    fields = {
        "task": "text-to-image",
        "model": setup["config"],
        "text_from": setup["clip"],
        "data": "shapes",
        "data_size": 64,
        "steps": 6,
        "batch_size": 8,
        "lr": 2e-3,
        "warmup": 1,
        "wd": 0.0,
        "ema": 0.9,
        "workers": 0,
        "quiet": True,
        "plot": False,
        "log_every": 1,
        "save_every": 3,
        "device": "cpu",
        "out": str(setup["base"] / out),
    }
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.mark.slow
def test_trains_resumes_exactly_and_exports_a_generator(setup: dict) -> None:
    straight = build_trainer(config(setup, "straight"))
    result = straight.fit()
    assert result["model"] is not None
    build_trainer(config(setup, "resumed")).fit(until=3)  # killed after step 3 (a checkpoint is there)
    resumed = build_trainer(config(setup, "resumed", resume="latest"))
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    for name, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[name]), name

    losses = [json.loads(line)["mse"] for line in (setup["base"] / "straight" / "metrics.jsonl").open()]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    gen = duomo.load(str(result["model"]))
    images = gen.generate("a red circle", n=2)
    assert len(images) == 2 and images[0].size == (8, 8)
    assert gen.meta["text_from"] == setup["clip"]


def test_bad_setups_are_one_line_errors(setup: dict) -> None:
    with pytest.raises(ConfigError, match="text_from"):
        train_generator(config(setup, "e1", text_from=None))
    with pytest.raises(ConfigError, match="not a text-to-image config"):
        train_generator(config(setup, "e2", model="ViT-micro"))
    with pytest.raises(ConfigError, match="task must be"):
        config(setup, "e3", task="generate")
    with pytest.raises(InputError, match="text Transformer"):
        train_generator(config(setup, "e4", text_from="shapes-minilm"))
