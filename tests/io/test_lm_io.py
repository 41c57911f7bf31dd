"""transformers causal-LM directories (Llama, Qwen2, GPT-2): logits equal within 1e-4, greedy decoding
token-identical for 32 tokens, export back read by transformers with the same logits."""

import json

import pytest
import torch

from duomo.errors import CheckpointError
from duomo.io.lm import export_hf_lm, is_lm_dir, read_hf_lm
from duomo.tasks.lm.decode import DecodeSettings, complete

transformers = pytest.importorskip("transformers")

VOCAB = 128


def hf_model(kind: str, **extra):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=96, **extra
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rms_norm_eps=1e-6,
    )
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, **extra)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    cfg = transformers.LlamaConfig(**common, **extra)
    return transformers.LlamaForCausalLM(cfg).eval()


def randomise(model):
    """transformers initialises norms to 1 and biases to 0: random values make the parity test see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(0.5 if "norm" in name or "ln" in name else 0.0, 0.2)
    return model


CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("qwen2", {}),
    ("gpt2", {}),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "extra"), CASES, ids=lambda c: c if isinstance(c, str) else str(sorted(c)))
def test_logits_and_greedy_decoding_match_transformers(tmp_path, kind, extra):
    ref = randomise(hf_model(kind, **extra))
    ref.save_pretrained(tmp_path)
    assert is_lm_dir(tmp_path)
    model, _ = read_hf_lm(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert (got - want).abs().max() < 1e-4
    prompt = ids[0].tolist()
    with torch.no_grad():
        hf_tokens = ref.generate(
            ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, 13:].tolist()
    ours = complete(model, None, prompt, DecodeSettings(max_tokens=32)).tokens
    assert ours == hf_tokens


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_export_back_reads_in_transformers(tmp_path, kind):
    ref = randomise(hf_model(kind))
    ref.save_pretrained(tmp_path / "src")
    model, _ = read_hf_lm(tmp_path / "src")
    export_hf_lm(model, tmp_path / "out", model_type=kind)
    back = getattr(transformers, type(ref).__name__).from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max() < 1e-5


def test_unknown_model_type_and_missing_weights_are_clear(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert not is_lm_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a causal LM duomo reads"):
        read_hf_lm(tmp_path)
    hf_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_hf_lm(tmp_path)


def test_a_truncated_weight_file_is_one_clear_error(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_hf_lm(tmp_path)
