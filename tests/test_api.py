import numpy as np
import pytest
import torch
from PIL import Image

import duomo
from duomo.errors import ImageError, InputError, UnknownModelError


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return duomo.load("ViT-micro", device="cpu")


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype("uint8")).save(path)
    return path


def test_encode_image_accepts_paths_pil_bytes_and_tensors(pipe, image_file):
    pil = Image.open(image_file)
    from_path = pipe.encode_image(str(image_file))
    from_pil = pipe.encode_image(pil)
    from_bytes = pipe.encode_image(image_file.read_bytes())
    from_tensor = pipe.encode_image(pipe.preprocess(pil))
    assert from_path.shape == (1, pipe.embed_dim)
    for other in (from_pil, from_bytes, from_tensor):
        torch.testing.assert_close(from_path, other)
    torch.testing.assert_close(from_path.norm(dim=-1), torch.ones(1))


def test_batching_does_not_change_results(pipe, image_file):
    images = [str(image_file)] * 5
    torch.testing.assert_close(
        pipe.encode_image(images, batch_size=2), pipe.encode_image(images, batch_size=5)
    )
    texts = [f"caption number {i}" for i in range(7)]
    torch.testing.assert_close(
        pipe.encode_text(texts, batch_size=3), pipe.encode_text(texts), atol=1e-6, rtol=1e-5
    )


def test_encode_text_single_string_and_bad_inputs(pipe):
    assert pipe.encode_text("a cat").shape == (1, pipe.embed_dim)
    with pytest.raises(InputError):
        pipe.encode_text([])
    with pytest.raises(InputError, match="strings"):
        pipe.encode_text(["ok", 3])
    with pytest.raises(InputError):
        pipe.encode_image(torch.zeros(4, 5))


def test_corrupt_image_raises_image_error(pipe, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        pipe.encode_image(str(bad))


def test_zero_shot_classify_ranks_all_labels(pipe, image_file):
    ranked = pipe.zero_shot_classify([str(image_file)] * 2, ["cat", "dog", "car"])
    assert len(ranked) == 2 and len(ranked[0]) == 3
    assert sum(p for _, p in ranked[0]) == pytest.approx(1.0, abs=1e-5)
    assert [p for _, p in ranked[0]] == sorted((p for _, p in ranked[0]), reverse=True)
    assert len(pipe.zero_shot_classify(str(image_file), ["cat", "dog", "car"], top_k=1)[0]) == 1
    with pytest.raises(InputError):
        pipe.zero_shot_classify(str(image_file), [])
    with pytest.raises(InputError, match="placeholder"):
        pipe.zero_shot_classify(str(image_file), ["cat"], templates=["no slot"])


def test_zero_shot_matches_manual_computation(pipe, image_file):
    labels = ["red", "blue"]
    probs = pipe.zero_shot_probs(str(image_file), labels, templates=["{}"])
    img = pipe.encode_image(str(image_file))
    txt = pipe.encode_text(labels)
    manual = (pipe.model.logit_scale.exp().clamp(max=100) * img @ txt.T).softmax(-1)
    torch.testing.assert_close(probs, manual, atol=1e-5, rtol=1e-4)


def test_unknown_model_and_bad_options():
    with pytest.raises(UnknownModelError):
        duomo.load("no-such-model")
    with pytest.raises(InputError, match="precision"):
        duomo.load("ViT-micro", precision="int3")
    with pytest.raises(InputError, match="fp16"):
        duomo.load("ViT-micro", device="cpu", precision="fp16")
    with pytest.raises(InputError, match="BEiT-3 config"):
        duomo.load("beit3-micro")


def test_bf16_inference_on_cpu(image_file):
    pipe = duomo.load("ViT-micro", device="cpu", precision="bf16")
    emb = pipe.encode_image(str(image_file))
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_save_and_load_round_trip(pipe, tmp_path, image_file):
    out = pipe.save(tmp_path / "saved")
    again = duomo.load(str(out))
    torch.testing.assert_close(again.encode_image(str(image_file)), pipe.encode_image(str(image_file)))
    torch.testing.assert_close(again.encode_text("a dog"), pipe.encode_text("a dog"))


def test_weights_into_named_config(pipe, tmp_path):
    out = pipe.save(tmp_path / "w")
    again = duomo.load("ViT-micro", weights=str(out))
    torch.testing.assert_close(again.encode_text("x"), pipe.encode_text("x"))
