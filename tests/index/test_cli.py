"""`duomo index` and `duomo search` through duomo.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from index_helpers import make_folder, write_image

from duomo.cli import main
from duomo.cli.index import join_query


def run_status(argv: list[str]) -> int:
    """main's exit status, also when a usage error escapes it as a click exception."""
    try:
        return main(argv)
    except Exception as exc:
        return int(getattr(exc, "exit_code", 2))


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def indexed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A folder of 8 images (one corrupt file) indexed with ViT-micro."""
    photos = tmp_path / "photos"
    make_folder(photos, 8)
    (photos / "broken.png").write_bytes(b"not a png")
    index_dir = tmp_path / "index"
    torch.manual_seed(0)
    args = ["index", str(photos), "--index", str(index_dir), "--model", "ViT-micro", "-b", "3", "-j", "2"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "8 added" in out and "1 failed" in out and "8 images searchable" in out
    assert "broken.png" in err
    return photos, index_dir


def test_index_is_incremental(indexed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    photos, index_dir = indexed
    write_image(photos / "new.png", 77)
    (photos / "img001.jpg").unlink()
    assert main(["index", "--index", str(index_dir), "-q"]) == 0  # the recorded folder and model
    out = capsys.readouterr().out
    assert "1 added" in out and "1 removed" in out and "8 images searchable" in out and "ViT-micro" in out


def test_search_formats(indexed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    photos, index_dir = indexed
    query = str(photos / "img002.webp")
    assert main(["search", query, "--index", str(index_dir), "-k", "3", "--format", "paths"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0] == query

    assert main(["search", query, "+", "0.1:a dog", "--index", str(index_dir), "-k", "2", "-f", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"] == "ViT-micro" and payload["query"] == f'{query} + "0.1:a dog"'
    assert [r["rank"] for r in payload["results"]] == [1, 2]
    assert payload["results"][0]["path"] == query

    assert main(["search", "a red car", "--index", str(index_dir), "--exact"]) == 0
    out = capsys.readouterr().out
    assert "a red car" in out and "score" in out and out.count("│ ") >= 8


def test_search_errors(
    indexed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, index_dir = indexed
    assert main(["search", "dog +", "--index", str(index_dir)]) == 1
    assert "ends with an operator" in flat(capsys.readouterr().err)
    assert main(["search", "dog", "--index", str(tmp_path / "nowhere")]) == 1
    assert "no index at" in flat(capsys.readouterr().err)
    assert not (tmp_path / "nowhere").exists()
    assert run_status(["search", "dog", "--index", str(index_dir), "--format", "xml"]) != 0
    assert main(["search", "dog", "--index", str(index_dir), "--model", "ViT-tiny"]) == 1
    assert "built with ViT-micro" in flat(capsys.readouterr().err)


def test_index_errors(indexed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos, index_dir = indexed
    assert main(["index", str(photos), "--index", str(index_dir), "--model", "ViT-tiny"]) == 1
    err = flat(capsys.readouterr().err)
    assert "built with ViT-micro" in err and "--reindex" in err
    assert main(["index", str(tmp_path / "missing"), "--index", str(index_dir)]) == 1
    assert "does not exist" in flat(capsys.readouterr().err)


def test_empty_index_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["index", str(empty), "--index", str(tmp_path / "index"), "-m", "ViT-micro"]) == 0
    assert main(["search", "dog", "--index", str(tmp_path / "index")]) == 1
    assert "holds no images" in flat(capsys.readouterr().err)


def test_forget_and_reindex(
    indexed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos, index_dir = indexed
    other = tmp_path / "other"
    make_folder(other, 2, seed=4)
    assert main(["index", str(other), "--index", str(index_dir), "-q"]) == 0
    assert "10 images searchable" in capsys.readouterr().out
    assert main(["index", "--forget", str(other), "--index", str(index_dir)]) == 0
    assert "2 files dropped" in capsys.readouterr().out
    assert main(["index", "--reindex", "--index", str(index_dir), "-m", "ViT-micro", "-q"]) == 0
    out = capsys.readouterr().out
    assert "8 added" in out and "8 images searchable" in out


def test_env_var_names_the_index(
    indexed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    photos, index_dir = indexed
    monkeypatch.setenv("DUOMO_INDEX", str(index_dir))
    assert main(["search", str(photos / "sub" / "img003.bmp"), "-f", "paths", "-k", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(photos / "sub" / "img003.bmp")


@pytest.mark.parametrize(
    ("words", "query"),
    [
        (["golden retriever"], "golden retriever"),
        (['"2:golden retriever" + ./pool.jpg - fruit'], '"2:golden retriever" + ./pool.jpg - fruit'),
        (
            ["2:golden retriever", "+", "./pool.jpg", "-", "fruit"],
            '"2:golden retriever" + ./pool.jpg - fruit',
        ),
        (["dog", "running"], "dog running"),
        (["t - shirt", "-", "x"], '"t - shirt" - x'),
    ],
)
def test_join_query(words: list[str], query: str) -> None:
    assert join_query(words) == query


def test_index_layout_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    make_folder(photos, 6)
    index_dir = tmp_path / "index"
    base = ["index", str(photos), "--index", str(index_dir), "--model", "ViT-micro", "-b", "2"]
    assert run_status([*base, "--layout", "2"]) == 1  # refused before any work
    err = capsys.readouterr().err
    assert "--layout must be auto or WORKERSxTHREADS" in err and len(err.strip().splitlines()) == 1
    assert not index_dir.exists()
    assert main([*base, "--layout", "2x1"]) == 0
    out, err = capsys.readouterr()
    assert "6 added" in out and "layout 2x1 (workers x threads, given)" in err
