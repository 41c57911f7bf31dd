"""BEiT-3's heads: VQA, retrieval, image classification (unilm's names), masked data modelling, captioning.

Each head holds the backbone as `beit3` and calls its one forward (`BEiT3.forward`); losses live in
`duomo.train.objectives.beit3`, decoding and evaluation in `duomo.tasks.beit3`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from duomo.errors import InputError
from duomo.models.beit3.backbone import BEiT3
from duomo.models.beit3.multiway import KVCache


class Pooler(nn.Module):
    """First token -> LayerNorm -> Linear -> tanh (unilm's pooler for VQA)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(x[:, 0])))


class BEiT3ForVQA(nn.Module):
    """VQA as classification over an answer vocabulary, from the fused [image ; question] sequence.

    Parameter names are unilm's BEiT3ForVisualQuestionAnswering's (`pooler.*`, `head.0/1/3.*`), so its
    fine-tuned checkpoints load once the `beit3.*` backbone names are converted. Train with binary
    cross-entropy on soft answer scores (unilm scales the mean loss by the number of answers).
    """

    def __init__(self, backbone: BEiT3, num_answers: int = 3129) -> None:
        super().__init__()
        dim = backbone.cfg.width
        self.beit3 = backbone
        self.pooler = Pooler(dim)
        self.head = nn.Sequential(
            nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2), nn.GELU(), nn.Linear(dim * 2, num_answers)
        )
        for module in [*self.pooler.modules(), *self.head.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, images: torch.Tensor, question: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images [B, C, H, W], question ids [B, T] (padding_mask True at padding) -> answer logits [B, A]."""
        x = self.beit3(images=images, text=question, text_padding_mask=padding_mask)
        return self.head(self.pooler(x))


class BEiT3ForRetrieval(nn.Module):
    """Dual encoder on one backbone (unilm's BEiT3ForRetrieval, the `-itc` checkpoints): first-token heads."""

    def __init__(self, backbone: BEiT3) -> None:
        super().__init__()
        dim = backbone.cfg.width
        self.beit3 = backbone
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for head in (self.vision_head, self.language_head):
            nn.init.trunc_normal_(head.weight, std=0.02, a=-0.02, b=0.02)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images [B, C, H, W] -> embeddings [B, width]."""
        x = self.vision_head(self.beit3(images=images)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Token ids [B, T] (padding_mask True at padding) -> embeddings [B, width]."""
        x = self.language_head(self.beit3(text=tokens, text_padding_mask=padding_mask)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x


class BEiT3ForImageClassification(nn.Module):
    """Image classification on the vision-only forward (unilm's BEiT3ForImageClassification): the mean of the
    patch tokens (class token left out) -> LayerNorm `fc_norm` -> Linear `head`; the head starts 1000x
    smaller than its std-0.02 init (unilm's init_scale 0.001)."""

    def __init__(self, backbone: BEiT3, num_classes: int) -> None:
        super().__init__()
        dim = backbone.cfg.width
        self.beit3 = backbone
        self.fc_norm = nn.LayerNorm(dim)  # unilm's default norm_layer: eps 1e-5
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.02, b=0.02)
        with torch.no_grad():
            self.head.weight.mul_(0.001)
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> class logits [B, num_classes]."""
        x = self.beit3(images=images)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


class VQAModel(BEiT3ForVQA):
    """`BEiT3ForVQA` that knows its answer vocabulary and loss (same parameter names as unilm's VQA model)."""

    def __init__(self, backbone: BEiT3, answers: list[str], loss: str = "bce") -> None:
        if not answers:
            raise InputError("a VQA model needs at least one answer in its vocabulary")
        super().__init__(backbone, num_answers=len(answers))
        self.answers = list(answers)
        self.loss = loss  # how it was trained: scores are sigmoids ("bce") or a softmax ("ce")
        # unilm initialises the pooler and head with std-0.02 weights, made for a pretrained backbone and a
        # 20x head learning rate; with it a backbone trained from scratch never gets a signal (a colour probe
        # through the pooler stayed at ln 8 for 150 steps, vs 1.2 with PyTorch's default init), so the
        # head starts from PyTorch's default init here. Parameter names are unchanged.
        for module in [*self.pooler.modules(), *self.head.modules()]:
            if isinstance(module, nn.Linear):
                module.reset_parameters()


class ClassifyModel(BEiT3ForImageClassification):
    """`BEiT3ForImageClassification` that knows its class names and what they label."""

    def __init__(self, backbone: BEiT3, classes: list[str], label: str = "class") -> None:
        if len(classes) < 2:
            raise InputError(f"a classifier needs at least 2 classes, got {len(classes)}")
        super().__init__(backbone, len(classes))
        self.label, self.classes = label, list(classes)


class MaskedLMHead(nn.Module):
    """Dense -> GELU -> LayerNorm -> vocabulary logits; the output matrix is the token embedding if tied."""

    def __init__(self, backbone: BEiT3, tie: bool = True) -> None:
        super().__init__()
        dim, vocab = backbone.cfg.width, backbone.cfg.vocab_size
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=backbone.cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.tied = tie
        # a tied head reads the backbone's embedding at call time (no second reference, no shared tensor)
        self.decoder = None if tie else nn.Linear(dim, vocab, bias=False)
        nn.init.trunc_normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)
        if self.decoder is not None:
            nn.init.trunc_normal_(self.decoder.weight, std=0.02)

    def forward(
        self, h: torch.Tensor, embedding: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states [..., width] -> logits [..., vocab]; `embedding` is the backbone's token table.

        `rows`: score only these token ids (a vocabulary shortlist): logits [..., len(rows)].
        """
        h = self.norm(F.gelu(self.dense(h)))
        weight, bias = (embedding if self.decoder is None else self.decoder.weight), self.bias
        if rows is not None:
            weight, bias = weight[rows], bias[rows]
        return F.linear(h, weight, bias)


class TextMaskEmbedding(nn.Module):
    """The learned [MASK] vector that the virtual id `vocab_size` reads (`BEiT3.forward(text_mask_token=)`):
    the CLIP vocabulary has no [MASK] id, and the head never predicts this one."""

    def __init__(self, backbone: BEiT3) -> None:
        super().__init__()
        self.mask_id = backbone.cfg.vocab_size
        self.mask_token = nn.Parameter(torch.empty(1, 1, backbone.cfg.width))
        nn.init.normal_(self.mask_token, std=backbone.cfg.width**-0.5)


class BEiT3ForMDM(nn.Module):
    """Backbone + [MASK] text embedding + MLM head + MIM pixel head: the pretraining model."""

    def __init__(self, backbone: BEiT3, tie_lm_head: bool = True) -> None:
        super().__init__()
        cfg = backbone.cfg
        self.beit3 = backbone
        self.text_mask = TextMaskEmbedding(backbone)
        self.lm_head = MaskedLMHead(backbone, tie=tie_lm_head)
        self.mim_head = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_chans)
        nn.init.trunc_normal_(self.mim_head.weight, std=0.02)
        nn.init.zeros_(self.mim_head.bias)

    def forward(
        self,
        images: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of masked inputs: text `ids` may hold [MASK], `vision_mask` hides patches."""
        return self.beit3(images, ids, padding_mask, None, vision_mask, self.text_mask.mask_token)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of text hidden states."""
        return self.lm_head(h, self.beit3.text_embed.weight)


def caption_attention_mask(num_image: int, num_text: int, device: torch.device | None = None) -> torch.Tensor:
    """[I + T, I + T] boolean (True = may attend): image->image, text->image, text->earlier text."""
    n = num_image + num_text
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:num_image, :num_image] = True
    mask[num_image:, :num_image] = True
    mask[num_image:, num_image:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return mask


class BEiT3ForCaptioning(nn.Module):
    """Backbone + [MASK] text embedding + language-model head (tied to the token embeddings by default).

    Attention (unilm's BEiT3ForCaptioning): image tokens attend to all image tokens and never to text; text
    tokens attend to all image tokens and causally to text. The next token is read at a [MASK] placed after
    the prefix. Because image tokens never see text and text is causal, decoding caches keys/values
    (`start_decoding`, `next_token_logits`): each step feeds the last token (kept in the cache) and a [MASK]
    (read, then dropped), O(1) new tokens per step; cached == uncached is tested.

    `vocab`: an optional shortlist of the token ids captions may use (e.g. every id of the training captions).
    The head then scores only those: with the 49,408-id CLIP vocabulary and ~60 ids in shapes captions, a
    training step's head costs ~1/800 and nothing outside the shortlist can be generated.
    `sot_id`, `eot_id`: the start/end ids of the backbone's tokenizer (`duomo.data.tokenizers`).
    """

    def __init__(
        self,
        backbone: BEiT3,
        sot_id: int,
        eot_id: int,
        tie_lm_head: bool = True,
        vocab: list[int] | None = None,
    ):
        super().__init__()
        self.beit3 = backbone
        self.text_mask = TextMaskEmbedding(backbone)
        self.lm_head = MaskedLMHead(backbone, tie=tie_lm_head)
        self.sot_id, self.eot_id = sot_id, eot_id
        self.register_buffer("vocab_ids", None, persistent=False)
        self.register_buffer("vocab_index", None, persistent=False)
        if vocab is not None:
            self.set_vocabulary(vocab)

    @property
    def vocab(self) -> list[int] | None:
        """The shortlisted token ids, or None when the head scores the whole vocabulary."""
        return None if self.vocab_ids is None else self.vocab_ids.tolist()

    def set_vocabulary(self, vocab: list[int]) -> None:
        """Restrict the head to these token ids (the end id is always added)."""
        size = self.beit3.cfg.vocab_size
        ids = sorted({int(i) for i in vocab} | {self.eot_id})
        if ids[0] < 0 or ids[-1] >= size:
            raise InputError(f"caption vocabulary ids must lie in [0, {size}), got {ids[0]}..{ids[-1]}")
        self.vocab_ids = torch.tensor(ids, dtype=torch.long)
        index = torch.full((size,), -1, dtype=torch.long)
        index[self.vocab_ids] = torch.arange(len(ids))
        self.vocab_index = index

    @classmethod
    def from_mdm(
        cls, mdm: BEiT3ForMDM, sot_id: int, eot_id: int, vocab: list[int] | None = None
    ) -> BEiT3ForCaptioning:
        """Start from a pretrained masked-data-modelling model: backbone, [MASK] embedding and LM head."""
        model = cls(mdm.beit3, sot_id, eot_id, tie_lm_head=mdm.lm_head.tied, vocab=vocab)
        model.text_mask, model.lm_head = mdm.text_mask, mdm.lm_head
        return model

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden text states -> logits over the shortlist (or the whole vocabulary without one)."""
        return self.lm_head(h, self.beit3.text_embed.weight, self.vocab_ids)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> [..., vocab_size] logits, -inf outside the shortlist (decoding reads token ids)."""
        if self.vocab_ids is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.beit3.cfg.vocab_size), float("-inf"))
        out[..., self.vocab_ids] = logits
        return out

    def target_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> their index among the head's outputs (the ids themselves without a shortlist)."""
        if self.vocab_index is None:
            return ids
        index = self.vocab_index[ids]
        if bool((index < 0).any()):
            bad = sorted(set(ids[index < 0].tolist()))[:5]
            raise InputError(f"caption token ids {bad} are outside the model's caption vocabulary")
        return index

    @property
    def mask_id(self) -> int:
        """The virtual [MASK] id (one past the vocabulary)."""
        return self.text_mask.mask_id

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W], text ids [B, T] (may hold [MASK]) -> head logits at text positions."""
        split = self.beit3.num_image_tokens
        mask = caption_attention_mask(split, ids.shape[1], ids.device)
        h = self.beit3(images, ids, attn_mask=mask, text_mask_token=self.text_mask.mask_token)
        return self.head(h[:, split:])

    # --- cached decoding ---------------------------------------------------------------------------------
    def start_decoding(self, images: torch.Tensor) -> KVCache:
        """Run the image tokens through every layer once; their keys/values start the cache."""
        cache = self.beit3.new_cache()
        self.beit3(images=images, cache=cache, pair=True)
        return cache

    def next_token_logits(self, cache: KVCache, last: torch.Tensor) -> torch.Tensor:
        """Feed [last token, MASK] after the cached text; cache `last`; the MASK's logits [B, vocab_size]."""
        ids = torch.stack([last, torch.full_like(last, self.mask_id)], dim=1)
        n = cache.image_tokens + cache.text_tokens
        # the new token sees everything cached and itself; the MASK also sees the new token
        mask = torch.ones(2, n + 2, dtype=torch.bool, device=ids.device)
        mask[0, -1] = False
        cache.set_keep(1)  # the real token's keys/values; the MASK's are dropped
        h = self.beit3(text=ids, attn_mask=mask, text_mask_token=self.text_mask.mask_token, cache=cache)
        cache.set_keep(None)
        return self.full_logits(self.head(h[:, 1]))

    def next_token_logits_uncached(self, images: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """The same logits by a full forward over the image and `prefix` [B, T] (starting with sot)."""
        mask = torch.full((prefix.shape[0], 1), self.mask_id, dtype=prefix.dtype, device=prefix.device)
        return self.full_logits(self(images, torch.cat([prefix, mask], dim=1))[:, -1])
