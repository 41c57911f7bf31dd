"""Image captioning the BEiT-3 way: one fused sequence, a uni-directional text mask, masked-token training.

Attention (unilm's BEiT3ForCaptioning): image tokens attend to all image tokens and never to text; text
tokens attend to all image tokens and causally to text (themselves and earlier tokens). Training replaces a
share (60%, unilm's `mask_prob`) of the caption tokens, <eot> included, by [MASK] and predicts them with the
language-model head. Decoding appends [MASK] after the prefix and reads the prediction at that position.

Caching (`CaptionCache`): because image tokens never see text, their keys/values in every layer are computed
once per image; because text is causal, each real token's keys/values never change once computed. A decoding
step therefore feeds two tokens, the last chosen token (its keys/values are appended to the cache) and a
[MASK] after it (its prediction is read, its keys/values dropped): O(1) new tokens per step instead of the
whole sequence. `tests/tasks/test_caption.py` checks cached == uncached logits.

Metrics: corpus BLEU-4 (Papineni et al., brevity penalty over the corpus, clipped n-gram counts against all
references, no smoothing) and CIDEr-D (Vedantam et al., coco-caption's `CiderD`: tf-idf n-gram vectors for
n = 1..4 with document frequencies from the references of the evaluated set, candidate counts clipped to the
reference's, a Gaussian length penalty sigma = 6, mean over n and over references, times 10).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duomo.data.shapes import CAPTION_STYLES, COLOURS, SHAPES, ShapesDataset, make_caption
from duomo.errors import InputError
from duomo.models.beit3 import BEiT3, BEiT3Config, create_beit3
from duomo.models.multiway import Multiway, MultiwayBlock
from duomo.tasks.caption_guide import DEFAULT_WEIGHT, GUIDED_BEAM, CaptionGuide, resolve_guide
from duomo.train.mdm import (
    BEiT3ForMDM,
    MaskedLMHead,
    TextMaskEmbedding,
    fused_forward,
    mask_text,
    save_task_folder,
    shapes_pixels,
    train_steps,
)

TASK = "caption"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,:;!?])")
MASK_PROB = 0.6  # unilm's captioning fine-tuning mask probability
MAX_CAPTION = 32  # tokens, with <sot>/<eot>


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

    `vocab`: an optional shortlist of the token ids captions may use (e.g. every id of the training captions,
    `caption_vocabulary`). The head then scores only those: with the 49,408-id CLIP vocabulary and ~60 ids in
    shapes captions, a training step's head costs ~1/800 and nothing outside the shortlist can be generated.
    """

    def __init__(
        self,
        backbone: BEiT3,
        tie_lm_head: bool = True,
        sot_id: int = 49406,
        eot_id: int = 49407,
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
        """Restrict the head to these token ids (<end_of_text> is always added)."""
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
        cls,
        mdm: BEiT3ForMDM,
        vocab: list[int] | None = None,
        sot_id: int = 49406,
        eot_id: int = 49407,
    ) -> BEiT3ForCaptioning:
        """Start from a pretrained masked-data-modelling model: backbone, [MASK] embedding and LM head."""
        model = cls(mdm.beit3, tie_lm_head=mdm.lm_head.tied, sot_id=sot_id, eot_id=eot_id, vocab=vocab)
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
        h = fused_forward(self.beit3, self.text_mask, images, ids, attn_mask=mask)
        return self.head(h[:, split:])


class CaptionObjective:
    """Mask `ratio` of each caption's tokens after <sot> (<eot> included), cross-entropy on masked ones."""

    def __init__(self, ratio: float = MASK_PROB, seed: int = 0) -> None:
        self.ratio = ratio
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", "acc"} of one batch of "pixels", "tokens", "padding_mask"."""
        inner: BEiT3ForCaptioning = getattr(model, "module", model)
        tokens = batch["tokens"]
        ids, chosen = mask_text(
            tokens.cpu(), batch["padding_mask"].cpu(), self.ratio, inner.mask_id, (inner.sot_id,), self.gen
        )
        ids, chosen = ids.to(tokens.device), chosen.to(tokens.device)
        logits = model(batch["pixels"], ids)[chosen]
        target = inner.target_index(tokens[chosen])
        loss = F.cross_entropy(logits.float(), target)
        return {"loss": loss, "acc": (logits.argmax(-1) == target).float().mean()}


