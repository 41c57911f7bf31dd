"""Starting a BEiT-3 vision pathway from a duomo CLIP image tower (VLMo-style initialisation)."""

from __future__ import annotations

import pytest
import torch

from duomo.errors import ConfigError
from duomo.models import create_model
from duomo.models.beit3 import BEiT3, create_beit3, get_beit3_config
from duomo.models.beit3.from_clip import beit3_config_for_vit, beit3_from_clip, load_vit_into_beit3


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and BatchNorm statistic random, so a copy that misses one is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * 0.2 + (0.9 if t.ndim == 1 else -0.1))


@pytest.mark.parametrize(
    ("clip_config", "beit3_config"),
    [
        ("ViT-micro", "beit3-micro"),
        ("shapes-tiny-conv", "beit3-tiny-conv"),  # conv stem with BatchNorm statistics
        ("shapes-tiny-conv", "beit3-tiny-shared"),  # the paper's shared attention
    ],
)
def test_vision_forward_equals_the_towers_features(clip_config: str, beit3_config: str) -> None:
    clip = create_model(clip_config).eval()
    _randomise(clip.visual)
    backbone = beit3_from_clip(clip, get_beit3_config(beit3_config)).eval()
    images = torch.randn(3, 3, clip.visual.cfg.image_size, clip.visual.cfg.image_size)
    with torch.no_grad():
        expected = clip.visual.forward_features(images)
        got = backbone(images=images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert backbone.cfg.mean == tuple(clip.visual.cfg.mean)  # the tower's pixel normalisation comes along


def test_text_side_keeps_the_base_config_and_runs_fused() -> None:
    clip = create_model("ViT-micro")
    base = get_beit3_config("beit3-micro")
    backbone = beit3_from_clip(clip, base)
    assert backbone.cfg.vocab_size == base.vocab_size
    assert backbone.cfg.tokenizer == base.tokenizer
    assert not backbone.cfg.subln and backbone.cfg.layernorm_embedding
    out = backbone(images=torch.randn(2, 3, 32, 32), text=torch.randint(0, 100, (2, 5)))
    assert out.shape == (2, 1 + 16 + 5, 64)


def test_an_incompatible_config_names_what_differs() -> None:
    clip = create_model("ViT-micro")
    with pytest.raises(ConfigError, match="width=32 .*needs 64.*subln"):
        load_vit_into_beit3(create_beit3("beit3-micro"), clip.visual)


def test_a_mean_pooling_tower_is_refused() -> None:
    clip = create_model("shapes-tiny-avg")
    with pytest.raises(ConfigError, match="class token"):
        beit3_config_for_vit(clip.visual.cfg, get_beit3_config("beit3-tiny"))


def test_a_non_vit_tower_is_refused() -> None:
    with pytest.raises(ConfigError, match="only duomo's ViT"):
        beit3_from_clip(torch.nn.Linear(2, 2), get_beit3_config("beit3-micro"))


def test_start_backbone_loads_a_saved_clip_folder(tmp_path) -> None:  # noqa: ANN001
    import duomo
    from duomo.tasks.beit3.start import start_backbone

    pipe = duomo.load("ViT-micro")
    _randomise(pipe.model.visual, seed=3)
    pipe.save(tmp_path / "clip")
    backbone = start_backbone("beit3-micro", str(tmp_path / "clip"))
    assert isinstance(backbone, BEiT3)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.eval()(images=images), pipe.model.visual.eval().forward_features(images)
        )


def test_freezing_keeps_the_conv_stem_batchnorm_statistics_in_train_mode() -> None:
    from duomo.models.beit3 import VQAModel
    from duomo.models.beit3.from_clip import freeze_vision

    clip = create_model("shapes-tiny-conv").eval()
    _randomise(clip.visual)
    model = VQAModel(beit3_from_clip(clip, get_beit3_config("beit3-tiny-conv")), ["yes", "no"])
    frozen = freeze_vision(model)
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    stem_bn = model.beit3.vision_embed.patch_embed[1]
    before = stem_bn.running_mean.clone()
    images = torch.randn(4, 3, 64, 64)
    model.train()
    train_out = model.beit3(images=images)  # train mode: the frozen BatchNorm still uses running statistics
    torch.testing.assert_close(stem_bn.running_mean, before, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(train_out, clip.visual.forward_features(images), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".text." in n)
    assert freeze_vision(model) == frozen and len(stem_bn._forward_pre_hooks) == 1  # again: hooked once


def test_freezing_a_model_without_vision_parameters_is_an_error() -> None:
    from duomo.models.beit3.from_clip import freeze_vision

    with pytest.raises(ConfigError, match="no BEiT-3 vision parameters"):
        freeze_vision(torch.nn.Linear(2, 2))
