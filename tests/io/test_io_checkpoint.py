"""duomo's native format, format detection, strict loading and error messages (small models, fast)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from duomo.errors import CheckpointError
from duomo.io import (
    detect_format,
    duomo_config_to_openclip,
    duomo_to_openclip,
    export,
    load_into,
    load_model,
    load_native,
    read_checkpoint,
    resolve_hub,
    save_native,
)
from duomo.models import CLIPConfig, create_model, get_model_config


@pytest.fixture
def micro():
    torch.manual_seed(0)
    return create_model("ViT-micro").eval()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_native_round_trip_is_exact(micro, tmp_path):
    save_native(micro, tmp_path / "ckpt", meta={"step": 7, "note": "hello"})
    assert detect_format(tmp_path / "ckpt") == "duomo"
    cfg, sd, meta = load_native(tmp_path / "ckpt")
    assert cfg == micro.config and meta == {"step": 7, "note": "hello"}
    assert_same_state(sd, micro.state_dict())
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (
        config["format"] == "duomo"
        and config["version"] == 1
        and CLIPConfig.from_dict(config["model"]) == cfg
    )
    loaded = load_model(tmp_path / "ckpt")
    assert_same_state(loaded.state_dict(), micro.state_dict())


def test_crash_while_saving_keeps_the_old_checkpoint(micro, tmp_path, monkeypatch):
    save_native(micro, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    other = create_model("ViT-micro")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_native(other, tmp_path / "ckpt")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before  # no temp files left


def test_crash_between_weights_and_config_is_detected(micro, tmp_path, monkeypatch):
    save_native(micro, tmp_path / "ckpt")
    real_replace, calls = os.replace, []

    def replace_weights_only(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_weights_only)
    with pytest.raises(OSError):
        save_native(create_model("ViT-micro"), tmp_path / "ckpt")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="different saves"):
        load_native(tmp_path / "ckpt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_openclip_export_of_a_small_model_reads_back_exactly(micro, tmp_path, suffix):
    path = export(micro, tmp_path / f"micro{suffix}", "openclip")
    assert json.loads(path.with_suffix(".json").read_text())["vision_cfg"]["head_width"] == 32
    assert detect_format(path) == "openclip"
    cfg, sd = read_checkpoint(path)
    assert cfg == micro.config
    assert_same_state(sd, {k: v.contiguous() for k, v in micro.state_dict().items()})


def test_training_checkpoint_wrapper_and_ddp_prefix_are_stripped(micro, tmp_path):
    sd = duomo_to_openclip(micro.state_dict())
    wrapped = {
        "epoch": 3,
        "name": "run",
        "state_dict": {f"module.{k}": v.contiguous() for k, v in sd.items()},
    }
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    _, got = read_checkpoint(tmp_path / "epoch_3.pt", config=micro.config)
    assert_same_state(got, {k: v.contiguous() for k, v in micro.state_dict().items()})


def test_openclip_hub_directory_with_preprocess_config(micro, tmp_path):
    sd = duomo_to_openclip(micro.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config = {"model_cfg": duomo_config_to_openclip(micro.config), "preprocess_cfg": preprocess}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    assert detect_format(tmp_path) == "openclip"
    cfg, _ = read_checkpoint(tmp_path)
    assert cfg.vision.mean == (0.5, 0.5, 0.5) and cfg.vision.std == (0.25, 0.25, 0.25)
    assert cfg.text == micro.config.text and cfg.vision.heads == micro.config.vision.heads


def test_duomo_named_weight_file_infers_its_config(micro, tmp_path):
    save_file({k: v.contiguous() for k, v in micro.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert detect_format(tmp_path / "w.safetensors") == "duomo"
    with pytest.warns(UserWarning, match="quick_gelu"):
        cfg, _ = read_checkpoint(tmp_path / "w.safetensors")
    assert cfg.vision.width == 64 and cfg.vision.heads == 1  # heads follow OpenAI's width // 64 rule
    cfg, _ = read_checkpoint(tmp_path / "w.safetensors", config=micro.config)
    assert cfg == micro.config


def test_quick_gelu_argument_overrides_the_stored_activation(micro, tmp_path):
    save_native(micro, tmp_path / "ckpt")
    cfg, _ = read_checkpoint(tmp_path / "ckpt", quick_gelu=True)
    assert cfg.vision.act == cfg.text.act == "quick_gelu"


def test_load_into_names_missing_unexpected_and_misshapen_keys(micro):
    sd = dict(micro.state_dict())
    del sd["visual.norm.bias"]
    sd["visual.extra.weight"] = torch.zeros(3)
    sd["text.pos_embed"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError) as info:
        load_into(create_model("ViT-micro"), sd)
    message = str(info.value)
    assert "1 missing key (visual.norm.bias)" in message
    assert "1 unexpected key (visual.extra.weight)" in message
    assert "text.pos_embed: checkpoint (5, 64) vs model (16, 64)" in message


def test_load_into_lists_only_the_first_few_keys(micro):
    sd = {k: v for k, v in micro.state_dict().items() if not k.startswith("text.")}
    with pytest.raises(CheckpointError, match=r"\d+ missing keys \(text\.[^)]*, \.\.\.\)"):
        load_into(micro, sd)


def test_wrong_architecture_is_a_checkpoint_error_naming_keys(micro, tmp_path):
    save_native(micro, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="shape difference"):
        load_model(tmp_path / "ckpt", config=get_model_config("ViT-tiny"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_are_checkpoint_errors(micro, tmp_path, suffix, damage):
    path = tmp_path / f"model{suffix}"
    sd = duomo_to_openclip({k: v.contiguous() for k, v in micro.state_dict().items()})
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="download|export|corrupt|readable"):
        read_checkpoint(path)


def test_corrupt_native_config_is_a_checkpoint_error(micro, tmp_path):
    save_native(micro, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"format": "duomo", "version": 1, "model": ')
    with pytest.raises(CheckpointError, match="config.json"):
        read_checkpoint(tmp_path / "ckpt")


def test_future_native_version_asks_for_an_upgrade(micro, tmp_path):
    save_native(micro, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(CheckpointError, match="upgrade"):
        load_native(tmp_path / "ckpt")


def test_not_a_clip_checkpoint(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        read_checkpoint(tmp_path / "x.safetensors")


def test_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pt")


def test_unknown_export_format(micro, tmp_path):
    with pytest.raises(CheckpointError, match="unknown export format"):
        export(micro, tmp_path / "x", "onnx")


def test_hub_without_network_says_what_to_do(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for name in ["hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "openai/clip-vit-base-patch32"]:
        with pytest.raises(CheckpointError, match="cannot reach the Hugging Face hub.*pass the local path"):
            resolve_hub(name)


def test_hub_download_is_used_for_repo_ids(monkeypatch, micro, tmp_path):
    import huggingface_hub

    save_native(micro, tmp_path / "snapshot")
    seen = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kw: seen.append(repo) or tmp_path / "snapshot"
    )
    cfg, _ = read_checkpoint("hf-hub:someone/micro")
    assert seen == ["someone/micro"] and cfg == micro.config


@pytest.mark.parametrize("fmt", ["openclip", "hf"])
def test_conv_stem_has_no_foreign_export(tmp_path, fmt):
    cfg = get_model_config("ViT-micro").to_dict()
    cfg["vision"]["stem"] = "conv"
    model = create_model(CLIPConfig.from_dict(cfg))
    with pytest.raises(CheckpointError, match="stem 'conv'"):
        export(model, tmp_path / ("x.pt" if fmt == "openclip" else "x"), fmt)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pt").exists()
