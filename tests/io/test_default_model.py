"""With no model named: the real pretrained CLIP when the hub has it (cached here, offline), else the embedded
model with one line saying what it is and how to get a real one."""

from __future__ import annotations

from pathlib import Path

import pytest

import duomo
import duomo.io.resolve as resolve
from duomo.cli import main
from duomo.io import export

REPO = "duomo-test/tiny-clip"


def fake_hub_cache(root: Path) -> None:
    """A random-weight CLIP laid out as the hub cache lays a downloaded repo out."""
    snapshot = root / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    export(duomo.load("ViT-micro").model, snapshot, "hf")
    (root / f"models--{REPO.replace('/', '--')}" / "refs").mkdir(parents=True)
    (root / f"models--{REPO.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(resolve, "REAL_MODEL", REPO)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_offline_with_nothing_cached_falls_back_and_says_so(offline: Path, capsys) -> None:  # noqa: ANN001
    name, notice = resolve.choose_default_model()
    assert name == "shapes-tiny" and "only knows the built-in shapes world" in notice
    (offline / "imgs").mkdir()
    duomo.load("shapes-tiny")  # warm
    from PIL import Image

    Image.new("RGB", (40, 40), "red").save(offline / "imgs" / "a.png")
    assert main(["index", str(offline / "imgs"), "--index", str(offline / "idx")]) == 0
    err = capsys.readouterr().err
    assert (
        "only knows the built-in shapes world" in err
        and len([x for x in err.splitlines() if "note:" in x]) == 1
    )


def test_a_cached_real_model_is_used_offline(offline: Path, capsys) -> None:  # noqa: ANN001
    fake_hub_cache(offline / "hub")
    assert resolve.choose_default_model() == (REPO, None)
    from PIL import Image

    (offline / "imgs").mkdir()
    Image.new("RGB", (40, 40), "red").save(offline / "imgs" / "a.png")
    assert main(["index", str(offline / "imgs"), "--index", str(offline / "idx")]) == 0
    out = capsys.readouterr()
    assert REPO in out.out and "note:" not in out.err  # the index records the model it was built with
