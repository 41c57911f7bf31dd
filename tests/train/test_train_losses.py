"""Contrastive losses: hand-computed values, and agreement with OpenCLIP's ClipLoss and SigLipLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from duomo.errors import InputError
from duomo.train.losses import ClipLoss, SigLipLoss, build_loss

IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXTS = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
SCALE = torch.tensor(2.0)


def _log_softmax_at(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(v) for v in row))


def test_clip_loss_by_hand() -> None:
    # logits = 2 * images @ texts.T = [[2, 1.2], [0, 1.6]]; per text (columns) = [[2, 0], [1.2, 1.6]]
    i2t = -(_log_softmax_at([2.0, 1.2], 0) + _log_softmax_at([0.0, 1.6], 1)) / 2
    t2i = -(_log_softmax_at([2.0, 0.0], 0) + _log_softmax_at([1.2, 1.6], 1)) / 2
    assert ClipLoss()(IMAGES, TEXTS, SCALE).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_clip_loss_with_hard_negatives_by_hand() -> None:
    neg = torch.tensor([[0.0, 1.0], [0.8, 0.6]])  # one negative caption per image: extra image->text columns
    # image->text rows over [text0, text1, neg0, neg1]: [2, 1.2, 0, 1.6] and [0, 1.6, 2, 1.2]
    i2t = -(_log_softmax_at([2.0, 1.2, 0.0, 1.6], 0) + _log_softmax_at([0.0, 1.6, 2.0, 1.2], 1)) / 2
    t2i = -(_log_softmax_at([2.0, 0.0], 0) + _log_softmax_at([1.2, 1.6], 1)) / 2  # positives only
    got = ClipLoss()(IMAGES, TEXTS, SCALE, neg_text_embeds=neg).item()
    assert got == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    stacked = ClipLoss()(IMAGES, torch.cat([TEXTS, neg]), SCALE).item()  # B * (1 + n_neg) text rows
    assert stacked == pytest.approx(got, rel=1e-7)
    grouped = ClipLoss()(IMAGES, TEXTS, SCALE, neg_text_embeds=neg.reshape(2, 1, 2)).item()  # [B, n_neg, D]
    assert grouped == pytest.approx(got, rel=1e-7)


def test_siglip_loss_by_hand() -> None:
    logits = [[2.0 - 1.0, 1.2 - 1.0], [0.0 - 1.0, 1.6 - 1.0]]  # scale 2, bias -1

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    total = sum(log_sigmoid((1 if i == j else -1) * logits[i][j]) for i in range(2) for j in range(2))
    got = SigLipLoss()(IMAGES, TEXTS, SCALE, torch.tensor(-1.0)).item()
    assert got == pytest.approx(-total / 2, rel=1e-6)


def _features(n: int = 12, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(),
        F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(),
    )


@pytest.mark.parametrize("bias", [None, -2.0])
def test_clip_loss_matches_open_clip(bias: float | None) -> None:
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = _features()
    scale = torch.tensor(math.log(1 / 0.07)).exp().requires_grad_()
    b = None if bias is None else torch.tensor(bias)
    ours = ClipLoss()(img, txt, scale, b)
    ours.backward()
    ours_grads = [img.grad.clone(), txt.grad.clone(), scale.grad.clone()]
    for t in (img, txt, scale):
        t.grad = None
    theirs = open_clip_loss.ClipLoss()(img, txt, scale, b)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, t in zip(ours_grads, [img.grad, txt.grad, scale.grad], strict=True):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-7)


def test_siglip_loss_matches_open_clip() -> None:
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt = _features(seed=1)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ours = SigLipLoss()(img, txt, scale, bias)
    ours.backward()
    ours_grads = [t.grad.clone() for t in (img, txt, scale, bias)]
    for t in (img, txt, scale, bias):
        t.grad = None
    theirs = open_clip_loss.SigLipLoss()(img, txt, scale, bias)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    for a, t in zip(ours_grads, [img.grad, txt.grad, scale.grad, bias.grad], strict=True):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-7)


def test_siglip_hard_negatives_are_negative_columns() -> None:
    img, txt = _features(4, 8, seed=2)
    neg = F.normalize(torch.randn(4, 8), dim=-1)
    scale, bias = torch.tensor(5.0), torch.tensor(-3.0)
    got = SigLipLoss()(img, txt, scale, bias, neg).item()
    extra = -F.logsigmoid(-(scale * img @ neg.T + bias)).sum() / 4
    want = SigLipLoss()(img, txt, scale, bias).item() + extra.item()
    assert got == pytest.approx(want, rel=1e-6)


def test_loss_shape_errors_and_names() -> None:
    img, txt = _features(4, 8)
    with pytest.raises(InputError, match="text rows"):
        ClipLoss()(img, txt[:3], torch.tensor(1.0))
    with pytest.raises(InputError, match="multiple"):
        ClipLoss()(img, txt, torch.tensor(1.0), neg_text_embeds=txt[:3])
    assert isinstance(build_loss("siglip"), SigLipLoss)
    with pytest.raises(InputError, match="unknown loss"):
        build_loss("triplet")
