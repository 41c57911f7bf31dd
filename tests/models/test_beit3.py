"""BEiT-3 backbone and Multiway Transformer: configs, routing, modes, masks, both layouts, heads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from duomo.errors import ConfigError, InputError, UnknownModelError
from duomo.models.beit3 import (
    BEiT3,
    BEiT3Config,
    BEiT3ForRetrieval,
    BEiT3ForVQA,
    create_beit3,
    get_beit3_config,
    list_beit3_models,
)
from duomo.models.beit3.multiway import Multiway, route

TINY = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, ffn_dim=128, vocab_size=100)
SHARED = dict(TINY, subln=False, shared_attention=True, vl_layers=1)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Two images, two texts of 6 tokens; the first text is padded after 3 tokens."""
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 3:] = True
    return {
        "images": torch.randn(2, 3, 32, 32, generator=g),
        "text": torch.randint(0, 100, (2, 6), generator=g),
        "pad": pad,
    }


def model(**overrides) -> BEiT3:
    torch.manual_seed(0)
    return BEiT3(BEiT3Config(**{**TINY, **overrides})).eval()


def test_named_configs_parse_and_have_the_published_sizes():
    names = list_beit3_models()
    assert {"beit3-base-patch16-224", "beit3-large-patch16-224", "beit3-tiny", "beit3-tiny-shared"} <= set(
        names
    )
    for name in names:
        assert get_beit3_config(name).to_dict()["architecture"] == "beit3"
    expected = {
        "beit3-base-patch16-224": (768, 12, 12, 3072),
        "beit3-large-patch16-224": (1024, 24, 16, 4096),
    }
    for name, (width, layers, heads, ffn) in expected.items():
        cfg = get_beit3_config(name)
        assert (cfg.width, cfg.layers, cfg.heads, cfg.ffn_dim, cfg.vocab_size) == (
            width,
            layers,
            heads,
            ffn,
            64010,
        )
        assert (cfg.image_size, cfg.patch_size, cfg.max_text_positions) == (224, 16, 1024)
    with torch.device("meta"):
        base = create_beit3("beit3-base-patch16-224")
    assert sum(p.numel() for p in base.parameters()) == 220_987_392  # torchscale's BEiT3 base backbone
    assert base.pos_embed.vision.weight.shape == (2 + 1 + 196, 768)  # fairseq offset + cls + 14x14


def test_config_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(UnknownModelError, match="beit3-base-patch16-224"):
        get_beit3_config("beit3-base-patch16-22")
    with pytest.raises(ConfigError, match="unknown BEiT3Config fields.*widht"):
        BEiT3Config.from_dict({"widht": 4})
    with pytest.raises(ConfigError, match="architecture"):
        BEiT3Config.from_dict({"architecture": "clip"})
    with pytest.raises(ConfigError, match="subln"):
        BEiT3Config(normalize_before=False)
    with pytest.raises(ConfigError, match="vl_layers"):
        BEiT3Config(**{**TINY, "vl_layers": 3})
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(BEiT3Config(**TINY).to_dict()))
    assert get_beit3_config(str(path)) == BEiT3Config(**TINY)


def test_multiway_routes_tokens_by_modality():
    layer = Multiway(nn.Linear(2, 2), nn.Linear(2, 2))
    x = torch.randn(3, 5, 2)
    mixed = layer(x, 2)
    assert torch.equal(mixed[:, :2], layer.vision(x[:, :2]))
    assert torch.equal(mixed[:, 2:], layer.text(x[:, 2:]))
    assert torch.equal(layer(x, 5), layer.vision(x))  # images alone
    assert torch.equal(layer(x, 0), layer.text(x))  # text alone
    fused = Multiway(nn.Linear(2, 2), nn.Linear(2, 2), vl=nn.Linear(2, 2))
    assert torch.equal(fused(x, 2), fused.vl(x))  # a vision-language expert takes a whole fused sequence
    assert torch.equal(fused(x, 5), fused.vision(x))
    assert torch.equal(route(nn.Identity(), x, 2), x)


