"""FSDP2 (`duomo train --fsdp`): two gloo processes give the weights of one process on the whole batch;
full and sharded checkpoints resume exactly; gradient checkpointing composes; the temperature stays a scalar
in the exported model; a rank holds about half of the weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ColourSquares, make_trainer

from duomo.io.files import load_weights

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.mark.slow
def test_two_fsdp_processes_equal_one(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    single = make_trainer(tmp_path / "single", steps=3, batch_size=8, accum=2, dataset=ColourSquares(40))
    single.fit()  # DistributedSampler deals these same samples to the two ranks
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(results["full"][name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(results["ckpt"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for kind in ("full", "sharded"):
        for name, value in results[kind].items():
            assert torch.equal(value, results[f"{kind}_resumed"][name]), f"{kind} {name}"
    assert (tmp_path / "sharded" / "checkpoints" / "step-00000002.dcp").is_dir()
    assert results["shard_numel"] < 0.6 * results["total_numel"]

    exported = load_weights(Path(results["full_model"]) / "model.safetensors")
    assert exported["logit_scale"].shape == torch.Size([])  # the scalar stayed whole and keeps its shape
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=1e-4, atol=1e-5, msg=name)
