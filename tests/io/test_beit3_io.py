"""BEiT-3 checkpoints in torchscale's layout: parity with torchscale's BEiT3, loading, errors, export."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.beit3 import (
    duomo_to_torchscale,
    export_beit3,
    infer_beit3_config,
    load_beit3,
    load_beit3_classifier,
    load_beit3_retrieval,
    load_beit3_vqa,
    read_beit3,
    split_checkpoint,
    to_unilm,
    torchscale_config,
    torchscale_to_duomo,
)
from duomo.io.checkpoint import load_into
from duomo.models.beit3 import BEiT3, BEiT3Config, get_beit3_config

TOLERANCE = 1e-5  # max abs difference of fp32 hidden states
MODES = ("vision", "language", "fused")
# head_dim 64, as in every released size, so that the head count inferred from weights is right
TINY = dict(image_size=32, patch_size=8, width=128, layers=2, heads=2, ffn_dim=256, vocab_size=100)
VARIANTS = {  # torchscale's flag combinations: Magneto (released), plain pre-LN, DeepNet, embedding LN
    "subln": {},
    "pre-ln": {"subln": False},
    "deepnorm": {"subln": False, "normalize_before": False, "deepnorm": True},
    "embed-ln": {"layernorm_embedding": True, "normalize_output": False, "scale_embedding": True},
}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights: matrices ~ N(0, 1/fan_in), LayerNorm gains ~ 1 + N(0, 0.01), vectors ~ N(0, 0.01)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1, generator=g)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(1.0)
    return model


def torchscale_classes() -> tuple[type, type]:
    """torchscale's EncoderConfig and BEiT3: the reference; skips the calling test without torchscale."""
    with warnings.catch_warnings():  # torchscale imports timm.models.layers, deprecated in timm 1.x
        warnings.simplefilter("ignore")
        pytest.importorskip("torchscale")
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3
    return EncoderConfig, TorchscaleBEiT3


def torchscale_model(cfg: BEiT3Config, seed: int = 0) -> nn.Module:
    """torchscale's BEiT3 for `cfg` with random weights (no init: built on the meta device), in eval mode."""
    EncoderConfig, TorchscaleBEiT3 = torchscale_classes()
    with torch.device("meta"):
        model = TorchscaleBEiT3(EncoderConfig(**torchscale_config(cfg)))
    return randomize(model.to_empty(device="cpu"), seed).eval()


