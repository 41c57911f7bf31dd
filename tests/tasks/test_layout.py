"""Bulk jobs' worker x thread layout: slices run concurrently with the right thread count, results equal the
plain call, "auto" measures on the job's own batches, keeps the faster layout and remembers it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

import duomo
from duomo.errors import InputError
from duomo.tasks.layout import Layout, LayoutEncoder, candidate_layouts, layout_encoder, parse_layout


def test_parse_layout() -> None:
    assert parse_layout("auto") is None and parse_layout(None) is None
    assert parse_layout("2x1") == Layout(2, 1) and str(Layout(1, 2)) == "1x2"
    for bad in ("2", "0x1", "two", "2x0", "1x-1"):
        with pytest.raises(InputError, match="WORKERSxTHREADS"):
            parse_layout(bad)
    assert candidate_layouts(2) == [Layout(1, 2), Layout(2, 1)] and candidate_layouts(1) == [Layout(1, 1)]


def test_workers_run_slices_concurrently_with_their_thread_count() -> None:
    seen: list[tuple[int, str, int]] = []
    barrier = threading.Barrier(2, timeout=5)  # both slices must be inside encode at once

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen.append((len(pixels), threading.current_thread().name, torch.get_num_threads()))
        barrier.wait()
        return pixels.sum(dim=(1, 2, 3), keepdim=False)[:, None] * 2

    before = torch.get_num_threads()
    encoder = LayoutEncoder(encode, Layout(2, 1), cores=2)
    batch = torch.arange(7 * 3 * 2 * 2, dtype=torch.float32).reshape(7, 3, 2, 2)
    out = encoder(batch)
    assert torch.equal(out, batch.sum(dim=(1, 2, 3))[:, None] * 2)  # slices put back in order
    assert sorted(n for n, _, _ in seen) == [3, 4] and {t for _, _, t in seen} == {1}
    assert len({name for _, name, _ in seen}) == 2 and torch.get_num_threads() == before
    encoder.close()


def test_auto_alternates_then_keeps_the_faster_and_remembers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DUOMO_LAYOUTS", str(tmp_path / "layouts.json"))
    used: list[int] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        used.append(threads)
        time.sleep(0.02 if threads == 2 else 0.002)  # here one-thread workers are much faster
        return pixels[:, :1, 0, 0]

    encoder = LayoutEncoder(encode, None, key="m|batch=4", cores=2)
    assert encoder.how == "measuring"
    for _ in range(6):
        encoder(torch.zeros(4, 3, 2, 2))
    assert encoder.layout == Layout(2, 1) and encoder.how == "measured"
    assert "2x1" in encoder.describe() and "x the other layout" in encoder.describe()
    stored = json.loads((tmp_path / "layouts.json").read_text())
    assert list(stored.values()) == ["2x1"] and "m|batch=4|cores=2" in next(iter(stored))
    again = LayoutEncoder(encode, None, key="m|batch=4", cores=2)  # the next job starts with it
    assert again.layout == Layout(2, 1) and again.how == "remembered"
    other = LayoutEncoder(encode, None, key="m|batch=8", cores=2)  # another batch size measures anew
    assert other.layout is None


def test_a_real_model_gives_the_same_embeddings_under_each_layout() -> None:
    torch.manual_seed(0)
    pipe = duomo.load("ViT-micro")
    size = pipe.transform.image_size
    pixels = torch.randn(6, 3, size, size)
    want = pipe.encode_pixels(pixels)
    for layout in ("1x2", "2x1", "3x1"):
        encode = layout_encoder(pipe, layout, 6)
        torch.testing.assert_close(encode(pixels), want, atol=1e-5, rtol=1e-5)


def test_other_backends_run_as_they_are() -> None:
    class OnnxLike:  # the pipeline surface layout_encoder reads
        device, name, meta = "cpu", "x.onnx", {"backend": "onnxruntime"}

        def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
            threads.append(torch.get_num_threads())
            return pixels[:, :1, 0, 0]

    threads: list[int] = []
    before = torch.get_num_threads()
    with layout_encoder(OnnxLike(), "2x1", 4) as encode:
        out = encode(torch.ones(4, 3, 2, 2))
    assert out.shape == (4, 1) and threads == [before]  # one call, the thread setting untouched
    assert encode.describe() == ""
