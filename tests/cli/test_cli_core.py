import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from duomo.cli import main


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        Image.fromarray((rng.random((30 + i, 40, 3)) * 255).astype("uint8")).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_models_lists_configs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "ViT-B-32" in out and "ViT-L-14-336" in out


def test_embed_folder_to_npy_and_parquet(photos, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert main(["embed", str(photos), "--out", str(out), "--model", "ViT-micro"]) == 0
    vectors = np.load(out)
    keys = json.loads(out.with_suffix(".keys.json").read_text())
    assert vectors.shape == (3, 64) and len(keys) == 3
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    pq_out = tmp_path / "emb.parquet"
    assert main(["embed", str(photos), "-o", str(pq_out), "-m", "ViT-micro"]) == 0
    table = pq.read_table(pq_out)
    assert table.column_names == ["key", "embedding"] and table.num_rows == 3


def test_embed_refuses_to_overwrite_and_skips_corrupt(photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "emb.npy"
    assert main(["embed", str(photos), "-o", str(out), "-m", "ViT-micro"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.out and "broken.png" in captured.out
    assert np.load(out).shape[0] == 3
    before = out.read_bytes()
    assert main(["embed", str(photos), "-o", str(out), "-m", "ViT-micro"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_embed_texts(tmp_path):
    out = tmp_path / "t.npy"
    assert main(["embed", "--text", "a cat", "a dog", "-o", str(out), "-m", "ViT-micro"]) == 0
    assert np.load(out).shape == (2, 64)


def test_classify_prints_table_and_json(photos, capsys):
    assert main(["classify", str(photos / "a.png"), "--labels", "cat,dog", "-m", "ViT-micro"]) == 0
    assert "a.png" in capsys.readouterr().out
    assert main(["classify", str(photos), "-l", "cat,dog,car", "-k", "2", "--json", "-m", "ViT-micro"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 3 and all(len(r["labels"]) == 2 for r in records)


def test_convert_between_formats(tmp_path, capsys):
    import duomo

    pipe = duomo.load("ViT-micro")
    src = pipe.save(tmp_path / "native")
    oc = tmp_path / "oc.safetensors"
    assert main(["convert", str(src), str(oc), "--to", "openclip"]) == 0
    hf = tmp_path / "hf"
    assert main(["convert", str(oc), str(hf), "--to", "hf"]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(hf), str(back), "--to", "duomo"]) == 0
    again = duomo.load(str(back))
    np.testing.assert_allclose(
        again.encode_text("a cat").numpy(), pipe.encode_text("a cat").numpy(), atol=1e-6
    )
    assert main(["convert", str(src), str(back), "--to", "duomo"]) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "/no/such/file.png", "-l", "a,b"], "no such file"),
        (["embed", "x", "-o", "out.txt", "--text", "-m", "ViT-micro"], ".npy"),
        (["classify", "{img}", "-l", " , ", "-m", "ViT-micro"], "no labels"),
        (["embed", "{img}", "-o", "{tmp}/e.npy", "-m", "No-Such-Model"], "unknown model"),
        (["convert", "{tmp}/missing", "{tmp}/o", "--to", "hf"], ""),
        (["classify", "{bad}", "-l", "a,b", "-m", "ViT-micro"], "bad.png"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, photos, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    argv = [a.format(img=photos / "a.png", tmp=tmp_path, bad=bad) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and message.lower() in err.lower()


def test_a_commands_exit_code_is_kept(tmp_path, capsys) -> None:  # noqa: ANN001
    """`duomo embed` of only corrupt files raises typer.Exit(1): the process must exit 1, not 0."""
    from duomo.cli import main

    (tmp_path / "bad.png").write_bytes(b"not an image")
    code = main(["embed", str(tmp_path / "bad.png"), "-o", str(tmp_path / "out.npy")])
    assert code == 1, capsys.readouterr()


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    import duomo.cli.data as data_cli
    from duomo.cli import main

    def full_disk(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(data_cli, "export_dataset", full_disk)
    assert main(["data", "export", "shapes", str(tmp_path / "x"), "--size", "2"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["embed", "index"])
def test_an_interrupt_exits_130(tmp_path, monkeypatch, capsys, command: str) -> None:  # noqa: ANN001
    from PIL import Image

    import duomo.api
    from duomo.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(duomo.api, "load", interrupted)
    argv = {
        "embed": ["embed", str(tmp_path / "a.png"), "-o", str(tmp_path / "o.npy")],
        "index": ["index", str(tmp_path), "--index", str(tmp_path / "idx")],
    }[command]
    assert main(argv) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_indexing_only_unreadable_files_exits_1(tmp_path, capsys) -> None:  # noqa: ANN001
    from duomo.cli import main

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"nope")
    args = ["index", str(tmp_path / "imgs"), "--index", str(tmp_path / "idx"), "--model", "ViT-micro"]
    assert main(args) == 1
    assert "1 failed" in capsys.readouterr().out
