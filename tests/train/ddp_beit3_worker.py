"""torchrun worker for test_beit3_engine.py: VQA gradients of half a batch per rank under DDP, then a short
`fit_task` run on two ranks with DDP, and the same run with FSDP2 (`fsdp=True`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from duomo.models.beit3 import BEiT3, VQAModel, get_beit3_config
from duomo.tasks.beit3.data import vqa_source, vqa_table
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.train.distributed import cleanup, init_distributed, wrap_ddp
from duomo.train.objectives.beit3 import VQAObjective


def main(out: Path) -> None:
    info = init_distributed("cpu")
    cfg = get_beit3_config("beit3-micro")
    data = vqa_table(vqa_source("shapes", cfg, 6), cfg)
    torch.manual_seed(0)
    model = VQAModel(BEiT3(cfg), data.extra["answers"])
    ddp = wrap_ddp(model, info, find_unused=True)  # the image mask token gets no gradient in VQA
    rows = torch.arange(8)[info.rank * 4 : info.rank * 4 + 4]
    loss = VQAObjective("bce")(ddp, data.batch(rows))["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads}, out / f"rank{info.rank}.pt")
    dist.barrier()
    torch.manual_seed(0)
    model = VQAModel(BEiT3(cfg), data.extra["answers"])
    train = beit3_train_config(
        out=str(out / "ddp"), steps=3, batch_size=2, save_every=3, quiet=True, plot=False
    )
    fit_task(model, VQAObjective("ce"), data, train, "vqa", info=info)
    torch.manual_seed(0)  # the same run with FSDP2: each Multiway block sharded, then the root
    model = VQAModel(BEiT3(cfg), data.extra["answers"])
    train = beit3_train_config(
        out=str(out / "fsdp"), steps=3, batch_size=2, save_every=3, quiet=True, plot=False, fsdp=True
    )
    fit_task(model, VQAObjective("ce"), data, train, "vqa", info=info)
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
