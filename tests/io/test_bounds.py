"""Issue 11's checkpoint reproductions: small files that would force big allocations, malformed configs,
shard indexes pointing outside their folder. Each is one CheckpointError/ConfigError, before allocating."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import duomo
from duomo.errors import CheckpointError, ConfigError
from duomo.io import export
from duomo.io.files import load_weights
from duomo.models.clip.config import CLIPConfig


def test_a_stride_zero_tensor_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1).expand(40_000, 40_000)}, tmp_path / "s0.pt")
    assert (tmp_path / "s0.pt").stat().st_size < 2_000
    with pytest.raises(CheckpointError, match="strided view"):
        load_weights(tmp_path / "s0.pt")


def test_shared_storage_views_still_load(tmp_path: Path) -> None:
    qkv = torch.randn(6, 4)
    q, k, _ = qkv.chunk(3)
    torch.save({"q": q, "k": k}, tmp_path / "views.pt")
    loaded = load_weights(tmp_path / "views.pt")
    assert torch.equal(loaded["q"], q) and torch.equal(loaded["k"], k)


def test_a_compressed_zip_entry_is_not_inflated(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(8_000_000, dtype=torch.uint8)}, tmp_path / "big.pt")
    with (
        zipfile.ZipFile(tmp_path / "big.pt") as src,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert (tmp_path / "bomb.pt").stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="inflate"):
        load_weights(tmp_path / "bomb.pt")


def _hf_dir(tmp_path: Path) -> Path:
    export(duomo.load("ViT-micro").model, tmp_path / "hf", "hf")
    return tmp_path / "hf"


def _edit(folder: Path, tower: str, **values: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config[tower].update(values)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_huge_hf_config_is_refused_before_building(tmp_path: Path) -> None:
    folder = _hf_dir(tmp_path)
    _edit(folder, "vision_config", hidden_size=10**7)
    with pytest.raises(CheckpointError, match="does not belong to these weights"):
        duomo.load(folder)


@pytest.mark.parametrize(
    ("tower", "values", "match"),
    [
        ("vision_config", {"hidden_size": "abc"}, "malformed HF CLIP config"),
        ("vision_config", {"num_attention_heads": 0}, "heads must be at least 1"),
        ("vision_config", {"num_hidden_layers": 2.5}, "layers must be a whole number"),
        ("text_config", {"layer_norm_eps": "tiny"}, "norm_eps must be a finite number"),
        ("text_config", {"hidden_size": -8}, "width must be at least 1"),
    ],
)
def test_malformed_hf_configs_are_one_error(tmp_path: Path, tower: str, values: dict, match: str) -> None:
    folder = _hf_dir(tmp_path)
    _edit(folder, tower, **values)
    with pytest.raises(CheckpointError, match=match):
        duomo.load(folder)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"embed_dim": "abc"}, "embed_dim must be a whole number"),
        ({"vision": {"layers": 2.5}}, "layers must be a whole number"),
        ({"vision": {"heads": 0}}, "heads must be at least 1"),
        ({"vision": {"width": 100, "heads": 3}}, "not divisible"),
        ({"vision": {"head_width": 0, "width": 64}}, "malformed model config"),
        ({"text": {"norm_eps": "tiny"}}, "finite number"),
        ({"text": {"norm_eps": float("nan")}}, "finite number"),
        ({"vision": {"mean": [0.5, 0.5]}}, "3 numbers"),
        ({"vision": {"image_size": 30, "patch_size": 8}}, "not a multiple"),
        ({"text": {"extra": 3}}, "JSON object"),
        ("not a dict", "JSON object"),
    ],
)
def test_config_values_are_checked_before_building(data: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CLIPConfig.from_dict(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/passwd", "sub/../../x.safetensors", 3, ""])
def test_shard_indexes_stay_inside_their_folder(tmp_path: Path, shard: object) -> None:
    folder = _hf_dir(tmp_path)
    (folder / "model.safetensors").rename(tmp_path / "evil.safetensors")
    index = {"weight_map": {"logit_scale": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name|outside the checkpoint folder"):
        duomo.load(folder)


@pytest.mark.slow
def test_the_bounds_keep_peak_memory_small(tmp_path: Path) -> None:
    """The issue's measure: peak RSS grows by under 100 MB loading each crafted file."""
    torch.save({"w": torch.zeros(1).expand(200_000, 200_000)}, tmp_path / "s0.pt")
    folder = _hf_dir(tmp_path)
    _edit(folder, "vision_config", hidden_size=10**7)
    script = (
        "import resource, sys, duomo\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        duomo.load(path)\n"
        "    except duomo.DuomoError:\n"
        "        pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s0.pt"), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert int(out.stdout.strip().splitlines()[-1]) < 100, out.stdout
    assert resource  # the parent measures nothing; the child reports its own growth
