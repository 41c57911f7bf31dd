"""The Stable Diffusion UNet and KL autoencoder against diffusers with random weights on tiny configs:
the same parameter names, noise prediction and encode/decode within 1e-5 (fp32), both attention kernels."""

from __future__ import annotations

import pytest
import torch

from duomo.errors import ConfigError
from duomo.models.diffusion.autoencoder import AutoencoderConfig, AutoencoderKL
from duomo.models.diffusion.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

SD1 = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 24,
    "attention_head_dim": 4,
}
SD2 = SD1 | {
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "layers_per_block": 2,
}
VAE = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "sample_size": 16,
}


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("fields", [SD1, SD2], ids=["sd1-conv-proj", "sd2-linear-proj-head-list"])
def test_unet_equals_diffusers(fields: dict) -> None:
    ref = diffusers.UNet2DConditionModel(**fields).eval()
    randomise(ref)
    ours = UNet(UNetConfig.from_dict(dict(ref.config))).eval()
    assert sorted(ours.state_dict()) == sorted(
        ref.state_dict()
    )  # the same names: checkpoints load as they are
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 24)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
        assert (got - want).abs().max() <= 1e-5
        assert (ours(x, torch.tensor(321), ctx) - ref(x, 321, ctx).sample).abs().max() <= 1e-5
        for m in ours.modules():  # the written-out attention gives the same numbers
            if hasattr(m, "fast"):
                m.fast = False
        assert (ours(x, t, ctx) - want).abs().max() <= 1e-5


def test_unet_odd_sizes_and_checkpointing() -> None:
    ref = diffusers.UNet2DConditionModel(**SD1).eval()
    randomise(ref)
    ours = UNet(UNetConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    x, ctx = torch.randn(1, 4, 10, 14), torch.randn(1, 3, 24)  # not multiples of the downsampling
    with torch.no_grad():
        assert (ours.eval()(x, torch.tensor([5]), ctx) - ref(x, 5, ctx).sample).abs().max() <= 1e-5
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.train().set_grad_checkpointing(ckpt)
        ours(x, torch.tensor([5]), ctx).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_autoencoder_equals_diffusers() -> None:
    ref = diffusers.AutoencoderKL(**VAE).eval()
    randomise(ref, 1)
    ours = AutoencoderKL(AutoencoderConfig.from_dict(dict(ref.config))).eval()
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
        assert (got.mean - want.mean).abs().max() <= 1e-5 and (got.logvar - want.logvar).abs().max() <= 1e-5
        z = torch.randn(2, 4, 8, 8)
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() <= 1e-5
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        assert (got.sample(g1) - want.sample(g2)).abs().max() <= 1e-5


def test_bad_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="not built"):
        UNetConfig.from_dict(SD1 | {"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ConfigError, match="not supported"):
        UNetConfig.from_dict(SD1 | {"class_embed_type": "timestep"})
    with pytest.raises(ConfigError, match="unknown unet config fields"):
        UNetConfig.from_dict(SD1 | {"blok_out_channels": [1]})
    with pytest.raises(ConfigError, match="whole number"):
        UNetConfig.from_dict(SD1 | {"layers_per_block": "2"})
    with pytest.raises(ConfigError, match="groups"):
        AutoencoderConfig.from_dict(VAE | {"norm_num_groups": 5})
    with pytest.raises(ValueError, match="latents shaped"):
        UNet(UNetConfig.from_dict(SD1))(torch.randn(1, 3, 8, 8), torch.tensor(1), torch.randn(1, 2, 24))
