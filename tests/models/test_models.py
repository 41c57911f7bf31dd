import json

import pytest
import torch

from duomo.errors import ConfigError, UnknownModelError
from duomo.models import CLIPConfig, create_model, get_model_config, list_models
from duomo.models.clip.vit import interpolate_positions


def test_zoo_has_the_openclip_names():
    names = list_models()
    for name in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-tiny", "ViT-micro"]:
        assert name in names


def test_every_config_parses():
    for name in list_models("clip"):
        cfg = get_model_config(name)
        assert cfg.vision.image_size % cfg.vision.patch_size == 0
        assert cfg.vision.width % cfg.vision.heads == 0 and cfg.text.width % cfg.text.heads == 0


def test_quickgelu_is_a_config_field():
    assert get_model_config("ViT-B-32").vision.act == "gelu"
    assert get_model_config("ViT-B-32-quickgelu").vision.act == "quick_gelu"
    assert get_model_config("ViT-B-32-quickgelu").text.act == "quick_gelu"


def test_other_architectures_are_listed_but_not_built_as_clip(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"architecture": "beit3", "width": 8}))
    with pytest.raises(ConfigError, match="not a CLIP dual encoder"):
        get_model_config(str(path))
    assert set(list_models("clip")) <= set(list_models())


def test_vit_b32_parameter_count_matches_openai():
    model = create_model("ViT-B-32")
    n = sum(p.numel() for p in model.parameters())
    assert n == 151_277_313  # the published count of OpenAI's ViT-B/32 CLIP


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownModelError, match="ViT-B-32"):
        get_model_config("ViT-B-31")


def test_openclip_json_layout_is_accepted(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "quick_gelu": True,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 64,
                    "patch_size": 16,
                    "head_width": 32,
                },
                "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    cfg = get_model_config(str(path))
    assert cfg.vision.heads == 2 and cfg.vision.act == "quick_gelu" and cfg.text.act == "quick_gelu"
    model = create_model(str(path))
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_bad_configs_give_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown VisionConfig fields"):
        CLIPConfig.from_dict({"vision": {"widht": 3}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        get_model_config(str(bad))
    with pytest.raises(ConfigError, match="multiple"):
        create_model(
            CLIPConfig.from_dict({"vision": {"image_size": 30, "patch_size": 8, "width": 16, "heads": 2}})
        )


def test_config_round_trips_through_dict():
    cfg = get_model_config("ViT-L-14-336")
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_forward_shapes_and_normalisation():
    model = create_model("ViT-micro").eval()
    tokens = torch.randint(1, 1000, (3, 16))
    tokens[:, 4] = 49407
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert out["image_embeds"].shape == (2, 64) and out["text_embeds"].shape == (3, 64)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_text_pools_at_end_token_and_ignores_padding():
    model = create_model("ViT-micro").eval()
    a = torch.zeros(1, 16, dtype=torch.long)
    a[0, :4] = torch.tensor([49406, 320, 1125, 49407])
    b = a.clone()
    b[0, 6:] = 555  # garbage after the end token (lower id than eot) must not change the embedding
    torch.testing.assert_close(model.encode_text(a), model.encode_text(b))


def test_shorter_token_sequences_are_allowed_longer_rejected():
    model = create_model("ViT-micro").eval()
    tokens = torch.tensor([[49406, 320, 49407]])
    assert model.encode_text(tokens).shape == (1, 64)
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))


def test_vit_accepts_other_image_sizes_by_interpolating_positions():
    model = create_model("ViT-micro").eval()
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    pos = model.visual.pos_embed.detach()
    assert torch.equal(interpolate_positions(pos, 4), pos)  # same grid: unchanged
    assert interpolate_positions(pos, 8).shape == (65, 64)


def test_reference_attention_path_gives_same_embeddings():
    model = create_model("ViT-micro").eval()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 49407, (2, 16))
    fast = model(images, tokens)
    model.set_fast_attention(False)
    slow = model(images, tokens)
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(fast[key], slow[key], atol=1e-5, rtol=1e-5)


def test_unknown_vision_pooling_is_a_config_error():
    cfg = CLIPConfig.from_dict(
        {"vision": {"image_size": 32, "patch_size": 8, "width": 16, "heads": 2, "pool": "x"}}
    )
    with pytest.raises(ConfigError, match="pooling"):
        create_model(cfg)


def test_text_tower_skips_trailing_padding_exactly():
    """The causal tower runs only up to the last end token in the batch; the result equals the full run."""
    model = create_model("ViT-micro").eval()
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    tokens[1, :6] = torch.tensor([49406, 320, 1125, 539, 0, 49407])  # id 0 ("!") inside the text is kept
    calls = []
    handle = model.text.transformer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    short = model.encode_text(tokens)
    handle.remove()
    assert calls == [6]
    model.text.transformer.eval()
    x = model.text.token_embed(tokens) + model.text.pos_embed
    x = model.text.norm(model.text.transformer(x, model.text.attn_mask))
    full = model.text.proj(x[torch.arange(2), tokens.argmax(-1)])
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-5)


def test_conv_stem_gives_the_patch_grid_and_round_trips(tmp_path):
    """The conv stem (Xiao et al. 2021) makes the same token grid as patchify and saves/loads exactly."""
    from duomo.io import load_into, read_checkpoint, save_native

    cfg = CLIPConfig.from_dict(
        {"embed_dim": 16, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "heads": 2, "layers": 1,
                                     "stem": "conv"},
         "text": {"context_length": 8, "width": 16, "heads": 2, "layers": 1}}
    )  # fmt: skip
    model = create_model(cfg).eval()
    assert isinstance(model.visual.patch_embed, torch.nn.Sequential)
    images = torch.randn(2, 3, 32, 32)
    assert model.visual.forward_features(images).shape == (2, 1 + 16, 32)
    save_native(model, tmp_path / "m", {})
    config, state = read_checkpoint(tmp_path / "m")
    assert config.vision.stem == "conv"
    again = create_model(config).eval()
    load_into(again, state)
    torch.testing.assert_close(again.encode_image(images), model.encode_image(images), atol=0, rtol=0)


@pytest.mark.parametrize("stem, patch, message", [("x", 8, "stem"), ("conv", 6, "power-of-two")])
def test_bad_vision_stems_are_config_errors(stem, patch, message):
    cfg = CLIPConfig.from_dict(
        {"vision": {"image_size": 48, "patch_size": patch, "width": 16, "heads": 2, "stem": stem}}
    )
    with pytest.raises(ConfigError, match=message):
        create_model(cfg)
