"""Training a chat model through the one trainer in LLaVA's two stages: stage 1 moves only the projector,
stage 2 the projector and LoRA adapters; resume is exact; the folder answers; own conversation files train;
bad set-ups are one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import duomo
from duomo.errors import ConfigError, InputError
from duomo.tasks.lm.train import build_trainer
from duomo.train.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks" / "lm"))
from chat_helpers import tiny_lm_dir  # noqa: E402


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lm_dir(tmp_path_factory.mktemp("lm") / "tiny-lm")


def config(base: Path, name: str, lm_dir: Path, **kw: object) -> TrainConfig:
    fields = dict(
        task="chat", model="chat-shapes", vision_from="shapes-tiny", lm_from=str(lm_dir), data="shapes",
        data_size=32, steps=4, batch_size=4, lr=1e-3, warmup=0, wd=0.0, workers=0, log_every=1,
        save_every=2, out=str(base / name), quiet=True, plot=False,
    )  # fmt: skip
    return TrainConfig(**(fields | kw))


@pytest.mark.slow
def test_two_stages_train_what_they_should_and_resume_exactly(tmp_path: Path, lm_dir: Path) -> None:
    stage1 = build_trainer(config(tmp_path, "s1", lm_dir, stage=1))
    before = {k: v.clone() for k, v in stage1.model.state_dict().items()}
    out1 = stage1.fit()["model"]
    after = stage1.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)

    straight = build_trainer(config(tmp_path, "s2", lm_dir, stage=2, pretrained=str(out1), lora_rank=2))
    result = straight.fit()
    trained = json.loads((Path(result["model"]) / "config.json").read_text())["trained"]
    assert trained == ["projector", "lora"]
    build_trainer(config(tmp_path, "s2r", lm_dir, stage=2, pretrained=str(out1), lora_rank=2)).fit(until=2)
    resumed = build_trainer(
        config(tmp_path, "s2r", lm_dir, stage=2, pretrained=str(out1), lora_rank=2, resume="latest")
    )
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    moved = [k for k, v in straight.model.state_dict().items() if ".lora_b" in k and v.abs().sum() > 0]
    assert moved  # the adapters learned (B starts at zero)

    bot = duomo.load(str(result["model"]))
    from duomo.data.shapes import ShapesDataset

    assert isinstance(
        bot.ask(ShapesDataset("val", size=1)[0]["image"], "what colour is it ?", max_tokens=4), str
    )


@pytest.mark.slow
def test_own_conversation_files_train(tmp_path: Path, lm_dir: Path) -> None:
    from duomo.data.export import export_dataset
    from duomo.data.shapes import ShapesDataset

    export_dataset(ShapesDataset("train", size=12), tmp_path / "conv", "conversations")
    data = tmp_path / "conv" / "conversations.json"
    result = build_trainer(config(tmp_path, "own", lm_dir, stage=1, data=str(data), steps=2)).fit()
    assert result["step"] == 2


def test_bad_chat_setups_are_one_line_errors(tmp_path: Path, lm_dir: Path) -> None:
    with pytest.raises(ConfigError, match="vision_from"):
        build_trainer(config(tmp_path, "x", lm_dir, vision_from=None))
    with pytest.raises(ConfigError, match="stage must be"):
        config(tmp_path, "x", lm_dir, stage=3)
    with pytest.raises(ConfigError, match="not a vision-language config"):
        build_trainer(config(tmp_path, "x", lm_dir, model="ViT-tiny"))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"image": "a.png", "conversations": [{"from": "human", "value": "no image"}]}])
    )
    with pytest.raises(InputError, match="no usable conversation"):
        build_trainer(config(tmp_path, "x", lm_dir, data=str(bad)))
