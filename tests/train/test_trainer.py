"""The trainer: exact accumulation, exact resume, checkpoints, precision, locking, and that it learns."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import ColourSquares, make_trainer, tiny_model

from duomo.errors import CheckpointError, ConfigError
from duomo.train import checkpoint as ckpt
from duomo.train.losses import ClipLoss
from duomo.train.objectives.clip import ContrastiveObjective
from duomo.train.trainer import Trainer


def _first_batches(trainer: Trainer, n: int) -> list[dict]:
    batches = trainer.micro_batches()
    return [next(batches) for _ in range(n)]


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _split(batch: dict, parts: int) -> list[dict]:
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


@pytest.mark.parametrize(("loss", "negatives"), [("clip", 0), ("siglip", 0), ("clip", 2)])
def test_accumulation_equals_one_big_batch(tmp_path, loss: str, negatives: int) -> None:
    big = make_trainer(tmp_path / "big", loss=loss, batch_size=12, hard_negatives=negatives)
    (batch,) = _first_batches(big, 1)
    big.forward_backward([batch])
    want = _grads(big)
    small = make_trainer(tmp_path / "small", loss=loss, batch_size=4, accum=3, hard_negatives=negatives)
    small.forward_backward(_split(batch, 3))
    got = _grads(small)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_of_a_per_sample_objective(tmp_path) -> None:
    def objective(model, batch):  # an objective without embed/loss: micro-batch losses are averaged
        return {"loss": model.encode_image(batch["pixels"]).pow(2).mean()}

    big = make_trainer(tmp_path / "a", batch_size=8)
    (batch,) = _first_batches(big, 1)
    big.objective = objective
    big.forward_backward([batch])
    small = make_trainer(tmp_path / "b", batch_size=4, accum=2)
    small.objective = objective
    small.forward_backward(_split(batch, 2))
    for name, grad in _grads(big).items():
        torch.testing.assert_close(_grads(small)[name], grad, rtol=1e-5, atol=1e-7)


class NoisyObjective(ContrastiveObjective):
    """Draws from the global torch RNG each step (as dropout would), so resuming must restore that RNG too."""

    def embed(self, model, batch):
        feats = super().embed(model, batch)
        feats["image_embeds"] = feats["image_embeds"] + 1e-2 * torch.randn_like(feats["image_embeds"])
        return feats


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_exact_resume(tmp_path, workers: int) -> None:
    """2k steps straight == k steps, then a fresh state resumed from the checkpoint, then k more: bitwise."""
    opts = {"steps": 8, "batch_size": 8, "save_every": 4, "dataset": ColourSquares(40), "workers": workers}
    opts["objective"] = NoisyObjective(ClipLoss())
    straight = make_trainer(tmp_path / "straight", **opts)
    straight.fit()

    first = make_trainer(tmp_path / "resumed", **opts)
    result = first.fit(until=4)
    assert result["model"] is None and result["checkpoint"].name == "step-00000004.pt"
    torch.manual_seed(1234)  # disturb every RNG the resumed run could depend on
    torch.rand(7)
    resumed = make_trainer(tmp_path / "resumed", model=tiny_model(seed=99), resume="latest", **opts)
    resumed.fit()

    assert resumed.step == straight.step == 8 and resumed.epoch == straight.epoch == 1
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    curve = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in straight.metrics.read()]
    assert curve == [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in resumed.metrics.read()]
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)


def test_checkpoint_contents_and_pruning(tmp_path) -> None:
    trainer = make_trainer(tmp_path, steps=6, save_every=2, keep_checkpoints=2, plot=True)
    result = trainer.fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-00000004.pt", "step-00000006.pt"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    state = torch.load(tmp_path / "checkpoints" / names[-1], weights_only=True)  # plain data only
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "step", "epoch", "batch_in_epoch"} <= set(
        state
    )
    assert state["step"] == 6 and (state["epoch"], state["batch_in_epoch"]) == (0, 6)
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "train_config.json").read_text())["steps"] == 6
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {"step", "loss", "lr", "logit_scale", "samples_per_s"} <= set(
        json.loads(lines[0])
    )

    from duomo.io import load_model

    model = load_model(result["model"])  # the final export, in duomo's native format
    torch.testing.assert_close(model.state_dict()["logit_scale"], trainer.model.logit_scale.detach())


def test_resume_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        make_trainer(tmp_path, resume=str(tmp_path / "nope.pt")).fit()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        make_trainer(tmp_path, resume=str(tmp_path / "junk.pt")).fit()
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a duomo training checkpoint"):
        make_trainer(tmp_path, resume=str(tmp_path / "model.pt")).fit()
    fresh = make_trainer(tmp_path / "new", steps=1, resume="latest")  # nothing to resume: starts at 0
    assert fresh.fit()["step"] == 1


def test_training_lowers_the_loss(tmp_path) -> None:
    trainer = make_trainer(tmp_path, steps=60, batch_size=16, lr=3e-3, warmup=5, dataset=ColourSquares(128))
    trainer.fit()
    losses = [r["loss"] for r in trainer.metrics.read()]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_lock_image_tower(tmp_path) -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, model=model, steps=3, lock_image=True)
    seen_modes = []
    trainer.model.visual.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    trainer.fit()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("text."))
    assert seen_modes and not any(seen_modes) and model.text.training
    with pytest.raises(ConfigError, match="no such submodule"):
        Trainer(
            tiny_model(),
            ContrastiveObjective(torch.nn.Identity()),
            lambda e, s: [],
            trainer.cfg,
            freeze=["vision"],
        )


def test_precision_checks_and_bf16(tmp_path) -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        make_trainer(tmp_path, precision="fp16")
    trainer = make_trainer(tmp_path, precision="bf16", steps=2)
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.metrics.read())
    assert trainer.model.logit_scale.dtype == torch.float32  # autocast: fp32 master weights


def test_grad_checkpointing_gives_the_same_gradients(tmp_path) -> None:
    plain = make_trainer(tmp_path / "a")
    (batch,) = _first_batches(plain, 1)
    plain.train_mode()
    plain.forward_backward([batch])
    ckpt_trainer = make_trainer(tmp_path / "b", grad_checkpointing=True)
    ckpt_trainer.train_mode()
    ckpt_trainer.forward_backward([batch])
    assert ckpt_trainer.model.visual.transformer.grad_checkpointing
    for name, grad in _grads(plain).items():
        torch.testing.assert_close(_grads(ckpt_trainer)[name], grad, rtol=1e-5, atol=1e-7)


def test_logit_scale_is_clamped(tmp_path) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(6.0)  # exp(6) = 403 > 100
    trainer = make_trainer(tmp_path, model=model, steps=1)
    trainer.fit()
    assert trainer.model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_empty_data_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no batch"):
        make_trainer(tmp_path, batch_size=8, dataset=ColourSquares(5)).fit()
