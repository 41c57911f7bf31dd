"""One rank of the DDP tests, launched by `torchrun --nproc_per_node 2 ddp_worker.py OUT` (gloo on the CPU).

Writes OUT/rank{R}.pt with, for each loss set-up, this rank's loss and the DDP-averaged gradients of its
half of a fixed batch, and the weights after a short Trainer run (plus a resumed copy of it); then runs
`duomo train` into OUT/cli.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import ColourSquares, WordTokenizer, identity_transform, make_trainer, tiny_model  # noqa: E402

from duomo.train.data import PairCollate, PreparedPairs  # noqa: E402
from duomo.train.distributed import cleanup, init_distributed, unwrap, wrap_ddp  # noqa: E402
from duomo.train.losses import ClipLoss, SigLipLoss  # noqa: E402
from duomo.train.objectives.clip import ContrastiveObjective  # noqa: E402

SETUPS = {
    "clip_global": (ClipLoss, False, 0),
    "clip_local": (ClipLoss, True, 0),
    "clip_local_negatives": (ClipLoss, True, 1),
    "siglip_local": (SigLipLoss, True, 0),
    "siglip_global": (SigLipLoss, False, 0),
}


def fixed_batch(n: int = 8, negatives: int = 0) -> dict:
    """The same batch on every rank (and in the test process)."""
    data = PreparedPairs(ColourSquares(n), identity_transform(train=False), seed=0, epoch=0, n_neg=negatives)
    return PairCollate(WordTokenizer())([data[i] for i in range(n)])


def loss_and_grads(model: torch.nn.Module, batch: dict, setup: str) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of `batch` under a set-up, and the gradients it leaves on the model's parameters."""
    loss_cls, local, negatives = SETUPS[setup]
    objective = ContrastiveObjective(loss_cls(local_loss=local, gather_with_grad=True))
    loss = objective(model, batch)["loss"]
    loss.backward()
    params = unwrap(model).named_parameters()
    return loss.item(), {n: p.grad.clone() for n, p in params if p.grad is not None}


def main(out: Path) -> None:
    """Run this rank's share and save what it saw."""
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    results: dict = {}
    for setup, (loss_cls, _, negatives) in SETUPS.items():
        batch = fixed_batch(negatives=negatives)
        half = {k: v.chunk(info.world_size)[info.rank] for k, v in batch.items()}
        model = tiny_model(0)
        if loss_cls is SigLipLoss:
            model.logit_bias = torch.nn.Parameter(torch.tensor(-5.0))
        loss, grads = loss_and_grads(wrap_ddp(model, info), half, setup)
        results[setup] = {"loss": loss, "grads": grads}

    opts = {"steps": 3, "batch_size": 4, "accum": 2, "save_every": 2, "dataset": ColourSquares(40)}
    trainer = make_trainer(out / "run", info=info, **opts)
    trainer.fit()
    results["trained"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    resumed = make_trainer(
        out / "run", info=info, resume=str(out / "run/checkpoints/step-00000002.pt"), **opts
    )
    resumed.fit()
    results["resumed"] = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    torch.save(results, out / f"rank{info.rank}.pt")

    from duomo.cli import main as cli  # `duomo train` in a process group torchrun set up (as `-m duomo` does)

    args = ["train", "--model", "ViT-micro", "--data", "shapes", "--batch-size", "4", "--workers", "0"]
    assert cli([*args, "--steps", "2", "--log-every", "1", "--quiet", "--out", str(out / "cli")]) == 0
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
