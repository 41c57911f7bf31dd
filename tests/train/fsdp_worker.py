"""One rank of the FSDP2 test, launched by `torchrun --nproc_per_node 2 fsdp_worker.py OUT` (gloo on the CPU).
Trains the tiny CLIP with --fsdp (full and sharded saves, resumed from each, and with gradient checkpointing),
and writes rank 0's gathered weights to OUT/fsdp.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ColourSquares, make_trainer  # noqa: E402

from duomo.train import fsdp  # noqa: E402
from duomo.train.distributed import cleanup, init_distributed  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    opts = {
        "steps": 3,
        "batch_size": 4,
        "accum": 2,
        "save_every": 2,
        "dataset": ColourSquares(40),
        "fsdp": True,
    }
    results: dict = {}
    for name, extra in (
        ("full", {}),
        ("sharded", {"fsdp_save": "sharded"}),
        ("ckpt", {"grad_checkpointing": True}),
    ):
        trainer = make_trainer(out / name, info=info, **opts, **extra)
        result = trainer.fit()
        results[name] = fsdp.full_model_state(trainer.model)
        results[f"{name}_model"] = str(result["model"]) if result["model"] else None
        if name != "ckpt":
            resumed = make_trainer(
                out / name,
                info=info,
                resume=str(out / name / "checkpoints/step-00000002.pt"),
                **opts,
                **extra,
            )
            resumed.fit()
            results[f"{name}_resumed"] = fsdp.full_model_state(resumed.model)
    results["shard_numel"] = sum(
        p.to_local().numel() for p in trainer.model.parameters() if hasattr(p, "to_local")
    )
    results["total_numel"] = sum(v.numel() for v in results["full"].values()) if info.is_main else 0
    if info.is_main:
        torch.save(results, out / "fsdp.pt")
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
