"""Captioning the BEiT-3 way: cached vs uncached decoding, greedy vs beam 1, stopping, BLEU-4 and CIDEr-D."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from duomo.errors import CheckpointError, InputError
from duomo.models.beit3 import BEiT3, get_beit3_config
from duomo.tasks.caption import (
    BEiT3ForCaptioning,
    CaptionObjective,
    beam_search,
    bleu,
    caption_attention_mask,
    caption_vocabulary,
    cider_d,
    decode_step,
    encode_image,
    greedy_decode,
    load_caption,
    next_logits_uncached,
    save_caption,
)

torch.set_num_threads(1)


def tiny(shared: bool = False) -> BEiT3ForCaptioning:
    """A 2-layer captioner on 32 px images; `shared` is the paper's layout with a VL expert on top."""
    torch.manual_seed(0)
    layout = {"subln": not shared, "shared_attention": shared, "vl_layers": 1 if shared else 0}
    cfg = dataclasses.replace(get_beit3_config("beit3-micro"), **layout)
    return BEiT3ForCaptioning(BEiT3(cfg)).eval()


def test_attention_mask_is_unilm_uni_mask() -> None:
    m = caption_attention_mask(2, 3)
    assert m[:2, :2].all() and not m[:2, 2:].any()  # images see images only
    assert m[2:, :2].all()  # text sees every image token
    assert torch.equal(m[2:, 2:], torch.ones(3, 3, dtype=torch.bool).tril())  # and earlier text


@pytest.mark.parametrize("shared", [False, True])
def test_cached_decoding_equals_uncached(shared: bool) -> None:
    model = tiny(shared)
    images = torch.randn(2, 3, 32, 32)
    prefix = torch.tensor([[49406, 320, 1929, 2368], [49406, 2102, 530, 5936]])
    cache = encode_image(model, images)
    for j in range(prefix.shape[1]):
        cached = decode_step(model, cache, prefix[:, j])
        full = next_logits_uncached(model, images, prefix[:, : j + 1])
        assert torch.allclose(cached, full, atol=1e-4), (j, (cached - full).abs().max())
    assert greedy_decode(model, images, 5) == greedy_decode(model, images, 5, use_cache=False)


@pytest.mark.parametrize("shared", [False, True])
def test_beam_one_equals_greedy(shared: bool) -> None:
    model = tiny(shared)
    images = torch.randn(3, 3, 32, 32)
    assert beam_search(model, images, beam=1, max_len=6) == greedy_decode(model, images, 6)
    wide = beam_search(model, images, beam=3, max_len=6)
    assert len(wide) == 3 and all(len(r) <= 6 for r in wide)


def test_decoding_stops_at_end_token() -> None:
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.lm_head.bias[320] = 50.0  # "a" first ...
    first = greedy_decode(model, images, 4)
    assert first == [[320] * 4, [320] * 4]  # no end token: runs to max_len
    with torch.no_grad():
        model.lm_head.bias[model.eot_id] = 100.0  # ... then the end token wins at once
    assert greedy_decode(model, images, 8) == [[], []]
    assert beam_search(model, images, beam=2, max_len=8) == [[], []]


def test_objective_loss_only_on_masked_tokens() -> None:
    model = tiny().train()
    tokens = torch.tensor([[49406, 320, 1929, 49407, 0], [49406, 320, 2368, 1929, 49407]])
    pad = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = CaptionObjective(ratio=0.6)(
        model, {"pixels": torch.randn(2, 3, 32, 32), "tokens": tokens, "padding_mask": pad}
    )
    assert math.isfinite(float(out["loss"].detach())) and float(out["loss"].detach()) > 0
    out["loss"].backward()
    assert model.text_mask.mask_token.grad is not None


def test_save_load_roundtrip(tmp_path) -> None:
    model = tiny()
    images = torch.randn(1, 3, 32, 32)
    save_caption(model, tmp_path / "cap")
    again = load_caption(tmp_path / "cap")
    assert greedy_decode(again, images, 4) == greedy_decode(model, images, 4)
    with pytest.raises(CheckpointError, match="no model folder"):
        load_caption(tmp_path / "missing")


