"""Conversations: LLaVA JSON read strictly, labels on the assistant's tokens only, placeholders expanded."""

import json

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from duomo.data.conversations import read_conversations
from duomo.data.pairs import SkipStats
from duomo.data.tokenizers.lm import LMTokenizer
from duomo.errors import InputError
from duomo.tasks.lm.chat_data import IGNORE, encode_conversation

TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
WORDS = ["<s>", "</s>", "user", "assistant", "system", "hi", "red", "what", "colour", "?", "be", "brief", "x"]


def tokenizer() -> LMTokenizer:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="x"))
    backend.pre_tokenizer = WhitespaceSplit()
    return LMTokenizer(backend, bos_token="<s>", eos_token="</s>", chat_template=TEMPLATE)


def test_labels_cover_assistant_replies_and_their_end_marker_only():
    tok = tokenizer()
    messages = [
        {"role": "user", "content": "<image> what colour ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hi"},
    ]
    ids, labels = encode_conversation(tok, messages, image_token_id=99, tokens_per_image=3, system="be brief")
    assert ids.count(99) == 3
    learned = [tok.backend.id_to_token(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert learned == ["red", "</s>", "hi", "</s>"]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))
    assert ids[:3] == [tok.backend.token_to_id(w) for w in ["<s>", "system", "be"]]


def test_generation_prompt_ends_with_the_assistant_header():
    ids, labels = encode_conversation(
        tokenizer(), [{"role": "user", "content": "hi"}], 99, 1, generation_prompt=True
    )
    assert [tokenizer().backend.id_to_token(i) for i in ids[-2:]] == ["<s>", "assistant"]
    assert set(labels) == {IGNORE}


def test_llava_json_is_read_and_bad_records_are_skipped(tmp_path):
    def row(image, *turns):
        record = {"conversations": [{"from": who, "value": text} for who, text in turns]}
        return record | ({"image": image} if image is not None else {})

    rows = [
        row("a.png", ("human", "<image>\nwhat?"), ("gpt", "red")),
        row(["a.png", "b.png"], ("human", "<image> and <image>"), ("gpt", "two")),
        row(None, ("human", "hello"), ("gpt", "hi")),
        row("a.png", ("human", "no placeholder"), ("gpt", "x")),
        row("a.png", ("robot", "<image>"), ("gpt", "x")),
        row(None, ("human", "only a question")),
    ]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(rows))
    stats = SkipStats("test")
    convs = read_conversations(path, stats)
    assert [len(c.images) for c in convs] == [1, 2, 0]
    assert convs[0].images[0] == str(tmp_path / "a.png")
    assert convs[0].turns == (("user", "<image>\nwhat?"), ("assistant", "red"))
    assert stats.count == 3
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_conversations(tmp_path / "bad.json")
    with pytest.raises(InputError, match="no such conversation file"):
        read_conversations(tmp_path / "missing.json")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:2]))
    assert len(read_conversations(jsonl)) == 2
