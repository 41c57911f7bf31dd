"""Two gloo processes (torchrun) give the loss and gradients of one process on the concatenated batch.

One test launches the two ranks once (tests/train/ddp_worker.py) and checks everything they report, so that
pytest-xdist never starts them twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import SETUPS, fixed_batch, loss_and_grads
from train_helpers import ColourSquares, make_trainer, tiny_model

from duomo.train.checkpoint import list_checkpoints, load_checkpoint
from duomo.train.losses import SigLipLoss

WORKER = Path(__file__).with_name("ddp_worker.py")


def _check_losses_and_gradients(results: list[dict], setup: str) -> None:
    _, local, negatives = SETUPS[setup]
    model = tiny_model(0)
    if SETUPS[setup][0] is SigLipLoss:
        model.logit_bias = torch.nn.Parameter(torch.tensor(-5.0))
    full_loss, full_grads = loss_and_grads(model, fixed_batch(negatives=negatives), setup)
    rank_losses = [r[setup]["loss"] for r in results]
    if local:  # each rank scores its own rows against everyone's: the mean over ranks is the full loss
        assert sum(rank_losses) / 2 == pytest.approx(full_loss, rel=1e-5), setup
    else:  # every rank computes the global logits: each rank's loss is the full loss
        assert rank_losses == pytest.approx([full_loss, full_loss], rel=1e-5), setup
    for rank in results:  # DDP averages the gradients; with gathered features that is the full-batch gradient
        assert set(rank[setup]["grads"]) == set(full_grads), setup
        for name, grad in full_grads.items():
            torch.testing.assert_close(
                rank[setup]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{setup} {name}"
            )


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for setup in SETUPS:  # ClipLoss / SigLipLoss, local and global, with hard negatives
        _check_losses_and_gradients(results, setup)

    # the Trainer under DDP: ranks in lockstep, resume exact, and equal to one process on both ranks' batches
    trained, resumed = results[0]["trained"], results[0]["resumed"]
    for name, value in trained.items():
        assert torch.equal(value, results[1]["trained"][name]), name
        assert torch.equal(value, resumed[name]), name
    single = make_trainer(tmp_path / "single", steps=3, batch_size=8, accum=2, dataset=ColourSquares(40))
    single.fit()  # DistributedSampler deals these same samples to the two ranks
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # rank 0 alone wrote: one metrics line per step, each checkpoint once, with both ranks' RNG states
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    # `duomo train` inside the torchrun process group
    lines = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (tmp_path / "cli" / "model" / "model.safetensors").is_file()
