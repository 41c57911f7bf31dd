"""The ONNX Runtime backend: fp32 parity with duomo, int8 quality, the same Pipeline API, the CLI's check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import duomo
from duomo.cli import main
from duomo.data.shapes import ShapesDataset
from duomo.io.onnx import OnnxCLIP, cosine_check, export_onnx, is_onnx_folder, quantize_onnx

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed (duomo[onnx])"
)
TEXTS = ["a red star", "a small blue circle on the left", "hello", "x" * 300]


@pytest.fixture(scope="module")
def images() -> list:
    ds = ShapesDataset("val", 12, image_size=64, max_objects=2)
    return [ds[i]["image"] for i in range(len(ds))]


@pytest.mark.parametrize("name", ["shapes-tiny", "shapes-minilm"])
def test_fp32_onnx_equals_duomo(tmp_path: Path, images: list, name: str) -> None:
    pipe = duomo.load(name)
    folder = export_onnx(pipe.model, tmp_path / "onnx", pipe.meta)
    assert is_onnx_folder(folder) and not is_onnx_folder(tmp_path)
    onnx = duomo.load(folder)  # the same Pipeline, backed by ONNX Runtime
    assert isinstance(onnx.model, OnnxCLIP) and onnx.meta["backend"] == "onnxruntime"
    torch.testing.assert_close(onnx.encode_image(images), pipe.encode_image(images), rtol=0, atol=1e-5)
    torch.testing.assert_close(onnx.encode_text(TEXTS), pipe.encode_text(TEXTS), rtol=0, atol=1e-5)
    labels = ["red star", "blue circle", "green square"]
    assert [r[0][0] for r in onnx.zero_shot_classify(images[:4], labels)] == [
        r[0][0] for r in pipe.zero_shot_classify(images[:4], labels)
    ]


def test_int8_keeps_the_embeddings_of_a_trained_tower(tmp_path: Path, images: list) -> None:
    pipe = duomo.load("shapes-minilm")
    int8 = quantize_onnx(export_onnx(pipe.model, tmp_path / "fp32"), tmp_path / "int8")
    model = OnnxCLIP(int8)
    assert model.precision == "int8"
    pixels = torch.stack([pipe.preprocess(im) for im in images])
    assert cosine_check(pipe.model, model, pixels)["min_cosine"] >= 0.999
    assert (tmp_path / "int8" / "image.onnx").stat().st_size < 0.5 * (
        tmp_path / "fp32" / "image.onnx"
    ).stat().st_size


def test_cli_convert_to_onnx_checks_and_refuses(tmp_path: Path, images: list, capsys) -> None:  # noqa: ANN001
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(images):
        im.save(photos / f"{i}.png")
    (photos / "broken.png").write_bytes(b"nope")  # skipped by the check
    out = tmp_path / "int8"
    args = ["convert", "shapes-tiny", str(out), "--to", "onnx", "--int8", "--check", str(photos)]
    assert main(args) == 0
    assert "cosine to fp32 min" in capsys.readouterr().out and is_onnx_folder(out)
    refused = tmp_path / "refused"
    assert main([*args[:2], str(refused), *args[3:], "--min-cosine", "1.0"]) == 1
    assert "below --min-cosine" in capsys.readouterr().err and not refused.exists()
    assert main(["convert", "shapes-tiny", str(tmp_path / "x"), "--to", "hf", "--int8"]) == 1
    assert main(["embed", str(photos / "0.png"), "-o", str(tmp_path / "e.npy"), "--model", str(out)]) == 0


@pytest.mark.parametrize("scheme", ["s8", "u8-reduce-range"])
def test_both_int8_schemes_keep_the_embeddings(tmp_path: Path, images: list, scheme: str) -> None:
    from duomo.io.onnx import int8_scheme, signed_int8_is_exact

    assert int8_scheme() == ("s8" if signed_int8_is_exact() else "u8-reduce-range")  # measured, per machine
    pipe = duomo.load("shapes-tiny")
    out = quantize_onnx(export_onnx(pipe.model, tmp_path / "fp32"), tmp_path / scheme, scheme=scheme)
    pixels = torch.stack([pipe.preprocess(im) for im in images])
    assert cosine_check(pipe.model, OnnxCLIP(out), pixels)["min_cosine"] >= 0.999
    import json

    assert json.loads((out / "config.json").read_text())["int8_scheme"] == scheme
    with pytest.raises(duomo.ConfigError, match="unknown int8 scheme"):
        quantize_onnx(tmp_path / "fp32", tmp_path / "bad", scheme="s4")


def test_the_backend_option_exports_once_and_caches(tmp_path: Path, images: list, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("DUOMO_CACHE", str(tmp_path / "cache"))
    torch_pipe = duomo.load("shapes-tiny")
    onnx = duomo.load("shapes-tiny", backend="onnxruntime")
    assert isinstance(onnx.model, OnnxCLIP) and str(tmp_path / "cache") in onnx.name
    torch.testing.assert_close(onnx.encode_image(images), torch_pipe.encode_image(images), rtol=0, atol=1e-5)
    again = duomo.load("shapes-tiny", backend="onnxruntime")  # from the cache, no second export
    assert again.name == onnx.name and len(list((tmp_path / "cache" / "onnx").iterdir())) == 1
    assert duomo.load(onnx.name, backend="onnxruntime-int8").name == onnx.name  # already an ONNX folder
    with pytest.raises(duomo.InputError, match="unknown backend"):
        duomo.load("shapes-tiny", backend="tensorrt")
    photos = tmp_path / "photos"
    photos.mkdir()
    images[0].save(photos / "a.png")
    args = ["index", str(photos), "--index", str(tmp_path / "idx"), "--model", "shapes-tiny"]
    assert main([*args, "--backend", "onnxruntime-int8"]) == 0


def test_the_server_runs_on_the_onnx_backend(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from duomo.serve import ServeSettings, create_app

    monkeypatch.setenv("DUOMO_CACHE", str(tmp_path / "cache"))
    settings = ServeSettings(use_index=False, model="shapes-tiny", backend="onnxruntime")
    with TestClient(create_app(settings)) as client:
        r = client.post("/embed", json={"texts": ["a red star"]})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["text_embeddings"][0])
    want = duomo.load("shapes-tiny").encode_text("a red star")[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
