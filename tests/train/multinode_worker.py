"""One node of the two-node test: `torchrun --nnodes 2 --node_rank R --master_addr 127.0.0.1 ...
multinode_worker.py OUT` (one process per node, gloo). Trains the tiny CLIP (DDP, and FSDP2 with --fsdp in
argv) and writes rank 0's weights to OUT/node0.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ColourSquares, make_trainer  # noqa: E402

from duomo.train.distributed import cleanup, init_distributed  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    trainer = make_trainer(out / "run", info=info, steps=3, batch_size=4, accum=2, dataset=ColourSquares(40))
    trainer.fit()
    if info.is_main:
        torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, out / "node0.pt")
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
