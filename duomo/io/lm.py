"""Causal LMs in transformers' layouts: `LlamaForCausalLM`, `Qwen2ForCausalLM` (config.json, safetensors,
tokenizer.json) and `GPT2LMHeadModel` directories, read into duomo's `CausalLM` and written back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from duomo.data.tokenizers.lm import LMTokenizer, read_tokenizer_dir
from duomo.errors import CheckpointError
from duomo.io.checkpoint import load_into
from duomo.io.files import load_weights, read_json, save_safetensors, write_json
from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM
from duomo.nn.init import skip_init

LLAMA_TYPES = ("llama", "qwen2", "mistral")
MODEL_TYPES = (*LLAMA_TYPES, "gpt2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def is_lm_dir(path: str | os.PathLike) -> bool:
    """A transformers directory whose config.json names a causal LM duomo reads."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in MODEL_TYPES
    except (OSError, json.JSONDecodeError):
        return False


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling or None


def config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """duomo's config from a transformers config.json."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"GPT-2 activation {act!r} is not built (gelu_new only)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise CheckpointError("GPT-2 variants with per-layer attention scaling are not built")
        width = hf["n_embd"]
        return LMConfig(
            layout="gpt2",
            vocab_size=hf["vocab_size"],
            width=width,
            layers=hf["n_layer"],
            heads=hf["n_head"],
            mlp_width=hf.get("n_inner") or 4 * width,
            max_positions=hf["n_positions"],
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
    if kind not in LLAMA_TYPES:
        raise CheckpointError(
            f"model_type {kind!r} is not a causal LM duomo reads; known: {list(MODEL_TYPES)}"
        )
    if hf.get("use_sliding_window") or (kind == "mistral" and hf.get("sliding_window")):
        raise CheckpointError(f"{kind}: sliding-window attention is not built")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{kind}: activation {act!r} is not built (silu only)")
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return LMConfig(
        layout="llama",
        vocab_size=hf["vocab_size"],
        width=hf["hidden_size"],
        layers=hf["num_hidden_layers"],
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0,
        mlp_width=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def config_to_hf(cfg: LMConfig, model_type: str) -> dict[str, Any]:
    """A transformers config.json for `cfg` (`model_type`: llama, qwen2 or gpt2)."""
    common = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    if model_type == "gpt2":
        return {
            **common,
            "n_embd": cfg.width, "n_layer": cfg.layers, "n_head": cfg.heads, "n_inner": cfg.mlp_width,
            "n_positions": cfg.max_positions, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
        }  # fmt: skip
    out = {
        **common,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "intermediate_size": cfg.mlp_width,
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "hidden_act": "silu",
    }
    if model_type == "llama":
        out["attention_bias"] = cfg.attention_bias
    return out


def _block_names(layout: str) -> dict[str, str]:
    """duomo block parameter -> transformers name (Llama layout) within a layer."""
    if layout != "llama":
        return {}
    names = {f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"}
    names |= {f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    names |= {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    return names


def state_from_hf(sd: dict[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    """transformers' weight names -> duomo's (GPT-2's fused, transposed Conv1D weights split)."""
    out: dict[str, torch.Tensor] = {}
    if cfg.layout == "gpt2":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        take = {"wte.weight": "embed_tokens.weight", "wpe.weight": "embed_positions.weight",
                "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}  # fmt: skip
        for i in range(cfg.layers):
            h, b = f"h.{i}.", f"blocks.{i}."
            for p in ("weight", "bias"):
                take[f"{h}ln_1.{p}"], take[f"{h}ln_2.{p}"] = f"{b}attn_norm.{p}", f"{b}mlp_norm.{p}"
            for src, dst in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                             ("mlp.c_proj", "mlp.down_proj")):  # fmt: skip
                if f"{h}{src}.weight" in sd:
                    out[f"{b}{dst}.weight"] = sd.pop(f"{h}{src}.weight").t()
                    out[f"{b}{dst}.bias"] = sd.pop(f"{h}{src}.bias")
            if f"{h}attn.c_attn.weight" in sd:
                w, bias = sd.pop(f"{h}attn.c_attn.weight").t(), sd.pop(f"{h}attn.c_attn.bias")
                for p, wp, bp in zip("qkv", w.chunk(3), bias.chunk(3), strict=True):
                    out[f"{b}attn.{p}_proj.weight"], out[f"{b}attn.{p}_proj.bias"] = wp, bp
        for k, v in sd.items():
            out[take.get(k, k)] = v
    else:
        inverse = {v: k for k, v in _block_names("llama").items()}
        for k, v in sd.items():
            if k.startswith("model.layers."):
                i, rest = k.removeprefix("model.layers.").split(".", 1)
                module, _, param = rest.rpartition(".")
                out[f"blocks.{i}.{inverse.get(module, module)}.{param}"] = v
            elif k == "model.embed_tokens.weight":
                out["embed_tokens.weight"] = v
            elif k == "model.norm.weight":
                out["norm.weight"] = v
            else:
                out[k] = v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        if "embed_tokens.weight" in out:
            out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def state_to_hf(model: CausalLM, model_type: str) -> dict[str, torch.Tensor]:
    """duomo's weights under transformers' names (for `model_type`), tied head left out when tied."""
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    out: dict[str, torch.Tensor] = {}
    if model_type == "gpt2":
        if cfg.layout != "gpt2":
            raise CheckpointError("only a gpt2-layout model exports as GPT-2")
        for i in range(cfg.layers):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            qkv = [sd.pop(f"{b}attn.{p}_proj.weight") for p in "qkv"]
            out[f"{h}attn.c_attn.weight"] = torch.cat(qkv).t()
            out[f"{h}attn.c_attn.bias"] = torch.cat([sd.pop(f"{b}attn.{p}_proj.bias") for p in "qkv"])
            for dst, src in (
                ("attn.c_proj", "attn.o_proj"),
                ("mlp.c_fc", "mlp.up_proj"),
                ("mlp.c_proj", "mlp.down_proj"),
            ):
                out[f"{h}{dst}.weight"] = sd.pop(f"{b}{src}.weight").t()
                out[f"{h}{dst}.bias"] = sd.pop(f"{b}{src}.bias")
            for p in ("weight", "bias"):
                out[f"{h}ln_1.{p}"], out[f"{h}ln_2.{p}"] = (
                    sd.pop(f"{b}attn_norm.{p}"),
                    sd.pop(f"{b}mlp_norm.{p}"),
                )
        rename = {"embed_tokens.weight": "transformer.wte.weight",
                  "embed_positions.weight": "transformer.wpe.weight",
                  "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias"}  # fmt: skip
        out |= {rename.get(k, k): v for k, v in sd.items()}
        return out
    if cfg.layout != "llama":
        raise CheckpointError(f"only a llama-layout model exports as {model_type}")
    names = _block_names("llama")
    for k, v in sd.items():
        if k.startswith("blocks."):
            i, rest = k.removeprefix("blocks.").split(".", 1)
            module, _, param = rest.rpartition(".")
            out[f"model.layers.{i}.{names.get(module, module)}.{param}"] = v
        elif k in ("embed_tokens.weight", "norm.weight"):
            out[f"model.{k}"] = v
        else:
            out[k] = v
    return out


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json), or pytorch_model.bin."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        sd: dict[str, torch.Tensor] = {}
        for name in files:
            shard = (directory / name).resolve()
            if directory.resolve() not in shard.parents:
                raise CheckpointError(f"{index} names a shard outside its directory: {name!r}")
            sd.update(load_weights(shard))
        return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return load_weights(directory / name)
    raise CheckpointError(f"{directory} has no model.safetensors (or pytorch_model.bin)")


