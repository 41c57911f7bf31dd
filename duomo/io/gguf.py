"""GGUF files (llama.cpp's format) read into duomo's `CausalLM`: metadata -> config and tokenizer, tensors
dequantised to float32 by the `gguf` package, llama.cpp's rotary row order of q/k undone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duomo.data.tokenizers.lm import LMTokenizer, tokenizer_from_gguf
from duomo.errors import CheckpointError
from duomo.io.lm import build_lm
from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM

ARCHITECTURES = ("llama", "qwen2")
_BLOCK = {
    "attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip


def _reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - the `lm` extra installs it
        raise CheckpointError("reading GGUF files needs the gguf package: pip install gguf") from exc
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {path}")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError on damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable GGUF file ({reason}); it may be truncated") from exc


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field as a Python value (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, value in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = value.contents()
        except Exception as exc:
            raise CheckpointError(f"GGUF metadata field {key!r} is unreadable ({exc})") from exc
    return meta


def config_from_gguf(meta: dict[str, Any], tied: bool) -> LMConfig:
    """duomo's config from GGUF metadata (`{arch}.block_count`, ...)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not built; duomo reads {list(ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF file lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    width = int(get("embedding_length"))
    return LMConfig(
        layout="llama",
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(tokens))),
        width=width,
        layers=int(get("block_count")),
        heads=heads,
        kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", 0)) or 0,
        mlp_width=int(get("feed_forward_length")),
        max_positions=int(get("context_length", 2048)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        attention_bias=arch == "qwen2",
        tie_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of q/k rows (it pairs rotary halves); Hugging Face rotates halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor(t: Any) -> torch.Tensor:
    """One GGUF tensor as float32, in PyTorch's [out, in] order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        data = np.asarray(t.data)
        if t.tensor_type == GGMLQuantizationType.BF16:
            data = dequantize(data, t.tensor_type)
    else:
        data = dequantize(t.data, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return torch.from_numpy(np.array(data, dtype=np.float32, copy=True).reshape(shape))


def read_gguf(path: str | os.PathLike) -> tuple[CausalLM, LMTokenizer]:
    """A GGUF causal LM as (duomo CausalLM in float32, its tokenizer)."""
    path = Path(path)
    reader = _reader(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_from_gguf(meta, tied="output.weight" not in names)
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            w = _tensor(t)
        except (ValueError, NotImplementedError) as exc:
            raise CheckpointError(
                f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantised ({exc})"
            ) from exc
        name = t.name
        if name == "token_embd.weight":
            sd["embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            sd["norm.weight"] = w
        elif name == "output.weight":
            sd["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, i, module, param = name.split(".", 3)
            if module not in _BLOCK:
                raise CheckpointError(f"{path}: unexpected tensor {name}")
            if (
                meta["general.architecture"] == "llama"
                and module in ("attn_q", "attn_k")
                and param == "weight"
            ):
                w = _unpermute(w, cfg.heads if module == "attn_q" else cfg.num_kv_heads)
            sd[f"blocks.{i}.{_BLOCK[module]}.{param}"] = w
        elif name.startswith("rope_freqs"):
            continue  # llama 3 stores its scaled frequencies; duomo computes them from the config
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name}")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return build_lm(cfg, sd), tokenizer_from_gguf(meta)
