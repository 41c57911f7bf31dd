"""Guided caption decoding: the CLIP re-ranks only the captioner's own candidates, is recorded from
--vision-init, and off / unknown / unloadable guides behave as documented."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import duomo
from duomo.data.tokenizers import special_ids
from duomo.errors import InputError
from duomo.io.beit3_tasks import load_task
from duomo.models.beit3 import BEiT3, BEiT3ForCaptioning, BEiT3ForMDM, get_beit3_config
from duomo.tasks.beit3.caption import beam_search, caption_grounding, caption_image, generate, named_pair
from duomo.tasks.beit3.caption_guide import GUIDED_BEAM, CaptionGuide, GuideCLIP, resolve_guide

torch.set_num_threads(1)


CFG = get_beit3_config("beit3-micro")
SOT, EOT, _ = special_ids(CFG)


def tiny() -> BEiT3ForCaptioning:
    torch.manual_seed(0)
    return BEiT3ForCaptioning(BEiT3(CFG), SOT, EOT).eval()


def micro_clip() -> duomo.Pipeline:
    torch.manual_seed(1)
    return duomo.load("ViT-micro", device="cpu")


def guide_of(clip: duomo.Pipeline, weight: float = 0.5) -> CaptionGuide:
    """A guide around the pipeline's CLIP (the guide encodes; the pipeline is the reference)."""
    return CaptionGuide(GuideCLIP(clip.model, "cpu", clip.name), weight=weight)


def test_a_zero_bonus_changes_nothing() -> None:
    model, images = tiny(), torch.randn(2, 3, 32, 32)
    zero = beam_search(model, images, beam=3, max_len=6, rescore=lambda i, c: torch.zeros(len(c)))
    assert zero == beam_search(model, images, beam=3, max_len=6)


def test_the_bonus_picks_among_the_captioners_own_candidates() -> None:
    model, image = tiny(), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first = model.next_token_logits(model.start_decoding(image), torch.tensor([model.sot_id]))
    best, second, outside = first[0].topk(3).indices.tolist()
    plain = beam_search(model, image, beam=1, max_len=4)[0]
    assert plain[0] == best

    def favour(token: int):  # noqa: ANN202
        return lambda i, cands: torch.tensor([100.0 if c[:1] == [token] else 0.0 for c in cands])

    # beam 1 looks at the 2 best continuations: the bonus can choose the runner-up ...
    assert beam_search(model, image, beam=1, max_len=4, rescore=favour(second))[0][0] == second
    # ... but never a token the captioner does not offer
    assert beam_search(model, image, beam=1, max_len=4, rescore=favour(outside))[0][0] == best


def test_bonus_is_weight_times_scale_times_cosine() -> None:
    clip = micro_clip()
    guide = guide_of(clip, weight=0.5)
    assert guide.name == "ViT-micro"
    img = clip.encode_image(Image.new("RGB", (32, 32), "red"))[0]
    texts = ["a red circle", "a blue square"]
    want = 0.5 * guide.scale * (clip.encode_text(texts) @ img)
    torch.testing.assert_close(guide.bonus(img, texts), want)
    assert guide.bonus(img, [""]).shape == (1,)  # the empty first prefix is scored, not an error
    assert torch.equal(guide_of(clip, weight=0.0).bonus(img, texts), torch.zeros(2))
    with pytest.raises(InputError, match="weight"):
        guide_of(clip, weight=-1.0)