@pytest.mark.parametrize("layout", [TINY, SHARED], ids=["decoupled", "shared"])
def test_modes_shapes_and_kernels_agree(batch, layout):
    m = model(**layout)
    n_img = m.num_image_tokens
    assert n_img == 1 + 16
    with torch.no_grad():
        outs = {
            "vision": m(images=batch["images"]),
            "language": m(text=batch["text"], text_padding_mask=batch["pad"]),
            "fused": m(images=batch["images"], text=batch["text"], text_padding_mask=batch["pad"]),
        }
        m.encoder.set_fast_attention(False)
        slow = m(images=batch["images"], text=batch["text"], text_padding_mask=batch["pad"])
    assert outs["vision"].shape == (2, n_img, 64)
    assert outs["language"].shape == (2, 6, 64)
    assert outs["fused"].shape == (2, n_img + 6, 64)
    torch.testing.assert_close(slow, outs["fused"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", [TINY, SHARED], ids=["decoupled", "shared"])
def test_padding_does_not_leak(batch, layout):
    """Non-padding outputs are the same whatever the padding holds and however much of it there is."""
    m = model(**layout)
    images, text = batch["images"][:1], batch["text"][:1, :3]
    longer = torch.cat([text, torch.randint(0, 100, (1, 5))], dim=1)
    pad = torch.zeros(1, 8, dtype=torch.bool)
    pad[0, 3:] = True
    with torch.no_grad():
        short = m(images=images, text=text)
        padded = m(images=images, text=longer, text_padding_mask=pad)
        text_only = m(text=text), m(text=longer, text_padding_mask=pad)
    n = short.shape[1]
    torch.testing.assert_close(padded[:, :n], short, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_only[1][:, :3], text_only[0], atol=1e-5, rtol=0)


def test_modality_experts_are_used_where_they_belong(batch):
    """Vision-only output ignores the text experts; text-only ignores the vision ones."""
    m = model()
    with torch.no_grad():
        vision, text = m(images=batch["images"]), m(text=batch["text"])
        for block in m.encoder.blocks:
            block.mlp.text.fc2.weight.add_(1.0)
        assert torch.equal(m(images=batch["images"]), vision)
        assert not torch.allclose(m(text=batch["text"]), text)


def test_vl_experts_only_in_fused_mode_of_the_top_layers(batch):
    m = model(**SHARED)
    assert [b.mlp.vl is not None for b in m.encoder.blocks] == [False, True]
    with torch.no_grad():
        vision, text = m(images=batch["images"]), m(text=batch["text"])
        fused = m(images=batch["images"], text=batch["text"])
        m.encoder.blocks[1].mlp.vl.fc2.bias.add_(1.0)
        assert torch.equal(m(images=batch["images"]), vision)
        assert torch.equal(m(text=batch["text"]), text)
        assert not torch.allclose(m(images=batch["images"], text=batch["text"]), fused)
    # the paper's layout shares attention: no per-modality projections
    assert isinstance(m.encoder.blocks[0].attn.q, nn.Linear)


def test_masked_patches_and_other_resolutions(batch):
    m = model()
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::2] = True
    with torch.no_grad():
        assert not torch.allclose(m(images=batch["images"], vision_mask=masked), m(images=batch["images"]))
        assert m(images=torch.randn(1, 3, 48, 48)).shape == (1, 1 + 36, 64)  # positions interpolated


def test_bad_inputs_raise_input_errors(batch):
    m = model(max_text_positions=10)
    with pytest.raises(InputError, match="needs images, text"):
        m()
    with pytest.raises(InputError, match="longer than this model's 8"):
        m(text=torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        m(images=torch.zeros(3, 32, 32))
    with pytest.raises(InputError, match="must match"):
        m(text=batch["text"], text_padding_mask=batch["pad"][:, :2])


def test_training_step_with_drop_path_and_checkpointing(batch):
    m = model(drop_path_rate=0.1).train()
    m.encoder.grad_checkpointing = True
    out = m(images=batch["images"], text=batch["text"], text_padding_mask=batch["pad"])
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert grads["encoder.blocks.0.attn.q.vision.weight"].abs().sum() > 0
    assert grads["encoder.blocks.0.mlp.text.fc1.weight"].abs().sum() > 0
    assert grads["vision_embed.mask_token"] is None  # no patch was masked


def test_vqa_and_retrieval_heads(batch):
    torch.manual_seed(0)
    vqa = BEiT3ForVQA(BEiT3(BEiT3Config(**TINY)), num_answers=7).eval()
    names = set(vqa.state_dict())
    assert {
        "pooler.norm.weight",
        "pooler.dense.weight",
        "head.0.weight",
        "head.1.weight",
        "head.3.bias",
    } <= names
    with torch.no_grad():
        assert vqa(batch["images"], batch["text"], batch["pad"]).shape == (2, 7)
    retrieval = BEiT3ForRetrieval(BEiT3(BEiT3Config(**TINY))).eval()
    with torch.no_grad():
        image = retrieval.encode_image(batch["images"])
        text = retrieval.encode_text(batch["text"], batch["pad"])
    assert image.shape == text.shape == (2, 64)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
