"""Hugging Face transformers CLIPModel directories: load with exact parity and export back."""

from __future__ import annotations

import json

import pytest
import torch

from duomo.io import detect_format, duomo_to_hf, export_hf, hf_to_duomo, read_checkpoint
from duomo.io.hf import hf_config_to_duomo
from duomo.models import get_model_config

# (duomo zoo name it must equal, transformers activation, eos_token_id): 2 is HF's legacy argmax pooling.
CASES = {
    "ViT-B-32-quickgelu": ("quick_gelu", 2),
    "ViT-B-16": ("gelu", 49407),
}


@pytest.fixture(scope="module", name="transformers")
def transformers_module():
    """The transformers library (the reference); skips the test without it."""
    return pytest.importorskip("transformers")


def hf_config(transformers, name: str, act: str, eos: int):
    cfg = get_model_config(name)
    v, t = cfg.vision, cfg.text
    text = dict(hidden_size=t.width, intermediate_size=4 * t.width, num_hidden_layers=t.layers)
    text |= dict(
        num_attention_heads=t.heads, max_position_embeddings=t.context_length, vocab_size=t.vocab_size
    )
    text |= dict(hidden_act=act, eos_token_id=eos)
    vision = dict(hidden_size=v.width, intermediate_size=4 * v.width, num_hidden_layers=v.layers)
    vision |= dict(
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act=act
    )
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)


def features(out):
    """transformers 4 returns a tensor, 5 an output object with the projection in `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_encoders(model):
    return (
        lambda pixels: features(model.get_image_features(pixel_values=pixels)),
        lambda toks: features(model.get_text_features(input_ids=toks)),
    )


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, transformers, tmp_path_factory):
    """A random-weight transformers CLIPModel written with save_pretrained."""
    name = request.param
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config(transformers, name, *CASES[name])).eval()
    with (
        torch.no_grad()
    ):  # HF initialises biases and logit_scale to constants: randomise so mapping errors show
        for param in model.parameters():
            if param.ndim <= 1:
                param.add_(torch.randn_like(param) * 0.02)
    out = tmp_path_factory.mktemp(f"hf-{name}")
    model.save_pretrained(out)
    return name, model, out


@pytest.fixture(scope="module")
def loaded(reference, duomo_model, tokens, images, embed):
    """The reference directory read into duomo, with duomo's embeddings of the shared inputs."""
    cfg, sd = read_checkpoint(reference[2])
    model = duomo_model(cfg, sd)
    pixels = images(cfg.vision.image_size)
    return cfg, model, pixels, embed(model.encode_image, model.encode_text, pixels, tokens)


@pytest.mark.slow
def test_hf_directory_loads_with_exact_outputs(reference, loaded, tokens, compare):
    name, ref, out = reference
    cfg, _, pixels, outputs = loaded
    assert detect_format(out) == "hf"
    assert cfg.vision == get_model_config(name).vision
    assert cfg.text.pool == ("argmax" if CASES[name][1] == 2 else "eos")
    compare(outputs, *hf_encoders(ref), pixels, tokens)


def test_hf_pytorch_bin_gives_the_same_state_dict(transformers, tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config(transformers, "ViT-micro", "gelu", 49407))
    model.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    cfg, want = read_checkpoint(tmp_path / "st")
    assert (cfg.vision.width, cfg.vision.heads, cfg.text.pool, cfg.text.eos_token_id) == (64, 2, "eos", 49407)
    _, got = read_checkpoint(tmp_path / "bin")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_export_hf_round_trips(transformers, loaded, tmp_path, tokens, compare):
    cfg, model, pixels, outputs = loaded
    export_hf(model, tmp_path / "hf")
    back = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    compare(outputs, *hf_encoders(back), pixels, tokens)
    assert hf_config_to_duomo(json.loads((tmp_path / "hf" / "config.json").read_text())) == cfg


def test_qkv_is_fused_and_split_exactly():
    sd = {f"vision_model.encoder.layers.2.self_attn.{p}_proj.weight": torch.randn(4, 4) for p in "qkv"}
    sd |= {f"vision_model.encoder.layers.2.self_attn.{p}_proj.bias": torch.randn(4) for p in "qkv"}
    sd["text_model.encoder.layers.0.layer_norm1.weight"] = torch.randn(4)
    sd["vision_model.pre_layrnorm.bias"] = torch.randn(4)
    sd["text_model.embeddings.position_ids"] = torch.arange(4)[None]
    duomo = hf_to_duomo(sd)
    assert set(duomo) == {
        "visual.transformer.blocks.2.attn.qkv.weight",
        "visual.transformer.blocks.2.attn.qkv.bias",
        "text.transformer.blocks.0.norm1.weight",
        "visual.norm_pre.bias",
    }
    back = duomo_to_hf(duomo)
    del sd["text_model.embeddings.position_ids"]
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