VOCAB = [320, 1929, 2368, 530, 5936]  # a shortlist ("a", ...); <end_of_text> is added by the model


def test_shortlist_head_equals_the_full_head_on_its_ids_and_decodes_inside_it(tmp_path) -> None:
    full, short = tiny(), tiny()
    short.set_vocabulary(VOCAB)
    assert short.vocab == sorted([*VOCAB, short.eot_id])
    images, ids = torch.randn(2, 3, 32, 32), torch.tensor([[49406, 320, 1929], [49406, 2368, 530]])
    with torch.no_grad():
        torch.testing.assert_close(short(images, ids), full(images, ids)[..., short.vocab_ids])
    out = greedy_decode(short, images, 6)
    assert all(t in short.vocab for row in out for t in row)
    prefix = torch.tensor([[49406, 320], [49406, 2368]])
    cache = encode_image(short, images)
    for j in range(prefix.shape[1]):  # cached == uncached with a shortlist too
        torch.testing.assert_close(
            decode_step(short, cache, prefix[:, j]),
            next_logits_uncached(short, images, prefix[:, : j + 1]),
            atol=1e-4,
            rtol=1e-4,
        )
    save_caption(short, tmp_path / "cap")
    again = load_caption(tmp_path / "cap")
    assert again.vocab == short.vocab and greedy_decode(again, images, 6) == out


def test_shortlist_objective_maps_targets_and_refuses_foreign_ids() -> None:
    model = tiny().train()
    model.set_vocabulary(VOCAB)
    tokens = torch.tensor([[49406, 320, 1929, 49407], [49406, 2368, 530, 49407]])
    batch = {"pixels": torch.randn(2, 3, 32, 32), "tokens": tokens, "padding_mask": torch.zeros(2, 4).bool()}
    out = CaptionObjective(ratio=0.9)(model, batch)
    assert math.isfinite(float(out["loss"].detach()))
    batch["tokens"] = torch.tensor([[49406, 999, 999, 49407], [49406, 999, 999, 49407]])
    with pytest.raises(InputError, match="outside the model's caption vocabulary"):
        CaptionObjective(ratio=0.99)(model, batch)
    with pytest.raises(InputError, match="must lie in"):
        model.set_vocabulary([-3])
    assert caption_vocabulary(tokens, torch.zeros(2, 4).bool()) == [320, 530, 1929, 2368, 49407]


def test_bleu_hand_made() -> None:
    refs = [["the cat is on the mat", "there is a cat on the mat"]]
    assert bleu(["the cat is on the mat"], refs) == pytest.approx(1.0)
    assert bleu(["a dog"], refs) == 0.0
    # "the cat on the mat" (5 words, closest reference 6): p1 = 5/5; p2 = 4/4 ("the cat" from ref 1,
    # "cat on" from ref 2); p3 = 2/3 ("cat on the", "on the mat"); p4 = 1/2 ("cat on the mat")
    expected = math.exp(1 - 6 / 5) * (1 * 1 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["the cat on the mat"], refs) == pytest.approx(expected)


def test_cider_d_hand_made() -> None:
    cands = ["a red star on the left", "a blue circle at the top"]
    refs = [["a red star on the left"], ["a blue circle at the top"]]
    # identical captions: every n-gram shared by both documents ("a", "the") has idf 0; the rest give cosine 1
    assert cider_d(cands, refs) == pytest.approx(10.0)
    assert cider_d(["a blue circle at the top", "a red star on the left"], refs) == pytest.approx(0.0)
    # a shorter partial match scores between, lowered by the length penalty
    part = cider_d(["a red star", "a blue circle at the top"], refs)
    assert 5.0 < part < 10.0


def test_captions_lose_the_tokenizers_space_before_punctuation() -> None:
    from duomo.tasks.caption import tidy_caption

    assert tidy_caption("two shapes : a red star , a blue heart .") == "two shapes: a red star, a blue heart."
    assert tidy_caption("green square .") == "green square."
    assert tidy_caption("a small red circle") == "a small red circle"
