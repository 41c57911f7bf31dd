"""BEiT-3 objectives through the one trainer: exact resume, and two gloo processes equal one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duomo.io.beit3_tasks import load_task
from duomo.models.beit3 import BEiT3, BEiT3ForMDM, VQAModel, get_beit3_config
from duomo.tasks.beit3 import pretrain
from duomo.tasks.beit3.data import caption_source, vqa_source, vqa_table
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.train.objectives.beit3 import VQAObjective

CFG = get_beit3_config("beit3-micro")
WORKER = Path(__file__).with_name("ddp_beit3_worker.py")


def _vqa(seed: int = 0) -> tuple[VQAModel, object]:
    data = vqa_table(vqa_source("shapes", CFG, 6), CFG)
    torch.manual_seed(seed)
    return VQAModel(BEiT3(CFG), data.extra["answers"]), data


def _cfg(out: Path, **kw) -> object:  # noqa: ANN003
    return beit3_train_config(
        out=str(out), steps=6, batch_size=4, lr=1e-3, save_every=3, quiet=True, plot=False, **kw
    )


@pytest.mark.slow
def test_vqa_resume_latest_is_bit_identical(tmp_path) -> None:
    model, data = _vqa()
    fit_task(model, VQAObjective("ce"), data, _cfg(tmp_path / "straight"), "vqa")
    model, data = _vqa()
    stopped = fit_task(model, VQAObjective("ce"), data, _cfg(tmp_path / "resumed"), "vqa", until=3)
    assert stopped["model"] is None and stopped["step"] == 3
    model, data = _vqa(seed=123)  # other initial weights: everything must come from the checkpoint
    fit_task(model, VQAObjective("ce"), data, _cfg(tmp_path / "resumed", resume="latest"), "vqa")
    a, _ = load_task(tmp_path / "straight", "vqa")
    b, _ = load_task(tmp_path / "resumed", "vqa")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    import json

    def losses(folder: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "resumed")[-1] == losses(tmp_path / "straight")[-1]  # the step-6 record


@pytest.mark.slow
def test_mdm_pretraining_resumes_exactly_with_its_masks(tmp_path) -> None:
    source = caption_source("shapes", CFG, 8)

    def run(out: Path, until: int | None = None, resume: str | None = None, seed: int = 0) -> None:
        table, ids, pad, kinds = pretrain.pretraining_data(source, CFG, 4, 0, False)
        torch.manual_seed(seed)
        model = BEiT3ForMDM(BEiT3(CFG))
        cfg = _cfg(out, resume=resume)
        loaders = lambda info: pretrain.mdm_loader_factory(table, ids, pad, 4, kinds, 0, info.rank)  # noqa: E731
        fit_task(model, pretrain.mdm_objective(CFG, False), loaders, cfg, "mdm", until=until)

    run(tmp_path / "a")
    run(tmp_path / "b", until=4)
    run(tmp_path / "b", resume="latest", seed=9)
    a, _ = load_task(tmp_path / "a", "mdm")
    b, _ = load_task(tmp_path / "b", "mdm")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_two_gloo_processes_equal_one_on_the_vqa_objective(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model, data = _vqa()
    batch = data.batch(torch.arange(8))
    loss = VQAObjective("bce")(model, batch)["loss"]
    loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got["grads"]) == set(full)
        for name, grad in full.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the engine under torchrun: both ranks trained in lockstep and rank 0 wrote the task folder
    trained, _ = load_task(tmp_path / "ddp", "vqa")
    assert (tmp_path / "ddp" / "checkpoints").is_dir() and trained.answers == model.answers
    # FSDP2 on a BEiT-3 objective: two ranks of 2 give the weights of one process on batches of 4
    model, data = _vqa()
    single = beit3_train_config(
        out=str(tmp_path / "single"), steps=3, batch_size=4, save_every=3, quiet=True, plot=False
    )
    fit_task(model, VQAObjective("ce"), data, single, "vqa")
    want, _ = load_task(tmp_path / "single", "vqa")
    sharded, _ = load_task(tmp_path / "fsdp", "vqa")
    for (name, x), (_, y) in zip(want.state_dict().items(), sharded.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)
