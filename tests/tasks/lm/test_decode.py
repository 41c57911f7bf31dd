"""Decoding: sampling settings, seeds, repetition penalty, stop strings and streaming."""

import pytest
import torch

from duomo.errors import InputError
from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM
from duomo.tasks.lm.decode import Completion, DecodeSettings, TextStream, complete, decode_stream, pick


class CharTokenizer:
    """ids are characters: enough to test text streaming."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def tiny() -> CausalLM:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=26, width=32, layers=2, heads=4, kv_heads=2, mlp_width=48, max_positions=64)
    return CausalLM(cfg).eval()


def test_greedy_is_argmax_and_penalty_follows_transformers():
    logits = torch.tensor([1.0, 3.0, -2.0, 2.9])
    assert pick(logits, [], DecodeSettings(), None) == 1
    # transformers: positive scores divided, negative multiplied by the penalty
    assert pick(logits, [1], DecodeSettings(repetition_penalty=2.0), None) == 3


def test_sampling_is_seeded_and_top_k_top_p_restrict():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0, 0.5])
    draws = [
        pick(
            logits,
            [],
            DecodeSettings(temperature=1.0, top_k=2, seed=3),
            DecodeSettings(temperature=1.0, seed=3).generator(),
        )
        for _ in range(5)
    ]
    assert set(draws) <= {1, 2}
    gen = DecodeSettings(temperature=1.0, top_p=0.4, seed=0).generator()
    assert {pick(logits, [], DecodeSettings(temperature=1.0, top_p=0.4), gen) for _ in range(20)} == {1}
    model = tiny()
    runs = [
        complete(model, None, [1, 2, 3], DecodeSettings(max_tokens=8, temperature=1.0, seed=7)).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_stop_strings_cut_the_text_and_are_never_streamed():
    stream = TextStream(CharTokenizer(), ("cd",))
    pieces = [stream.push(t) for t in [0, 1, 2]]  # a b c: "c" may start "cd", so it waits
    assert "".join(pieces) == "ab"
    assert stream.push(3) == "" and stream.stopped
    assert stream.finish() == ""


def test_streamed_pieces_add_up_to_the_completion():
    model = tiny()
    items = list(decode_stream(model, CharTokenizer(), [1, 2], DecodeSettings(max_tokens=10)))
    *pieces, done = items
    assert isinstance(done, Completion) and done.finish_reason == "length"
    assert "".join(pieces) == done.text and len(done.tokens) == 10


def test_end_ids_stop_with_reason_stop():
    model = tiny()
    first = complete(model, None, [1, 2], DecodeSettings(max_tokens=1)).tokens[0]
    done = complete(model, None, [1, 2], DecodeSettings(max_tokens=10), end_ids=(first,))
    assert done.tokens == [] and done.finish_reason == "stop"


@pytest.mark.parametrize(
    "bad",
    [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}],
)
def test_bad_settings_are_one_clear_error(bad):
    with pytest.raises(InputError):
        DecodeSettings(**bad)


def test_prompts_longer_than_the_context_are_refused():
    with pytest.raises(InputError, match="at most 64"):
        complete(tiny(), None, list(range(26)) * 3, DecodeSettings())
    with pytest.raises(InputError, match="empty"):
        complete(tiny(), None, [], DecodeSettings())
