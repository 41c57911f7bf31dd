"""Chat folders: only the trained tensors are saved, the named parts are assembled again, and the model
answers exactly as before saving; broken folders are one clear error."""

import json
import sys
from pathlib import Path

import pytest
import torch

import duomo
from duomo.api.chat import ChatPipeline
from duomo.errors import CheckpointError, InputError, UnknownModelError
from duomo.io.chat import load_chat, read_lm
from duomo.io.files import load_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks" / "lm"))
from chat_helpers import tiny_chat_dir  # noqa: E402


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return tiny_chat_dir(tmp_path_factory.mktemp("chat") / "tiny-chat")


def test_only_trained_tensors_are_saved_and_reload_equal(chat_dir):
    saved = load_weights(chat_dir / "model.safetensors")
    assert all(k.startswith("projector.") or k.endswith((".lora_a", ".lora_b")) for k in saved)
    model, tok, meta = load_chat(chat_dir)
    assert meta["lm_from"].endswith("tiny-chat-lm")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_load_gives_a_chat_pipeline_that_answers(chat_dir):
    bot = duomo.load(str(chat_dir))
    assert isinstance(bot, ChatPipeline) and bot.vision
    image = torch.rand(3, 64, 64)
    from torchvision.transforms.functional import to_pil_image

    pil = to_pil_image(image)
    first = bot.ask(pil, "what colour is it ?", max_tokens=6)
    assert first == bot.ask(pil, "what colour is it ?", max_tokens=6)  # greedy: deterministic
    with pytest.raises(InputError, match="placeholder"):
        bot.chat([{"role": "user", "content": "hi"}], [pil])
    with pytest.raises(InputError, match="unknown role"):
        bot.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(InputError, match="empty"):
        bot.chat([])


def test_a_corrupt_image_is_one_clear_error(chat_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bot = duomo.load(str(chat_dir))
    with pytest.raises(duomo.errors.ImageError):
        bot.ask(str(bad), "what ?")


def test_broken_chat_folders_are_clear(chat_dir, tmp_path):
    meta = json.loads((chat_dir / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((chat_dir / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**meta, "lm_from": "no-such-lm"}))
    with pytest.raises(UnknownModelError, match="unknown language model"):
        load_chat(bad)
    (bad / "config.json").write_text(json.dumps({**meta, "lora": None}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_chat(bad)
    with pytest.raises(UnknownModelError):
        read_lm("nonsense")


def test_image_scoped_adapters_leave_text_to_the_base_model(tmp_path):
    """scope "image": the adapters act at image positions only, so a text-only conversation is answered by
    the base language model exactly, while conversations with an image do use them."""
    from torchvision.transforms.functional import to_pil_image

    from duomo.api.chat import ChatPipeline
    from duomo.io.chat import read_lm

    scoped = duomo.load(str(tiny_chat_dir(tmp_path / "scoped", scope="image")))
    everywhere = duomo.load(str(tiny_chat_dir(tmp_path / "all", scope="all")))
    base_lm, tok = read_lm(scoped.meta["lm_from"])
    base = ChatPipeline(base_lm, tok, scoped.device)
    text = [{"role": "user", "content": "what colour is the star ?"}]
    scoped.system = everywhere.system = None
    base_logits = base.prepare(text)[2]
    assert torch.equal(scoped.prepare(text)[2], base_logits)  # exactly the base model
    assert not torch.allclose(everywhere.prepare(text)[2], base_logits, atol=1e-4)
    image = to_pil_image(torch.rand(3, 64, 64))
    with_image = [{"role": "user", "content": "<image>\nwhat colour is it ?"}]
    ids, _, logits, _ = scoped.prepare(with_image, [image])
    scoped.model.lora_gate = None  # the same weights with the adapters switched off everywhere
    for layer in scoped.model.lm.modules():
        if hasattr(layer, "gate"):
            layer.gate = None
    for layer in scoped.model.lm.modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b.data.zero_()
    _, _, plain, _ = scoped.prepare(with_image, [image])
    assert not torch.allclose(logits, plain)
