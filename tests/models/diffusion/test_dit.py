"""The diffusion Transformer: shapes, the zero-initialised (identity) start, the two attention kernels agree,
conditioning reaches the output, and bad inputs are clear errors."""

from __future__ import annotations

import pytest
import torch

from duomo.errors import ConfigError
from duomo.models.diffusion.dit import DiT, DiTConfig, sincos_2d, timestep_embedding

TINY = DiTConfig(
    image_size=16, in_channels=3, patch_size=4, width=32, layers=2, heads=2, context_dim=24, pooled_dim=8
)


def randomised(cfg: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A DiT whose zero-initialised layers got random weights too (so every path carries signal)."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(b: int = 3, cfg: DiTConfig = TINY) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, 5, cfg.context_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_dim, generator=g)
    return x, t, context, pooled


def test_output_shape_and_zero_start() -> None:
    model = DiT(TINY).eval()
    x, t, context, pooled = inputs()
    out = model(x, t, context, pooled)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-zero and the zero output layer: the identity start


def test_reference_attention_matches_the_fused_kernel() -> None:
    model = randomised()
    x, t, context, pooled = inputs()
    fast = model(x, t, context, pooled)
    for block in model.blocks:
        block.attn.fast = block.cross.fast = False
    slow = model(x, t, context, pooled)
    assert (fast - slow).abs().max() < 1e-5


def test_each_condition_changes_the_output_and_rows_are_independent() -> None:
    model = randomised()
    x, t, context, pooled = inputs()
    base = model(x, t, context, pooled)
    assert not torch.allclose(base, model(x, t + 100, context, pooled))
    assert not torch.allclose(base, model(x, t, context + 1, pooled))
    assert not torch.allclose(base, model(x, t, context, pooled + 1))
    one = model(x[1:2], t[1:2], context[1:2], pooled[1:2])  # a batch row is computed as if alone
    assert (one - base[1:2]).abs().max() < 1e-5
    scalar_t = model(x, torch.tensor(7), context, pooled)  # one timestep for the whole batch
    assert torch.allclose(scalar_t, model(x, torch.full((3,), 7), context, pooled), atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    x, t, context, pooled = inputs()
    grads = []
    for ckpt in (False, True):
        model = randomised().train()
        model.set_grad_checkpointing(ckpt)
        model(x, t, context, pooled).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_embeddings() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert (
        emb.shape == (2, 8)
        and torch.equal(emb[0, :4], torch.ones(4))
        and torch.equal(emb[0, 4:], torch.zeros(4))
    )
    pos = sincos_2d(16, 4)
    assert pos.shape == (16, 16) and len({tuple(r.tolist()) for r in pos}) == 16  # every patch distinct


def test_bad_configs_and_inputs() -> None:
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        DiTConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="divisible"):
        DiTConfig(width=30, heads=4)
    with pytest.raises(ConfigError, match="unknown denoiser config fields"):
        DiTConfig.from_dict({"widht": 32})
    model = DiT(TINY)
    x, t, context, pooled = inputs()
    with pytest.raises(ValueError, match="expected input shaped"):
        model(x[:, :2], t, context, pooled)
    with pytest.raises(ValueError, match="text states"):
        model(x, t, context[..., :5], pooled)
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, context)
