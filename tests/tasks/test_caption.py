"""Captioning the BEiT-3 way: cached vs uncached decoding, greedy vs beam 1, stopping, BLEU-4 and CIDEr-D."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from duomo.data.tokenizers import special_ids
from duomo.errors import CheckpointError, InputError
from duomo.io.beit3_tasks import load_task, save_task
from duomo.models.beit3 import BEiT3, BEiT3ForCaptioning, KVCache, caption_attention_mask, get_beit3_config
from duomo.tasks.beit3.caption import beam_search, bleu, cider_d, greedy_decode
from duomo.tasks.beit3.data import TaskTable, caption_vocabulary
from duomo.train.objectives.beit3 import CaptionObjective

torch.set_num_threads(1)

# the default (torchscale) layout, and the paper's: shared attention with a vision-language expert on top
LAYOUTS = {
    "default": {},
    "paper": {"shared_attention": True, "vl_layers": 1, "subln": False},
}


def tiny(layout: str = "default") -> BEiT3ForCaptioning:
    """A 2-layer captioner on 32 px images in one of the `LAYOUTS`."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_beit3_config("beit3-micro"), **LAYOUTS[layout])
    sot, eot, _ = special_ids(cfg)
    return BEiT3ForCaptioning(BEiT3(cfg), sot, eot).eval()


def test_attention_mask_is_unilm_uni_mask() -> None:
    m = caption_attention_mask(2, 3)
    assert m[:2, :2].all() and not m[:2, 2:].any()  # images see images only
    assert m[2:, :2].all()  # text sees every image token
    assert torch.equal(m[2:, 2:], torch.ones(3, 3, dtype=torch.bool).tril())  # and earlier text


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decoding_equals_uncached(layout: str) -> None:
    model = tiny(layout)
    cfg = model.beit3.cfg
    assert (cfg.shared_attention, cfg.vl_layers) == ((True, 1) if layout == "paper" else (False, 0))
    images = torch.randn(2, 3, 32, 32)
    prefix = torch.tensor([[49406, 320, 1929, 2368], [49406, 2102, 530, 5936]])
    cache = model.start_decoding(images)
    assert isinstance(cache, KVCache) and len(cache.layers) == cfg.layers
    assert (cache.image_tokens, cache.text_tokens) == (model.beit3.num_image_tokens, 0)
    with torch.no_grad():
        for j in range(prefix.shape[1]):
            cached = model.next_token_logits(cache, prefix[:, j])
            full = model.next_token_logits_uncached(images, prefix[:, : j + 1])
            assert torch.allclose(cached, full, atol=1e-4), (j, (cached - full).abs().max())
            assert cache.text_tokens == j + 1  # the token is kept, the [MASK] read out and dropped
    assert greedy_decode(model, images, 5) == greedy_decode(model, images, 5, use_cache=False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_selected_cache_decodes_as_its_rows(layout: str) -> None:
    model = tiny(layout)
    images = torch.randn(2, 3, 32, 32)
    first = torch.tensor([49406, 49406])
    with torch.no_grad():
        cache = model.start_decoding(images)
        model.next_token_logits(cache, first)
        rows = torch.tensor([1, 1, 0])  # beam search repeats and reorders rows
        picked = cache.select(rows)
        assert (picked.image_tokens, picked.text_tokens) == (cache.image_tokens, cache.text_tokens)
        got = model.next_token_logits(picked, torch.tensor([320, 1929, 2368]))
        prefix = torch.tensor([[49406, 320], [49406, 1929], [49406, 2368]])
        want = model.next_token_logits_uncached(images[rows], prefix)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_beam_one_equals_greedy(layout: str) -> None:
    model = tiny(layout)
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
    save_task(model, tmp_path / "cap", "caption")
    again, config = load_task(tmp_path / "cap")
    assert config["task"] == "caption" and (again.sot_id, again.eot_id) == (model.sot_id, model.eot_id)
    assert greedy_decode(again, images, 4) == greedy_decode(model, images, 4)
    with pytest.raises(CheckpointError, match="no model folder"):
        load_task(tmp_path / "missing")


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
    cache = short.start_decoding(images)
    with torch.no_grad():
        for j in range(prefix.shape[1]):  # cached == uncached with a shortlist too
            torch.testing.assert_close(
                short.next_token_logits(cache, prefix[:, j]),
                short.next_token_logits_uncached(images, prefix[:, : j + 1]),
                atol=1e-4,
                rtol=1e-4,
            )
    save_task(short, tmp_path / "cap", "caption")
    again, _ = load_task(tmp_path / "cap", "caption")
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
    table = TaskTable(
        torch.zeros(1, 3, 32, 32),
        torch.zeros(2, dtype=torch.long),
        {"tokens": tokens, "padding_mask": torch.zeros(2, 4).bool()},
    )
    assert caption_vocabulary(table, model.sot_id) == [320, 530, 1929, 2368, 49407]


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
    from duomo.tasks.beit3.caption import tidy_caption

    assert tidy_caption("two shapes : a red star , a blue heart .") == "two shapes: a red star, a blue heart."
    assert tidy_caption("green square .") == "green square."
    assert tidy_caption("a small red circle") == "a small red circle"