def build_lm(cfg: LMConfig, sd: dict[str, torch.Tensor]) -> CausalLM:
    """A CausalLM holding `sd` (duomo names), built without random initialisation, in eval mode."""
    with skip_init():
        model = CausalLM(cfg)
    load_into(model, sd)
    return model.eval()


def read_hf_lm(directory: str | os.PathLike) -> tuple[CausalLM, LMTokenizer | None]:
    """A transformers causal-LM directory as (duomo CausalLM, its tokenizer or None)."""
    directory = Path(directory)
    cfg = config_from_hf(read_json(directory / "config.json"))
    model = build_lm(cfg, state_from_hf(_read_weights(directory), cfg))
    tokenizer = read_tokenizer_dir(directory) if (directory / "tokenizer.json").is_file() else None
    return model, tokenizer


def export_hf_lm(
    model: CausalLM,
    directory: str | os.PathLike,
    model_type: str | None = None,
    tokenizer: LMTokenizer | None = None,
) -> Path:
    """Write `model` (and its tokenizer) as a transformers directory that `from_pretrained` reads."""
    directory = Path(directory)
    model_type = model_type or ("gpt2" if model.config.layout == "gpt2" else "llama")
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"cannot export a causal LM as {model_type!r}; choose one of {sorted(_ARCHITECTURES)}"
        )
    if model_type == "qwen2" and not model.config.attention_bias:
        raise CheckpointError("Qwen2 has q/k/v biases; this model has none: export it as llama")
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_to_hf(model, model_type), directory / "model.safetensors")
    write_json(config_to_hf(model.config, model_type), directory / "config.json")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