# --- incremental decoding -------------------------------------------------------------------------------
def _expert(module: nn.Module, modality: str) -> nn.Module:
    """The copy of a (Multiway) module that tokens of `modality` take inside an image+text sequence."""
    if not isinstance(module, Multiway):
        return module
    if module.vl is not None:  # the paper's top layers: every token of a pair goes to the VL expert
        return module.vl
    return module.vision if modality == "image" else module.text


def _block(
    block: MultiwayBlock,
    x: torch.Tensor,
    modality: str,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One block over new tokens of one modality, attending to cached keys/values first; returns new k/v."""
    attn = block.attn

    def e(m: nn.Module) -> nn.Module:
        return _expert(m, modality)

    h = e(block.norm1)(x) if block.normalize_before else x
    q, k, v = (attn.split_heads(e(p)(h)) for p in (attn.q, attn.k, attn.v))
    keys = k if past is None else torch.cat([past[0], k], dim=2)
    values = v if past is None else torch.cat([past[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    out = out.transpose(1, 2).reshape(x.shape)
    out = e(attn.proj)(e(attn.inner_norm)(out))
    x = x * block.alpha + out
    x = x if block.normalize_before else e(block.norm1)(x)
    h = e(block.norm2)(x) if block.normalize_before else x
    x = x * block.alpha + e(block.mlp)(h)
    x = x if block.normalize_before else e(block.norm2)(x)
    return x, (k, v)


@dataclass
class CaptionCache:
    """Per-layer keys/values [B, heads, L, head_dim] of the image tokens and of the decoded text so far."""

    image: list[tuple[torch.Tensor, torch.Tensor]]
    text: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: int = 0  # text tokens cached

    def select(self, rows: torch.Tensor) -> CaptionCache:
        """The cache of the batch rows `rows` (beam search reorders and repeats rows)."""
        text = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.text]
        return CaptionCache([(k[rows], v[rows]) for k, v in self.image], text, self.length)


@torch.no_grad()
def encode_image(model: BEiT3ForCaptioning, images: torch.Tensor) -> CaptionCache:
    """Run the image tokens through every layer once and keep their keys/values."""
    bb = model.beit3
    x = _expert(bb.embed_norm, "image")(bb.embed_images(images))
    image = []
    for block in bb.encoder.blocks:
        x, kv = _block(block, x, "image", None, None)
        image.append(kv)
    return CaptionCache(image, [None] * len(image), 0)


@torch.no_grad()
def decode_step(model: BEiT3ForCaptioning, cache: CaptionCache, last: torch.Tensor) -> torch.Tensor:
    """Feed [last token, MASK] at text positions (cache.length, +1); cache `last`; MASK logits [B, V]."""
    bb = model.beit3
    ids = torch.stack([last, torch.full_like(last, model.mask_id)], dim=1)
    x = _expert(bb.embed_norm, "text")(model.text_mask(bb, ids, start=cache.length))
    n_img, n_txt = cache.image[0][0].shape[2], cache.length
    # rows: the new token sees everything cached and itself; the MASK also sees the new token
    mask = torch.ones(2, n_img + n_txt + 2, dtype=torch.bool, device=x.device)
    mask[0, -1] = False
    for i, block in enumerate(bb.encoder.blocks):
        img_k, img_v = cache.image[i]
        past_t = cache.text[i]
        past = (
            (img_k, img_v)
            if past_t is None
            else (
                torch.cat([img_k, past_t[0]], dim=2),
                torch.cat([img_v, past_t[1]], dim=2),
            )
        )
        x, (k, v) = _block(block, x, "text", past, mask)
        keep = (k[:, :, :1], v[:, :, :1])  # the real token's keys/values; the MASK's are dropped
        cache.text[i] = (
            keep
            if past_t is None
            else (
                torch.cat([past_t[0], keep[0]], dim=2),
                torch.cat([past_t[1], keep[1]], dim=2),
            )
        )
    cache.length += 1
    h = _expert(bb.encoder.norm, "text")(x[:, 1])
    return model.full_logits(model.head(h))


@torch.no_grad()
def next_logits_uncached(
    model: BEiT3ForCaptioning, images: torch.Tensor, prefix: torch.Tensor
) -> torch.Tensor:
    """Logits of the next token after `prefix` [B, T] (starting with <sot>) by a full forward: [B, V]."""
    mask = torch.full((prefix.shape[0], 1), model.mask_id, dtype=prefix.dtype, device=prefix.device)
    return model.full_logits(model(images, torch.cat([prefix, mask], dim=1))[:, -1])


def _max_steps(model: BEiT3ForCaptioning, max_len: int) -> int:
    cfg = model.beit3.cfg
    return max(1, min(max_len, cfg.max_text_positions - cfg.pos_offset - 1))


@torch.no_grad()
def greedy_decode(
    model: BEiT3ForCaptioning, images: torch.Tensor, max_len: int = MAX_CAPTION, use_cache: bool = True
) -> list[list[int]]:
    """Greedy captions (token ids without <sot>/<eot>) of images [B, C, H, W]; stops at <eot> or max_len."""
    model.eval()
    b = images.shape[0]
    seqs = torch.full((b, 1), model.sot_id, dtype=torch.long, device=images.device)
    done = torch.zeros(b, dtype=torch.bool, device=images.device)
    cache = encode_image(model, images) if use_cache else None
    for _ in range(_max_steps(model, max_len)):
        if cache is not None:
            logits = decode_step(model, cache, seqs[:, -1])
        else:
            logits = next_logits_uncached(model, images, seqs)
        nxt = logits.argmax(-1).masked_fill(done, model.eot_id)
        seqs = torch.cat([seqs, nxt.unsqueeze(1)], dim=1)
        done |= nxt == model.eot_id
        if bool(done.all()):
            break
    return [_strip(row.tolist()[1:], model.eot_id) for row in seqs]


def _strip(ids: list[int], eot: int) -> list[int]:
    return ids[: ids.index(eot)] if eot in ids else ids


Rescorer = Callable[[int, list[list[int]]], torch.Tensor]


@torch.no_grad()
def beam_search(
    model: BEiT3ForCaptioning,
    images: torch.Tensor,
    beam: int = 3,
    max_len: int = MAX_CAPTION,
    length_penalty: float = 1.0,
    rescore: Rescorer | None = None,
) -> list[list[int]]:
    """Beam-search captions (ids without <sot>/<eot>); ended beams scored by log-prob / length^penalty.

    Each step keeps the `beam` best of the top 2 x beam continuations. `rescore(image index, candidate ids)`
    (guided decoding, `duomo.tasks.caption_guide`) adds a bonus per candidate to that choice and to the
    ended captions' scores. Stops when `beam` hypotheses have ended (early stopping) or at max_len.
    """
    model.eval()
    results = []
    steps = _max_steps(model, max_len)
    for index, img in enumerate(images):  # one image at a time keeps the bookkeeping plain
        cache = encode_image(model, img.unsqueeze(0))
        seqs = [[model.sot_id]]
        scores = torch.zeros(1)
        finished: list[tuple[float, list[int]]] = []
        for _ in range(steps):
            last = torch.tensor([s[-1] for s in seqs], device=img.device)
            logp = F.log_softmax(decode_step(model, cache, last).float(), dim=-1).cpu()
            total = (scores.unsqueeze(1) + logp).flatten()
            top = total.topk(min(2 * beam, total.numel()))
            vocab = logp.shape[1]
            rows_toks = [divmod(flat, vocab) for flat in top.indices.tolist()]
            cands = [seqs[row] + [tok] for row, tok in rows_toks]
            bonus = (
                rescore(index, [_strip(c[1:], model.eot_id) for c in cands]).tolist()
                if rescore is not None
                else [0.0] * len(cands)
            )
            values = top.values.tolist()
            order = sorted(range(len(cands)), key=lambda j: -(values[j] + bonus[j]))
            new_seqs, new_scores, rows = [], [], []
            for j in order:
                score, seq, row = values[j], cands[j], rows_toks[j][0]
                if seq[-1] == model.eot_id:
                    finished.append((score / (len(seq) - 1) ** length_penalty + bonus[j], seq))
                else:
                    new_seqs.append(seq)
                    new_scores.append(score)
                    rows.append(row)
                if len(new_seqs) == beam:
                    break
            if not new_seqs or len(finished) >= beam:  # early stopping: `beam` hypotheses have ended
                break
            seqs, scores = new_seqs, torch.tensor(new_scores)
            cache = cache.select(torch.tensor(rows))
        if not finished:  # nothing ended within max_len: the best open beam
            finished = [(scores[0].item(), seqs[0])]
        best = max(finished, key=lambda f: f[0])[1]
        results.append(_strip(best[1:], model.eot_id))
    return results


def generate(
    model: BEiT3ForCaptioning,
    images: torch.Tensor,
    beam: int | None = None,
    max_len: int = MAX_CAPTION,
    spm_path: str | Path | None = None,
    guide: CaptionGuide | None = None,
) -> list[str]:
    """Captions as text: greedy for beam 1, beam search otherwise; with a `guide`, guided beam search
    (`duomo.tasks.caption_guide`). `beam` None: 1 unguided, `GUIDED_BEAM` guided.

    Decoded with the tokenizer of the model's config; `spm_path` (else `$DUOMO_BEIT3_SPM`) is unilm's
    beit3.spm for a "beit3-spm" config.
    """
    from duomo.data.spm_tokenizer import beit3_tokenizer

    tok = beit3_tokenizer(model.beit3.cfg, spm_path)  # before decoding: a missing .spm fails fast
    beam = beam if beam is not None else (GUIDED_BEAM if guide is not None else 1)
    if guide is not None:
        rescore = guide.rescorer(images, model.beit3.cfg, tok.decode)
        ids = beam_search(model, images, beam, max_len, rescore=rescore)
    elif beam <= 1:
        ids = greedy_decode(model, images, max_len)
    else:
        ids = beam_search(model, images, beam, max_len)
    return [tidy_caption(tok.decode(row)) for row in ids]


def tidy_caption(text: str) -> str:
    """Undo the word tokenizer's spacing before punctuation (CLIP's BPE decodes "square." as "square .")."""
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


# --- metrics --------------------------------------------------------------------------------------------
def caption_words(text: str) -> list[str]:
    """Lower-cased words without punctuation (coco-caption's PTB tokenizer, simplified)."""
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(candidates: list[str], references: list[list[str]], n: int = 4) -> float:
    """Corpus BLEU-n (0..1): clipped n-gram precisions, geometric mean, brevity penalty (closest ref)."""
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidates but {len(references)} reference lists")
    hits, totals = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        c = caption_words(cand)
        rs = [caption_words(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            counts = _ngrams(c, k)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, k)
            hits[k - 1] += sum(min(v, best[g]) for g, v in counts.items())
            totals[k - 1] += max(0, len(c) - k + 1)
    if min(hits) == 0:
        return 0.0
    log_p = sum(math.log(h / t) for h, t in zip(hits, totals, strict=True)) / n
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
    return bp * math.exp(log_p)


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (coco-caption's CiderD): tf-idf n-gram cosine with clipping and a length penalty, x 10."""
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidates but {len(references)} reference lists")
    refs_words = [[caption_words(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_words:
        df.update({g for r in refs for k in range(1, n + 1) for g in _ngrams(r, k)})
    log_docs = math.log(float(max(1, len(candidates))))

    def vec(words: list[str]) -> tuple[list[dict], list[float], int]:
        vecs, norms = [], []
        for k in range(1, n + 1):
            v = {g: tf * (log_docs - math.log(max(1.0, df[g]))) for g, tf in _ngrams(words, k).items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, len(words)

    scores = []
    for cand, refs in zip(candidates, refs_words, strict=True):
        cv, cn, cl = vec(caption_words(cand))
        per_ref = []
        for r in refs:
            rv, rn, rl = vec(r)
            val = 0.0
            for k in range(n):
                s = sum(min(x, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, x in cv[k].items())
                if cn[k] and rn[k]:
                    s /= cn[k] * rn[k]
                val += s * math.exp(-((cl - rl) ** 2) / (2 * sigma**2))
            per_ref.append(val / n)
        scores.append(10.0 * sum(per_ref) / len(per_ref))
    return sum(scores) / max(1, len(scores))


# --- shapes data, training, evaluation, saving -----------------------------------------------------------
_PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def named_pair(caption: str) -> tuple[str, str] | None:
    """The first "colour shape" a caption names ("a small red star on the left" -> ("red", "star"))."""
    found = _PAIR.search(caption.lower())
    return (found.group(1), found.group(2)) if found else None


def caption_grounding(captions: list[str], objects: list[list[tuple[str, str]]]) -> dict[str, float]:
    """How often the first "colour shape" a caption names is an object of its image ("grounded") and is
    the image's main object, `objects[i][0]` ("main"): the share of captions that describe what is there,
    where BLEU also rewards a fluent caption of the wrong shape."""
    if len(captions) != len(objects):
        raise InputError(f"{len(captions)} captions for {len(objects)} images")
    pairs = [named_pair(c) for c in captions]
    n = max(1, len(captions))
    return {
        "grounded": sum(p is not None and p in objs for p, objs in zip(pairs, objects, strict=True)) / n,
        "main": sum(p is not None and p == objs[0] for p, objs in zip(pairs, objects, strict=True)) / n,
    }


def caption_vocabulary(ids: torch.Tensor, padding: torch.Tensor, sot_id: int = 49406) -> list[int]:
    """The distinct token ids of tokenized captions [N, T] outside padding, without <start_of_text>."""
    used = set(ids[~padding].tolist())
    used.discard(sot_id)
    return sorted(used)


class ShapesCaptions:
    """Images of a shapes split with their caption (training) and one reference per caption style (eval)."""

    def __init__(
        self,
        split: str,
        size: int,
        cfg: BEiT3Config,
        seed: int = 0,
        max_objects: int = 2,
        spm_path: str | Path | None = None,
    ) -> None:
        from duomo.data.spm_tokenizer import beit3_tokenizer

        ds = ShapesDataset(split, size=size, image_size=cfg.image_size, seed=seed, max_objects=max_objects)
        samples = [ds[i] for i in range(size)]
        self.pixels = shapes_pixels(samples, cfg.image_size, cfg.mean, cfg.std)
        self.captions = [s["text"] for s in samples]
        # (colour, shape) of each image's objects, the main one (which short captions describe) first
        self.objects = [[(o.colour, o.shape) for o in ds.scene(i).objects] for i in range(size)]
        self.references = []
        for i in range(size):
            scene, rng = ds.scene(i), random.Random(f"refs/{seed}/{split}/{i}")
            self.references.append(sorted({make_caption(scene, style, rng) for style in CAPTION_STYLES}))
        self.spm_path = spm_path
        tok = beit3_tokenizer(cfg, spm_path)
        self.sot_id = tok.bos_token_id
        self.ids, self.padding = tok.encode_with_padding(self.captions, MAX_CAPTION)

    def __len__(self) -> int:
        """Number of images."""
        return len(self.captions)

    def vocabulary(self) -> list[int]:
        """Every token id of the captions (<start_of_text> and padding aside): a head shortlist."""
        return caption_vocabulary(self.ids, self.padding, self.sot_id)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled training batches of pixels, tokens, padding_mask."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=gen)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                pad = self.padding[idx]
                length = int((~pad).sum(1).max())
                yield {
                    "pixels": self.pixels[idx],
                    "tokens": self.ids[idx, :length],
                    "padding_mask": pad[:, :length],
                }


def finetune_caption(
    model: BEiT3ForCaptioning,
    train: ShapesCaptions,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Masked-token caption fine-tuning for `steps` AdamW steps."""
    torch.manual_seed(seed)
    objective = CaptionObjective(seed=seed)
    return train_steps(
        model, objective, train.batches(batch_size, seed), steps, lr, warmup=steps // 10, log_every=log_every
    )


@torch.no_grad()
def evaluate_caption(
    model: BEiT3ForCaptioning,
    data: ShapesCaptions,
    beam: int | None = None,
    batch_size: int = 64,
    guide: CaptionGuide | None = None,
) -> dict[str, float]:
    """BLEU-4 and CIDEr-D of generated captions against the per-style references, how often a caption
    names a real object (`caption_grounding`), plus an example; `beam` and `guide` as in `generate`."""
    outs: list[str] = []
    for start in range(0, len(data), batch_size):
        pixels = data.pixels[start : start + batch_size]
        outs += generate(model, pixels, beam, spm_path=data.spm_path, guide=guide)
    return {
        "bleu4": bleu(outs, data.references),
        "cider_d": cider_d(outs, data.references),
        **caption_grounding(outs, data.objects),
        "images": float(len(outs)),
        "example": outs[0] if outs else "",
    }


def new_caption_model(
    config: str | BEiT3Config = "beit3-tiny",
    mdm: BEiT3ForMDM | None = None,
    vocab: list[int] | None = None,
    backbone: BEiT3 | None = None,
) -> BEiT3ForCaptioning:
    """A captioning model on a fresh backbone (`config`), a given one, or a pretrained masked-data-modelling
    model (`backbone`, if given too, must be that model's).

    Its start/end ids are those of the config's tokenizer (CLIP's, or unilm's beit3.spm: <s> 0, </s> 2).
    """
    from duomo.data.spm_tokenizer import beit3_special_ids

    if mdm is not None and backbone is not None and backbone is not mdm.beit3:
        raise InputError("give a pretrained mdm model or a backbone, not two different ones")
    if backbone is None:
        backbone = mdm.beit3 if mdm is not None else create_beit3(config)
    sot_id, eot_id, _ = beit3_special_ids(backbone.cfg)
    if mdm is not None:
        return BEiT3ForCaptioning.from_mdm(mdm, vocab, sot_id, eot_id)
    return BEiT3ForCaptioning(backbone, sot_id=sot_id, eot_id=eot_id, vocab=vocab)


def save_caption(model: BEiT3ForCaptioning, path: str | Path) -> Path:
    """Write config.json (task, backbone config, head settings) and model.safetensors to folder `path`."""
    head = {
        "tie_lm_head": model.lm_head.tied,
        "sot_id": model.sot_id,
        "eot_id": model.eot_id,
        "vocab": model.vocab,
    }
    return save_task_folder(model, path, TASK, **head)  # its vision_init: caption_image's guide="auto"


def load_caption(path: str | Path) -> BEiT3ForCaptioning:
    """A captioning model saved with `save_caption`, in eval mode."""
    from duomo.train.mdm import load_task_weights, read_task_config

    path = Path(path)
    data = read_task_config(path, TASK)
    backbone = BEiT3(BEiT3Config.from_dict(data["beit3"]))
    model = BEiT3ForCaptioning(
        backbone, data.get("tie_lm_head", True), data["sot_id"], data["eot_id"], data.get("vocab")
    )
    load_task_weights(model, path, data)
    return model.eval()


@torch.no_grad()
def caption_image(
    model: BEiT3ForCaptioning,
    image: object,
    beam: int | None = None,
    max_len: int = MAX_CAPTION,
    spm_path: str | Path | None = None,
    guide: str | None = "auto",
    guide_weight: float = DEFAULT_WEIGHT,
) -> str:
    """The caption of one image (path, bytes, PIL...); `spm_path` and `beam` as in `generate`.

    `guide`: "auto" decodes guided by the CLIP the captioner's image tower came from (when it records one),
    "none" plainly, a duomo CLIP name or folder guided by that one (`duomo.tasks.caption_guide`).
    """
    from duomo.data.transforms import image_transform, preprocess_images

    cfg = model.beit3.cfg
    device = next(model.parameters()).device
    chosen = resolve_guide(model.beit3.vision_init, guide, guide_weight, str(device))
    pixels = preprocess_images([image], image_transform(cfg.image_size, cfg.mean, cfg.std))
    return generate(model, pixels.to(device), beam, max_len, spm_path, chosen)[0]