def inputs(cfg: BEiT3Config, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Images, token ids and a padding mask where the first sequence ends early."""
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[0, length // 2 :] = True
    return {
        "images": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g),
        "text": torch.randint(0, cfg.vocab_size, (batch, length), generator=g),
        "pad": pad,
    }


def compare(
    reference: nn.Module, ours: BEiT3, x: dict[str, torch.Tensor], modes: tuple[str, ...] = MODES
) -> dict[str, float]:
    """Max abs difference per mode: vision-only, language-only (padded), fused (padded)."""
    calls = {
        "vision": ({"visual_tokens": x["images"]}, {"images": x["images"]}),
        "language": (
            {"textual_tokens": x["text"], "text_padding_position": x["pad"]},
            {"text": x["text"], "text_padding_mask": x["pad"]},
        ),
        "fused": (
            {"visual_tokens": x["images"], "textual_tokens": x["text"], "text_padding_position": x["pad"]},
            {"images": x["images"], "text": x["text"], "text_padding_mask": x["pad"]},
        ),
    }
    diffs = {}
    with torch.no_grad():
        for mode in modes:
            theirs, mine = calls[mode]
            expected = reference(**theirs)["encoder_out"]
            got = ours(**mine)
            assert got.shape == expected.shape, mode
            diffs[mode] = (got - expected).abs().max().item()
    return diffs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_torchscale(variant):
    cfg = BEiT3Config(**TINY, max_text_positions=20, **VARIANTS[variant])
    reference = torchscale_model(cfg)
    ours = load_into(BEiT3(cfg), torchscale_to_duomo(reference.state_dict())).eval()
    x = inputs(cfg)
    for fast in (True, False):
        ours.encoder.set_fast_attention(fast)
        diffs = compare(reference, ours, x)
        assert max(diffs.values()) <= TOLERANCE, (variant, fast, diffs)


def test_parity_with_masks_and_positions_beyond_the_first():
    """Captioning's attention mask, masked image patches, and padding at the end of a long text."""
    cfg = BEiT3Config(**TINY, max_text_positions=40)
    reference = torchscale_model(cfg, seed=3)
    ours = load_into(BEiT3(cfg), torchscale_to_duomo(reference.state_dict())).eval()
    x = inputs(cfg, batch=2, length=30)
    n_img = ours.num_image_tokens
    total = n_img + 30
    allowed = torch.zeros(total, total, dtype=torch.bool)  # unilm's captioning mask: text is causal
    allowed[:, :n_img] = True
    allowed[n_img:, n_img:] = torch.ones(30, 30).tril().bool()
    allowed[:n_img, n_img:] = False
    masked = torch.rand(2, cfg.num_patches, generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        expected = reference(
            visual_tokens=x["images"], textual_tokens=x["text"], text_padding_position=x["pad"],
            attn_mask=(~allowed).long(), vision_masked_position=masked,
        )["encoder_out"]  # fmt: skip
        got = ours(x["images"], x["text"], x["pad"], attn_mask=allowed, vision_mask=masked)
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_base_size_parity_with_torchscale():
    cfg = get_beit3_config("beit3-base-patch16-224")
    start = time.perf_counter()
    reference = torchscale_model(cfg)
    with torch.device("meta"):  # skip the random init: every tensor comes from the reference
        ours = BEiT3(cfg)
    ours.load_state_dict(torchscale_to_duomo(reference.state_dict()), strict=True, assign=True)
    # vision-only runs the same modules as the image part of fused; the tiny tests cover it
    diffs = compare(reference, ours.eval(), inputs(cfg, batch=1, length=12), ("language", "fused"))
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert sum(p.numel() for p in ours.parameters()) == 220_987_392  # torchscale's BEiT3 base backbone
    assert time.perf_counter() - start < 60


@pytest.fixture(scope="module")
def tiny() -> tuple[BEiT3Config, nn.Module]:
    """A tiny torchscale BEiT3 with random weights and its config."""
    cfg = BEiT3Config(**TINY, max_text_positions=20)
    return cfg, torchscale_model(cfg, seed=5)


def test_export_round_trips_into_torchscale(tiny):
    cfg, reference = tiny
    EncoderConfig, TorchscaleBEiT3 = torchscale_classes()
    ours = load_into(BEiT3(cfg), torchscale_to_duomo(reference.state_dict())).eval()
    fresh = TorchscaleBEiT3(EncoderConfig(**torchscale_config(cfg))).eval()
    fresh.load_state_dict(duomo_to_torchscale(ours.state_dict()), strict=True)
    assert max(compare(fresh, ours, inputs(cfg)).values()) <= TOLERANCE
    exported = fresh.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("layout", ["unilm-pth", "bare-pth", "safetensors", "ddp"])
def test_load_checkpoint_files(tiny, tmp_path, layout):
    cfg, reference = tiny
    sd = reference.state_dict()
    if layout == "unilm-pth":  # as released: {"model": {"beit3.<names>": ...}}
        path = tmp_path / "beit3.pth"
        torch.save({"model": {f"beit3.{k}": v for k, v in sd.items()}}, path)
    elif layout == "bare-pth":  # torchscale's BEiT3.state_dict() as is
        path = tmp_path / "bare.pth"
        torch.save(sd, path)
    elif layout == "ddp":
        path = tmp_path / "ddp.pt"
        torch.save({"module": {f"module.beit3.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "beit3.safetensors"
        save_file({f"beit3.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    model = load_beit3(path)
    assert model.cfg == cfg
    assert not model.training
    assert max(compare(reference, model, inputs(cfg)).values()) <= TOLERANCE


def test_infer_config_of_released_sizes():
    for name in ("beit3-base-patch16-224", "beit3-large-patch16-224"):
        cfg = get_beit3_config(name)
        with torch.device("meta"):
            sd = duomo_to_torchscale(BEiT3(cfg).state_dict())
        assert infer_beit3_config(sd) == cfg


def test_mismatches_name_the_keys(tiny, tmp_path):
    cfg, reference = tiny
    sd = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    missing = dict(sd)
    del missing["beit3.encoder.layers.1.self_attn.q_proj.B.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth.*encoder\.blocks\.1\.attn\.q\.text\.weight"):
        load_beit3(tmp_path / "missing.pth")

    extra = {**sd, "beit3.encoder.layers.0.self_attn.rel_pos.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key.*rel_pos"):
        load_beit3(tmp_path / "extra.pth")

    torch.save(sd, tmp_path / "ok.pth")
    wider = BEiT3Config(**{**TINY, "ffn_dim": 512}, max_text_positions=20)
    with pytest.raises(CheckpointError, match=r"shape difference.*mlp\.vision\.fc1\.weight"):
        load_beit3(tmp_path / "ok.pth", config=wider)

    torch.save({"visual.conv1.weight": torch.zeros(4, 3, 8, 8)}, tmp_path / "clip.pt")
    with pytest.raises(CheckpointError, match="not a BEiT-3 checkpoint.*text_embed.weight"):
        load_beit3(tmp_path / "clip.pt")


def test_heads_are_left_out_of_the_backbone_and_asked_for_by_tasks(tiny, tmp_path):
    cfg, reference = tiny
    sd = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    torch.save(
        {"model": {**sd, "mlm_head.weight": torch.zeros(cfg.vocab_size, cfg.width)}}, tmp_path / "pt.pth"
    )
    assert isinstance(load_beit3(tmp_path / "pt.pth"), BEiT3)
    _, _, heads = read_beit3(tmp_path / "pt.pth")
    assert list(heads) == ["mlm_head.weight"]
    with pytest.raises(CheckpointError, match="no VQA head"):
        load_beit3_vqa(tmp_path / "pt.pth")


class UnilmVQA(nn.Module):
    """unilm's BEiT3ForVisualQuestionAnswering (beit3/modeling_finetune.py), written out for the test."""

    def __init__(self, cfg: BEiT3Config, num_classes: int) -> None:
        super().__init__()
        dim = cfg.width
        self.beit3 = torchscale_model(cfg, seed=7)
        self.pooler = nn.Module()
        self.pooler.norm, self.pooler.dense = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.head = nn.Sequential(
            nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2), nn.GELU(), nn.Linear(dim * 2, num_classes)
        )
        randomize(self.pooler, 8)
        randomize(self.head, 9)

    def forward(
        self, image: torch.Tensor, question: torch.Tensor, padding_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.beit3(textual_tokens=question, visual_tokens=image, text_padding_position=padding_mask)
        cls = x["encoder_out"][:, 0]
        return self.head(torch.tanh(self.pooler.dense(self.pooler.norm(cls))))


def test_vqa_checkpoint_parity_and_export(tmp_path):
    cfg = BEiT3Config(**TINY, max_text_positions=20, normalize_output=False)  # unilm's VQA: no final norm
    reference = UnilmVQA(cfg, num_classes=11).eval()
    torch.save({"model": reference.state_dict()}, tmp_path / "vqa.pth")
    model = load_beit3_vqa(tmp_path / "vqa.pth")
    assert model.beit3.cfg == cfg
    x = inputs(cfg)
    with torch.no_grad():
        expected = reference(x["images"], x["text"], x["pad"])
        got = model(x["images"], x["text"], x["pad"])
    assert got.shape == (2, 11)
    assert (got - expected).abs().max().item() <= TOLERANCE

    export_beit3(model, tmp_path / "again.safetensors")
    again = load_beit3_vqa(tmp_path / "again.safetensors")
    assert set(to_unilm(model)) == set(reference.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x["images"], x["text"], x["pad"]), got)


def test_retrieval_checkpoint(tiny, tmp_path):
    cfg, reference = tiny
    sd = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    heads = {
        "vision_head.weight": torch.randn(cfg.width, cfg.width) * cfg.width**-0.5,
        "language_head.weight": torch.randn(cfg.width, cfg.width) * cfg.width**-0.5,
        "logit_scale": torch.tensor(2.0),
    }
    torch.save({"model": {**sd, **heads}}, tmp_path / "itc.pth")
    model = load_beit3_retrieval(tmp_path / "itc.pth")
    x = inputs(cfg)
    with torch.no_grad():
        image = reference(visual_tokens=x["images"])["encoder_out"][:, 0] @ heads["vision_head.weight"].T
        text = reference(textual_tokens=x["text"], text_padding_position=x["pad"])["encoder_out"][:, 0]
        text = text @ heads["language_head.weight"].T
        got_image = model.encode_image(x["images"], normalize=False)
        got_text = model.encode_text(x["text"], x["pad"], normalize=False)
    assert (got_image - image).abs().max().item() <= TOLERANCE
    assert (got_text - text).abs().max().item() <= TOLERANCE


def test_image_classification_checkpoint_parity_and_export(tiny, tmp_path):
    cfg, reference = tiny
    num_classes, gen = 7, torch.Generator().manual_seed(11)
    heads = {
        "fc_norm.weight": 1 + 0.1 * torch.randn(cfg.width, generator=gen),
        "fc_norm.bias": 0.1 * torch.randn(cfg.width, generator=gen),
        "head.weight": torch.randn(num_classes, cfg.width, generator=gen) * cfg.width**-0.5,
        "head.bias": torch.randn(num_classes, generator=gen),
    }
    sd = {f"beit3.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"model": {**sd, **heads}}, tmp_path / "in1k.pth")
    model = load_beit3_classifier(tmp_path / "in1k.pth")
    x = inputs(cfg)
    with torch.no_grad():  # unilm's BEiT3ForImageClassification.forward on torchscale's BEiT3
        patches = reference(visual_tokens=x["images"])["encoder_out"][:, 1:].mean(1)
        norm = nn.functional.layer_norm(patches, (cfg.width,), heads["fc_norm.weight"], heads["fc_norm.bias"])
        expected = norm @ heads["head.weight"].T + heads["head.bias"]
        got = model(x["images"])
    assert got.shape == (2, num_classes)
    assert (got - expected).abs().max().item() <= 1e-4
    export_beit3(model, tmp_path / "again.safetensors")
    assert set(to_unilm(model)) == set(sd) | set(heads)
    torch.save({"model": sd}, tmp_path / "backbone-only.pth")
    with pytest.raises(CheckpointError, match="no image-classification head"):
        load_beit3_classifier(tmp_path / "backbone-only.pth")


def test_fine_tuning_resolution_resizes_vision_positions(tiny, tmp_path):
    cfg, reference = tiny
    torch.save(reference.state_dict(), tmp_path / "224.pth")
    bigger = BEiT3Config(**{**TINY, "image_size": 48}, max_text_positions=20)
    cfg48, sd, _ = read_beit3(tmp_path / "224.pth", config=bigger)
    table, old = sd["pos_embed.vision.weight"], reference.state_dict()["encoder.embed_positions.A.weight"]
    assert table.shape == (2 + 1 + 36, cfg.width)
    assert torch.equal(table[:3], old[:3])  # the two unused rows and the class token stay as they are
    model = load_into(BEiT3(cfg48), sd).eval()
    assert model(images=torch.randn(1, 3, 48, 48)).shape == (1, 37, cfg.width)


def test_only_the_torchscale_layout_exports(tmp_path):
    shared = BEiT3(BEiT3Config(**TINY, subln=False, shared_attention=True, vl_layers=1))
    with pytest.raises(CheckpointError, match="torchscale layout"):
        export_beit3(shared, tmp_path / "x.pth")
    with pytest.raises(ConfigError):
        torchscale_config(shared.cfg)
    with pytest.raises(CheckpointError, match=r"\.pth or \.safetensors"):
        export_beit3(BEiT3(BEiT3Config(**TINY)), tmp_path / "x.npz")


def test_split_checkpoint_keeps_heads_apart():
    backbone, heads = split_checkpoint(
        {"beit3.text_embed.weight": torch.zeros(1), "head.0.weight": torch.zeros(1)}
    )
    assert list(backbone) == ["text_embed.weight"] and list(heads) == ["head.0.weight"]


def test_conv_stem_backbone_runs_but_does_not_export(tmp_path):
    model = BEiT3(BEiT3Config(**TINY, stem="conv"))
    assert isinstance(model.vision_embed.patch_embed, torch.nn.Sequential)
    with pytest.raises(CheckpointError, match="stem='patch'"):
        export_beit3(model, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
    with pytest.raises(ConfigError, match="stem"):
        BEiT3Config(**TINY, stem="resnet")
