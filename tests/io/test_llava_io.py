"""LLaVA (transformers LlavaForConditionalGeneration) directories: a tiny random model reads with the same
logits on a conversation with images, and exports back to a directory transformers reads."""

import json

import pytest
import torch

from duomo.errors import CheckpointError, InputError
from duomo.io.llava import export_llava, is_llava_dir, read_llava

transformers = pytest.importorskip("transformers")

IMAGE = 63


def tiny_llava(select: str = "default", layer: int = -2):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE,
        vision_feature_select_strategy=select, vision_feature_layer=layer,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def sequence(per_image: int) -> torch.Tensor:
    """Text, an image, more text, a second image, text (PaLM-E's interleaving)."""
    return torch.tensor([[1, 5, 6] + [IMAGE] * per_image + [7, 8] + [IMAGE] * per_image + [9, 10, 11]])


@pytest.mark.parametrize(("select", "layer"), [("default", -2), ("full", -1)])
def test_llava_logits_match_transformers(tmp_path, select, layer):
    ref = tiny_llava(select, layer)
    ref.save_pretrained(tmp_path)
    assert is_llava_dir(tmp_path)
    model, _ = read_llava(tmp_path)
    per = model.config.tokens_per_image
    assert per == (16 if select == "default" else 17)
    ids, images = sequence(per), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=images).logits
        got = model(ids, images)
    assert (got - want).abs().max() < 1e-4


def test_llava_exports_back(tmp_path):
    ref = tiny_llava()
    ref.save_pretrained(tmp_path / "src")
    model, _ = read_llava(tmp_path / "src")
    export_llava(model, tmp_path / "out")
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, images = sequence(16), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (
            back(input_ids=ids, pixel_values=images).logits - ref(input_ids=ids, pixel_values=images).logits
        ).abs().max() < 1e-5


def test_placeholders_must_match_images(tmp_path):
    ref = tiny_llava()
    ref.save_pretrained(tmp_path)
    model, _ = read_llava(tmp_path)
    with pytest.raises(InputError, match="2 image placeholder"):
        model(sequence(16), torch.randn(1, 3, 32, 32))
    with pytest.raises(InputError, match="0 image placeholder"):
        model(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 32, 32))


def test_unbuilt_llava_variants_are_refused(tmp_path):
    tiny_llava().config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"vision_feature_select_strategy": "odd"}, "vision_feature_select_strategy"),
        ({"vision_feature_layer": [-2, -5]}, "several vision feature layers"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "CLIP vision only"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(CheckpointError, match=message):
            read_llava(tmp_path)