def test_image_embeddings_follow_the_guides_own_preprocessing() -> None:
    clip = micro_clip()
    guide = guide_of(clip)
    vision = clip.config.vision
    image = Image.effect_noise((vision.image_size, vision.image_size), 60).convert("RGB")
    want = clip.encode_image(image)
    same = dataclasses.replace(CFG, image_size=vision.image_size, mean=vision.mean, std=vision.std)
    torch.testing.assert_close(guide.image_embeddings(clip.preprocess(image)[None], same), want)
    # a captioner with another normalisation: its pixels are brought back to the CLIP's
    other = dataclasses.replace(same, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from duomo.data.transforms import image_transform

    pixels = image_transform(other.image_size, other.mean, other.std)(image)[None]
    torch.testing.assert_close(guide.image_embeddings(pixels, other), want, atol=1e-4, rtol=1e-4)


def test_generate_guided_defaults_to_a_beam(monkeypatch: pytest.MonkeyPatch) -> None:
    import duomo.tasks.beit3.caption as caption

    seen = {}
    real = caption.beam_search

    def spy(model, images, beam, max_len, rescore=None):  # noqa: ANN001, ANN202
        seen["beam"], seen["rescore"] = beam, rescore
        return real(model, images, beam, max_len, rescore=rescore)

    monkeypatch.setattr(caption, "beam_search", spy)
    out = generate(tiny(), torch.randn(1, 3, 32, 32), max_len=3, guide=guide_of(micro_clip()))
    assert len(out) == 1 and seen["beam"] == GUIDED_BEAM and seen["rescore"] is not None


@pytest.fixture
def clip_folder(tmp_path: Path) -> Path:
    clip = micro_clip()
    return clip.save(tmp_path / "tower-clip")


def test_vision_init_is_recorded_and_guides_by_default(
    tmp_path: Path, clip_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duomo.tasks.beit3.caption as caption
    from duomo.tasks.beit3.run import BEiT3Run, train_beit3

    run = BEiT3Run(
        "caption",
        tmp_path / "cap",
        config="beit3-micro",
        vision_init=str(clip_folder),
        size=4,
        eval_size=0,
        train={"steps": 1, "batch_size": 2, "workers": 0, "quiet": True, "plot": False},
    )
    assert list(train_beit3(run, log=lambda _: None)) == []  # no evaluation asked for
    model, config = load_task(tmp_path / "cap", "caption")
    assert config["vision_init"] == str(clip_folder.resolve())

    guides = []  # the guide each decoding ran with (its CLIP's folder), None when unguided
    real = caption.generate

    def spy(model, images, beam=None, max_len=caption.MAX_CAPTION, spm_path=None, guide=None):  # noqa: ANN001, ANN202
        guides.append(None if guide is None else Path(guide.name).resolve())
        return real(model, images, beam, max_len, spm_path, guide)

    monkeypatch.setattr(caption, "generate", spy)
    image = Image.new("RGB", (32, 32), "blue")
    guided = caption_image(model, image, max_len=4, guide=str(clip_folder))
    assert caption_image(model, image, max_len=4, vision_init=config["vision_init"]) == guided
    # a captioner loaded through the Python API guides by the CLIP its folder records
    assert duomo.load(str(tmp_path / "cap"), device="cpu").caption(image, max_len=4) == [guided]
    assert guides == [clip_folder.resolve()] * 3
    assert caption_image(model, image, max_len=4, guide="none") == caption_image(
        model, image, beam=1, max_len=4, guide="none"
    )
    caption_image(model, image, max_len=4)  # nothing recorded given: "auto" decodes plainly
    assert guides[3:] == [None, None, None]


def test_resolve_guide_off_missing_and_unknown(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert resolve_guide(None) is None  # nothing recorded: plain decoding
    assert resolve_guide("shapes-tiny", "none") is None
    assert resolve_guide("shapes-tiny", "auto", weight=0.0) is None
    with caplog.at_level(logging.WARNING, logger="duomo"):
        assert resolve_guide(str(tmp_path / "moved-away")) is None  # recorded but gone: warn, go on
    assert "without guidance" in caplog.text
    with pytest.raises(InputError, match="caption guide"):
        resolve_guide(None, "no-such-clip")
    assert resolve_guide(None, "shapes-tiny").name == "shapes-tiny"


def test_grounding_reads_the_first_named_pair() -> None:
    assert named_pair("two shapes: a small red star on the left and a blue heart") == ("red", "star")
    assert named_pair("a drawing of something") is None
    objects = [[("red", "star"), ("blue", "heart")], [("green", "circle")], [("pink", "cross")]]
    got = caption_grounding(["a blue heart", "Green circle.", "a pink square"], objects)
    assert got == {"grounded": pytest.approx(2 / 3), "main": pytest.approx(1 / 3)}
    with pytest.raises(InputError):
        caption_grounding(["a"], [])


def test_a_caption_model_takes_one_start() -> None:
    mdm = BEiT3ForMDM(BEiT3(CFG))
    model = BEiT3ForCaptioning.from_mdm(mdm, SOT, EOT)
    assert model.beit3 is mdm.beit3  # the pretrained backbone, its [MASK] embedding and LM head: one start
    assert model.text_mask is mdm.text_mask and model.lm_head is mdm.lm_head
    assert (model.sot_id, model.eot_id) == (SOT, EOT)
    # a run that is given a pretrained folder and a CLIP tower to start from is refused before any work
    from duomo.tasks.beit3.run import BEiT3Run

    both = BEiT3Run("caption", Path("unused"), init=Path("pretrained"), vision_init="shapes-tiny")
    with pytest.raises(InputError, match="drop one of them"):
        both.check()
