"""Collection embedding as a resumable job: the in-process path equals `duomo embed`; on a local Ray cluster
(2 CPUs, started for this module and stopped after) a driver that dies mid-way is restarted, embeds only the
missing partitions, and ends with exactly one vector per good image, equal to the in-process result."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from index_helpers import coloured_squares

import duomo
from duomo.errors import InputError
from duomo.index.collection import part_name, read_collection, run_collection_job
from duomo.tasks.clip.embed import embed_image_files

MODEL = "shapes-tiny"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return coloured_squares(tmp_path_factory.mktemp("collection") / "images")


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray]:
    out = tmp_path_factory.mktemp("ref") / "emb"
    result = run_collection_job(images, out, MODEL, partition_size=4, use_ray=False)
    assert result["failed"] == {"a/broken.png": result["failed"]["a/broken.png"]}
    return read_collection(out)


def test_in_process_job_equals_duomo_embed(images: Path, reference: tuple) -> None:
    keys, vectors = reference
    files = sorted(p for p in images.rglob("*.png"))
    single = embed_image_files(duomo.load(MODEL), files, batch_size=4)
    want = dict(zip([str(Path(p).relative_to(images)) for p in single.paths], single.embeddings, strict=True))
    assert (
        sorted(keys) == sorted(want) and len(keys) == 23
    )  # one vector per good image, the broken one listed
    for key, vector in zip(keys, vectors, strict=True):
        np.testing.assert_allclose(vector, want[key], atol=1e-6)


def test_a_different_job_in_the_same_folder_is_refused(images: Path, tmp_path: Path) -> None:
    run_collection_job(images, tmp_path / "emb", MODEL, partition_size=8, use_ray=False)
    with pytest.raises(InputError, match="another embedding job"):
        run_collection_job(images, tmp_path / "emb", MODEL, partition_size=5, use_ray=False)
    with pytest.raises(InputError, match="no such file"):
        run_collection_job(tmp_path / "missing", tmp_path / "x", MODEL, use_ray=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    pytest.importorskip("ray")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    start = [ray_bin, "start", "--head", "--num-cpus", "2", "--port", str(port)]
    start += ["--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_job_killed_midway_finishes_with_only_the_missing_partitions(
    images: Path, reference: tuple, ray_cluster: str, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    # a driver that dies abruptly (os._exit, no clean-up) once two partitions are reported done
    crash = textwrap.dedent(f"""
        import os
        from duomo.index.collection import run_collection_job
        def progress(done, total):
            if done >= 2:
                os._exit(9)
        run_collection_job({str(images)!r}, {str(out)!r}, {MODEL!r}, partition_size=4, use_ray=True,
                           address={ray_cluster!r}, actors=1, progress=progress)
    """)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", crash], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    there = {i for i in range(6) if (out / part_name(i)).is_file()}
    assert 2 <= len(there) < 6 and not (out / "manifest.json").exists()

    result = run_collection_job(
        images, out, MODEL, partition_size=4, use_ray=True, address=ray_cluster, actors=2
    )
    assert set(result["computed"]) == set(range(6)) - there  # only the missing partitions were embedded
    keys, vectors = read_collection(out)
    want_keys, want = reference
    assert keys == want_keys  # exactly one vector per good image, in the same order
    np.testing.assert_array_equal(vectors, want)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vectors"] == 23 and list(manifest["failed"]) == ["a/broken.png"]
    assert manifest["model"] == MODEL and manifest["dim"] == vectors.shape[1]
    assert not list(out.glob(".*.tmp"))  # a partition cut off mid-write never shows up as a result


def test_the_in_process_job_gives_the_callers_thread_setting_back(images: Path, tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_collection_job(images, tmp_path / "emb", MODEL, partition_size=50, use_ray=False)
        assert torch.get_num_threads() == 1  # the worker used every core, then restored the caller's 1
    finally:
        torch.set_num_threads(before)
