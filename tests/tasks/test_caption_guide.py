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
from duomo.errors import InputError
from duomo.models.beit3 import BEiT3, get_beit3_config
from duomo.tasks.caption import (
    BEiT3ForCaptioning,
    beam_search,
    caption_grounding,
    caption_image,
    decode_step,
    encode_image,
    generate,
    load_caption,
    named_pair,
    save_caption,
)
from duomo.tasks.caption_guide import GUIDED_BEAM, CaptionGuide, resolve_guide

torch.set_num_threads(1)


def tiny() -> BEiT3ForCaptioning:
    torch.manual_seed(0)
    return BEiT3ForCaptioning(BEiT3(get_beit3_config("beit3-micro"))).eval()


def micro_clip() -> duomo.Pipeline:
    torch.manual_seed(1)
    return duomo.load("ViT-micro")


def test_a_zero_bonus_changes_nothing() -> None:
    model, images = tiny(), torch.randn(2, 3, 32, 32)
    zero = beam_search(model, images, beam=3, max_len=6, rescore=lambda i, c: torch.zeros(len(c)))
    assert zero == beam_search(model, images, beam=3, max_len=6)


def test_the_bonus_picks_among_the_captioners_own_candidates() -> None:
    model, image = tiny(), torch.randn(1, 3, 32, 32)
    first = decode_step(model, encode_image(model, image), torch.tensor([model.sot_id]))
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
    guide = CaptionGuide(clip, weight=0.5)
    img = clip.encode_image(Image.new("RGB", (32, 32), "red"))[0]
    texts = ["a red circle", "a blue square"]
    want = 0.5 * guide.scale * (clip.encode_text(texts) @ img)
    torch.testing.assert_close(guide.bonus(img, texts), want)
    assert guide.bonus(img, [""]).shape == (1,)  # the empty first prefix is scored, not an error
    assert torch.equal(CaptionGuide(clip, weight=0.0).bonus(img, texts), torch.zeros(2))
    with pytest.raises(InputError, match="weight"):
        CaptionGuide(clip, weight=-1.0)


def test_image_embeddings_follow_the_guides_own_preprocessing() -> None:
    clip = micro_clip()
    guide = CaptionGuide(clip)
    vision = clip.config.vision
    cfg = get_beit3_config("beit3-micro")
    image = Image.effect_noise((vision.image_size, vision.image_size), 60).convert("RGB")
    want = clip.encode_image(image)
    same = dataclasses.replace(cfg, image_size=vision.image_size, mean=vision.mean, std=vision.std)
    torch.testing.assert_close(guide.image_embeddings(clip.preprocess(image)[None], same), want)
    # a captioner with another normalisation: its pixels are brought back to the CLIP's
    other = dataclasses.replace(same, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from duomo.data.transforms import image_transform

    pixels = image_transform(other.image_size, other.mean, other.std)(image)[None]
    torch.testing.assert_close(guide.image_embeddings(pixels, other), want, atol=1e-4, rtol=1e-4)


def test_generate_guided_defaults_to_a_beam(monkeypatch: pytest.MonkeyPatch) -> None:
    import duomo.tasks.caption as caption

    seen = {}
    real = caption.beam_search

    def spy(model, images, beam, max_len, rescore=None):  # noqa: ANN001, ANN202
        seen["beam"], seen["rescore"] = beam, rescore
        return real(model, images, beam, max_len, rescore=rescore)

    monkeypatch.setattr(caption, "beam_search", spy)
    out = generate(tiny(), torch.randn(1, 3, 32, 32), max_len=3, guide=CaptionGuide(micro_clip()))
    assert len(out) == 1 and seen["beam"] == GUIDED_BEAM and seen["rescore"] is not None


@pytest.fixture
def clip_folder(tmp_path: Path) -> Path:
    clip = micro_clip()
    return clip.save(tmp_path / "tower-clip")


def test_vision_init_is_recorded_and_guides_by_default(tmp_path: Path, clip_folder: Path) -> None:
    from duomo.models.beit3_init import start_backbone

    backbone = start_backbone("beit3-micro", str(clip_folder))
    assert backbone.vision_init == str(clip_folder.resolve())
    torch.manual_seed(0)
    saved = save_caption(BEiT3ForCaptioning(backbone), tmp_path / "cap")
    model = load_caption(saved)
    assert model.beit3.vision_init == str(clip_folder.resolve())
    image = Image.new("RGB", (32, 32), "blue")
    auto = caption_image(model, image, max_len=4)
    assert auto == caption_image(model, image, max_len=4, guide=str(clip_folder))
    assert caption_image(model, image, max_len=4, guide="none") == caption_image(
        model, image, beam=1, max_len=4, guide="none"
    )


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
    from duomo.tasks.caption import new_caption_model
    from duomo.train.mdm import BEiT3ForMDM

    mdm = BEiT3ForMDM(BEiT3(get_beit3_config("beit3-micro")))
    assert new_caption_model("beit3-micro", mdm, backbone=mdm.beit3).beit3 is mdm.beit3
    with pytest.raises(InputError, match="not two different"):
        new_caption_model("beit3-micro", mdm, backbone=BEiT3(get_beit3_config("beit3-micro")))
