"""The causal LM: cached decoding equals the full forward, left padding changes nothing, configs checked."""

import pytest
import torch

from duomo.errors import ConfigError
from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM, LMCache


def tiny(layout: str, **kw) -> CausalLM:
    torch.manual_seed(0)
    fields = dict(layout=layout, vocab_size=97, width=32, layers=2, heads=4, mlp_width=48, max_positions=64)
    if layout == "llama":
        fields["kv_heads"] = 2
    return CausalLM(LMConfig(**(fields | kw))).eval()


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_cached_decoding_equals_full_forward(layout):
    model = tiny(layout)
    ids = torch.randint(0, 97, (3, 11))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :5], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(5, 11)
        ]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert cache.length == 11 and cache.seen.tolist() == [11, 11, 11]


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_left_padding_changes_nothing(layout):
    model = tiny(layout)
    short, long = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    with torch.no_grad():
        cache = model.new_cache()
        out = model(batch, mask=mask, cache=cache)
        step = model(torch.tensor([[5], [6]]), cache=cache)
        alone = model(torch.cat([short, torch.tensor([[5]])], 1))
    assert torch.allclose(out[0, 3:], alone[0, :4], atol=1e-5)
    assert torch.allclose(step[0, 0], alone[0, 4], atol=1e-5)
    assert not torch.isnan(out).any()


def test_cache_rows_leave_and_join():
    model = tiny("llama")
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 3))
    with torch.no_grad():
        ca, cb = model.new_cache(), model.new_cache()
        model(a, cache=ca)
        model(b, cache=cb)
        both = LMCache.concat([ca, cb])  # b joins a's batch, padded on the left
        step = model(torch.tensor([[1], [2]]), cache=both)
        alone_b = model(torch.cat([b, torch.tensor([[2]])], 1))
        only_b = both.select(torch.tensor([1]))
        nxt = model(torch.tensor([[3]]), cache=only_b)
        ref = model(torch.cat([b, torch.tensor([[2, 3]])], 1))
    assert torch.allclose(step[1, 0], alone_b[0, -1], atol=1e-5)
    assert torch.allclose(nxt[0, 0], ref[0, -1], atol=1e-5)


def test_reference_attention_equals_fused():
    model = tiny("llama")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        fast = model(ids)
        for block in model.blocks:
            block.attn.fast = False
        slow = model(ids)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_tied_head_shares_the_embedding():
    model = tiny("llama", tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert tiny("llama", tie_embeddings=False).lm_head.weight is not tiny("llama").embed_tokens.weight


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layout": "mamba"}, "lm.layout"),
        ({"heads": 4, "kv_heads": 3, "width": 32}, "multiple of lm.kv_heads"),
        ({"widht": 32}, "did you mean 'width'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "not built"),
        ({"layers": 0}, "lm.layers"),
    ],
)
def test_bad_configs_are_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        LMConfig.from_dict(fields)
