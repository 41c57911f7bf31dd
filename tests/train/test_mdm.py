"""Masked data modelling: masking ratios, block-wise image masks, losses on masked positions only."""

from __future__ import annotations

import json
import random

import pytest
import torch

from duomo.data.tokenizers import special_ids
from duomo.io.beit3_tasks import load_task
from duomo.models.beit3 import BEiT3, BEiT3ForMDM, get_beit3_config
from duomo.tasks.beit3.data import caption_source
from duomo.tasks.beit3.pretrain import KINDS, mdm_loader_factory, mdm_objective, pretraining_data
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.train.objectives.beit3 import MDMConfig, MDMObjective, block_mask, mask_text, patch_targets

torch.set_num_threads(1)
CFG = get_beit3_config("beit3-micro")
SOT, EOT, _ = special_ids(CFG)


def tiny() -> BEiT3ForMDM:
    """A 2-layer model on 32 px images (a 4 x 4 patch grid)."""
    torch.manual_seed(0)
    return BEiT3ForMDM(BEiT3(CFG))


def test_text_masking_ratio_skips_padding_and_specials() -> None:
    n = 22  # 20 maskable tokens between <sot> and <eot>, then padding
    ids = torch.tensor([[SOT, *range(100, 120), EOT, 0, 0]] * 8)
    pad = torch.zeros_like(ids, dtype=torch.bool)
    pad[:, n:] = True
    for ratio, want in [(0.15, 3), (0.5, 10)]:
        masked, chosen = mask_text(ids, pad, ratio, 49408, (SOT, EOT), torch.Generator().manual_seed(0))
        assert (chosen.sum(1) == want).all()
        assert not chosen[:, 0].any() and not chosen[:, n - 1 :].any()
        assert (masked[chosen] == 49408).all() and torch.equal(masked[~chosen], ids[~chosen])


def test_block_mask_ratio_and_blocks() -> None:
    rng = random.Random(0)
    for grid in (4, 8, 14):
        for _ in range(5):
            m = block_mask(grid, 0.4, rng=rng)
            assert m.shape == (grid * grid,) and int(m.sum()) == round(0.4 * grid * grid)
    # block-wise: masked patches cluster, so most have a masked neighbour (random masking at 40%: ~1 - 0.6^4)
    m = block_mask(14, 0.4, rng=random.Random(1)).view(14, 14)
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    assert float((neighbours & m).sum() / m.sum()) > 0.9


def test_patch_targets_are_normalised_patches() -> None:
    images = torch.randn(2, 3, 32, 32)
    t = patch_targets(images, 8)
    assert t.shape == (2, 16, 8 * 8 * 3)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    first = images[0, :, :8, :8].permute(1, 2, 0).flatten()
    assert torch.allclose(t[0, 0], (first - first.mean()) / first.var().add(1e-6).sqrt(), atol=1e-5)


def test_losses_only_on_masked_positions() -> None:
    model = tiny()
    objective = MDMObjective(MDMConfig(special_ids=(SOT, EOT)), seed=0)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[SOT, 320, 1929, 2368, 530, EOT], [SOT, 320, 1929, 2368, EOT, 0]])
    pad = ids == 0
    pad[0, -1] = False
    batch = {"pixels": pixels, "tokens": ids, "padding_mask": pad}
    masked = objective.mask_batch(model, batch)
    assert masked["text_mask"].sum(1).tolist() == [2, 2]  # 50% of 4 and of 3 (rounded) in a pair
    assert masked["vision_mask"].sum(1).tolist() == [6, 6]  # 40% of 16 patches
    out = MDMObjective(MDMConfig(special_ids=(SOT, EOT)), seed=0)(model, batch)
    # changing the pixels of visible patches or the ids of unmasked positions must not move the targets:
    # recompute the loss by hand from the same masks
    h = model(pixels, masked["ids"], pad, masked["vision_mask"])
    split = model.beit3.num_image_tokens
    logits = model.lm_logits(h[:, split:][masked["text_mask"]])
    mlm = torch.nn.functional.cross_entropy(logits, ids[masked["text_mask"]])
    pred = model.mim_head(h[:, 1:split][masked["vision_mask"]])
    mim = torch.nn.functional.mse_loss(pred, patch_targets(pixels, 8)[masked["vision_mask"]])
    assert float(out["mlm"]) == pytest.approx(float(mlm.detach()), rel=1e-5)
    assert float(out["mim"]) == pytest.approx(float(mim.detach()), rel=1e-5)
    # unmasked inputs are the originals; masked patches read the mask token
    assert torch.equal(masked["ids"][~masked["text_mask"]], ids[~masked["text_mask"]])


