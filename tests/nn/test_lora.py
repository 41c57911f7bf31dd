"""LoRA adapters: identity at start, only adapters train, merging keeps the outputs and state-dict keys."""

import pytest
import torch

from duomo.models import create_model
from duomo.nn import MultiHeadAttention
from duomo.nn.lora import LoRALinear, apply_lora, lora_parameters, lora_state_dict, merge_lora


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("ViT-micro").eval()


def _perturb(model):
    """Give every adapter a non-zero update (B starts at zero)."""
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.05)


def test_fresh_adapters_change_nothing(model):
    images = torch.randn(2, 3, 32, 32)
    before = model.encode_image(images)
    apply_lora(model.visual, rank=4, alpha=8)
    assert torch.allclose(model.encode_image(images), before, atol=1e-6)


def test_only_adapters_are_trainable_and_their_count_is_exact(model):
    wrapped = apply_lora(model, rank=4, alpha=8)
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(wrapped) == 2 * len(attentions) == 8  # 2 vision + 2 text layers, qkv and proj each
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    expected = sum(
        4 * (m.qkv.in_features + m.qkv.out_features) + 4 * (m.proj.in_features + m.proj.out_features)
        for m in attentions
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(v.numel() for v in lora_state_dict(model).values()) == expected


def test_targets_select_the_wrapped_projections(model):
    wrapped = apply_lora(model.visual, rank=2, alpha=2, targets=("qkv",))
    assert all(name.endswith(".qkv") for name in wrapped)
    assert not isinstance(model.visual.proj, LoRALinear)  # the tower's output projection is not attention
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(model.text, targets=("fc1",))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model.visual, targets=("qkv",))


def test_merged_weights_give_identical_outputs(model):
    keys = set(model.state_dict())
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 1000, (3, 16))
    apply_lora(model, rank=4, alpha=16)
    _perturb(model)
    with torch.no_grad():
        adapted_img, adapted_txt = model.encode_image(images), model.encode_text(tokens)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), adapted_img, atol=1e-5)
        assert torch.allclose(model.encode_text(tokens), adapted_txt, atol=1e-5)


def test_lora_layer_weight_is_the_merged_weight():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
    assert torch.allclose(layer.merged()(x), layer(x), atol=1e-6)


def test_gradients_reach_only_the_adapters(model):
    apply_lora(model.visual, rank=2, alpha=4)
    model.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)
    assert any(n.endswith("lora_b") for n in grads)
