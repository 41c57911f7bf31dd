"""OpenCLIP checkpoints: load with exact parity, infer configs, and export back to OpenCLIP."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from duomo.io import (
    detect_format,
    duomo_config_to_openclip,
    duomo_to_openclip,
    export,
    infer_openclip_config,
    openclip_config_to_duomo,
    openclip_to_duomo,
    read_checkpoint,
)
from duomo.models import get_model_config

NAMES = ["ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu"]


@pytest.fixture(scope="module", name="open_clip")
def open_clip_module():
    """The open_clip library (the reference); skips the test without it."""
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module", params=NAMES)
def reference(request, open_clip, tmp_path_factory):
    """A random-weight OpenCLIP model saved as a .pt state dict and as .safetensors."""
    name = request.param
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    out = tmp_path_factory.mktemp(name)
    sd = model.state_dict()
    torch.save(sd, out / "model.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    return name, model, out


@pytest.fixture(scope="module")
def loaded(reference, duomo_model, tokens, images, embed):
    """The reference's safetensors file read into duomo, with duomo's embeddings of the shared inputs."""
    name, _, out = reference
    cfg, sd = read_checkpoint(out / "model.safetensors", quick_gelu=name.endswith("quickgelu"))
    model = duomo_model(cfg, sd)
    pixels = images(cfg.vision.image_size)
    return cfg, model, pixels, embed(model.encode_image, model.encode_text, pixels, tokens)


@pytest.mark.slow
def test_openclip_file_loads_with_exact_outputs(reference, loaded, tokens, compare):
    name, ref, out = reference
    cfg, _, pixels, outputs = loaded
    assert detect_format(out / "model.safetensors") == "openclip"
    assert cfg == get_model_config(name)  # shapes alone give the whole architecture
    compare(outputs, ref.encode_image, ref.encode_text, pixels, tokens)


@pytest.mark.slow
def test_torch_file_gives_the_same_weights_as_safetensors(reference):
    _, _, out = reference
    assert detect_format(out / "model.pt") == "openclip"
    _, want = read_checkpoint(out / "model.safetensors", quick_gelu=False)
    _, got = read_checkpoint(out / "model.pt", quick_gelu=False)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_sidecar_config_carries_quickgelu(open_clip, reference, tmp_path):
    name, _, out = reference
    path = tmp_path / "weights.pt"
    path.symlink_to(out / "model.pt")
    path.with_suffix(".json").write_text(json.dumps(open_clip.get_model_config(name)))
    cfg, _ = read_checkpoint(path)
    assert cfg == get_model_config(name)


@pytest.mark.slow
def test_export_to_openclip_round_trips(open_clip, reference, loaded, tmp_path, tokens, compare):
    name, _, _ = reference
    if name.endswith("quickgelu"):
        pytest.skip("the round trip of quick_gelu configs is covered without weights below")
    cfg, model, pixels, outputs = loaded
    path = export(model, tmp_path / f"duomo-{name}.safetensors", "openclip")
    sidecar = path.with_suffix(".json")
    assert openclip_config_to_duomo(json.loads(sidecar.read_text())) == cfg
    open_clip.add_model_config(sidecar)
    back = open_clip.create_model(path.stem, pretrained=None).eval()
    back.load_state_dict(load_file(str(path)), strict=True)
    compare(outputs, back.encode_image, back.encode_text, pixels, tokens)


def test_names_map_both_ways_without_loss():
    sd = {
        "visual.proj": torch.randn(8, 4),
        "text_projection": torch.randn(6, 4),
        "visual.transformer.resblocks.3.attn.out_proj.weight": torch.randn(8, 8),
        "transformer.resblocks.0.mlp.c_fc.bias": torch.randn(24),
        "logit_scale": torch.tensor(1.0),
    }
    duomo = openclip_to_duomo(sd)
    assert duomo["visual.proj.weight"].shape == (4, 8) and duomo["text.proj.weight"].shape == (4, 6)
    assert (
        "visual.transformer.blocks.3.attn.proj.weight" in duomo
        and "text.transformer.blocks.0.mlp.fc1.bias" in duomo
    )
    back = duomo_to_openclip(duomo)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_openai_extras_are_dropped():
    sd = {
        "input_resolution": torch.tensor(224),
        "vocab_size": torch.tensor(10),
        "logit_scale": torch.tensor(1.0),
    }
    sd["transformer.resblocks.0.attn_mask"] = torch.zeros(3, 3)
    assert list(openclip_to_duomo(sd)) == ["logit_scale"]


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14-336", "ViT-H-14"])
def test_config_translation_matches_the_zoo(open_clip, name):
    cfg = get_model_config(name)
    assert openclip_config_to_duomo(duomo_config_to_openclip(cfg)) == cfg
    assert openclip_config_to_duomo(open_clip.get_model_config(name)) == cfg


def test_infer_config_from_shapes_of_a_bigger_model():
    cfg = get_model_config("ViT-L-14-336-quickgelu")
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in _meta_openclip_sd(cfg).items()}
    assert infer_openclip_config(shapes, quick_gelu=True) == cfg


def _meta_openclip_sd(cfg):
    from duomo.models import create_model

    with torch.device("meta"):
        return duomo_to_openclip(create_model(cfg).state_dict())