def test_no_image_masking_keeps_pairs_whole_and_the_loss_finite() -> None:
    model = tiny()
    objective = MDMObjective(MDMConfig(special_ids=(SOT, EOT), image_ratio=0.0), seed=0)
    ids = torch.tensor([[SOT, 320, 1929, 2368, 530, EOT]])
    batch = {"pixels": torch.randn(1, 3, 32, 32), "tokens": ids, "padding_mask": ids == -1}
    assert "vision_mask" not in objective.mask_batch(model, batch)
    out = objective(model, batch)
    assert float(out["mim"]) == 0.0 and torch.isfinite(out["loss"]) and float(out["mlm"]) > 0


def test_a_batch_seed_fixes_the_masks() -> None:
    model = tiny()
    ids = torch.tensor([[SOT, *range(100, 110), EOT]] * 4)
    batch = {"pixels": torch.randn(4, 3, 32, 32), "tokens": ids, "padding_mask": ids == -1}
    seeded = {**batch, "seed": torch.tensor(123)}
    a = MDMObjective(MDMConfig(special_ids=(SOT, EOT)), seed=0)
    b = MDMObjective(MDMConfig(special_ids=(SOT, EOT)), seed=7)
    a.mask_batch(model, batch)  # the objective's own generator moves on; a seeded batch ignores it
    m1, m2 = a.mask_batch(model, seeded), b.mask_batch(model, seeded)
    assert torch.equal(m1["text_mask"], m2["text_mask"]) and torch.equal(m1["vision_mask"], m2["vision_mask"])
    other = a.mask_batch(model, {**batch, "seed": torch.tensor(124)})
    assert not torch.equal(other["text_mask"], m1["text_mask"])


def pretraining_loaders(size: int, batch_size: int, seed: int = 0):  # noqa: ANN201
    """The shapes train split's MDM loader factory: image, text and pair batches in turn."""
    source = caption_source("shapes", CFG, size, seed)
    table, ids, pad, kinds = pretraining_data(source, CFG, batch_size, seed, freeze_vision=False)
    assert kinds == KINDS == ("image", "text", "pair")
    return mdm_loader_factory(table, ids, pad, batch_size, kinds, seed)


def test_text_only_uses_monomodal_ratio() -> None:
    model = tiny()
    objective = MDMObjective(MDMConfig(special_ids=(SOT, EOT)), seed=0)
    make = pretraining_loaders(size=32, batch_size=8)
    batches = list(make(0, 0)) + list(make(1, 0))  # 4 batches an epoch; the kinds cycle across epochs
    kinds = [tuple(sorted(b)) for b in batches[:4]]
    assert kinds == [
        ("pixels", "seed"),
        ("padding_mask", "seed", "tokens"),
        ("padding_mask", "pixels", "seed", "tokens"),
        ("pixels", "seed"),  # the cycle restarts with images; the next is text
    ]
    assert tuple(sorted(batches[4])) == ("padding_mask", "seed", "tokens")
    assert [int(b["seed"]) for b in make(0, 2)] == [int(b["seed"]) for b in batches[2:4]]  # resumable
    text = batches[4]
    m = objective.mask_batch(model, text)
    maskable = (~text["padding_mask"]).sum(1) - 2
    assert (m["text_mask"].sum(1) == (maskable.float() * 0.15).round().clamp(min=1)).all()


def test_pretraining_lowers_the_loss(tmp_path) -> None:
    model = tiny()
    cfg = beit3_train_config(
        out=str(tmp_path / "mdm"),
        steps=30,
        batch_size=8,
        lr=3e-3,
        warmup=0,
        log_every=1,
        save_every=30,
        quiet=True,
        plot=False,
    )
    result = fit_task(
        model, mdm_objective(CFG, freeze_vision=False), lambda info: pretraining_loaders(32, 8), cfg, "mdm"
    )
    records = [json.loads(line) for line in (tmp_path / "mdm" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30
    first = sum(r["loss"] for r in records[:6]) / 6
    last = sum(r["loss"] for r in records[-6:]) / 6
    assert last < first
    again, config = load_task(result["model"], "mdm")
    assert isinstance(again, BEiT3ForMDM) and config["task"] == "mdm"
