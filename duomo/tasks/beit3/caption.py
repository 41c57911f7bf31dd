"""Image captioning the BEiT-3 way: decoding (greedy, beam, CLIP-guided), metrics, evaluation on shapes.

The model (`BEiT3ForCaptioning`: uni-directional text mask, [MASK]-token prediction, key/value cache) is in
`duomo.models.beit3.heads`; its training objective in `duomo.train.objectives.beit3.CaptionObjective`.

Metrics: corpus BLEU-4 (Papineni et al., brevity penalty over the corpus, clipped n-gram counts against all
references, no smoothing) and CIDEr-D (Vedantam et al., coco-caption's `CiderD`: tf-idf n-gram vectors for
n = 1..4 with document frequencies from the references of the evaluated set, candidate counts clipped to the
reference's, a Gaussian length penalty sigma = 6, mean over n and over references, times 10).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duomo.data.shapes import CAPTION_STYLES, COLOURS, SHAPES, ShapesDataset, make_caption
from duomo.data.tokenizers import build_tokenizer
from duomo.data.transforms import image_transform, preprocess_images
from duomo.errors import InputError
from duomo.models.beit3 import BEiT3Config, BEiT3ForCaptioning
from duomo.tasks.beit3.caption_guide import DEFAULT_WEIGHT, GUIDED_BEAM, CaptionGuide, resolve_guide

TASK = "caption"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,:;!?])")
MAX_CAPTION = 32  # tokens, with the start/end ids


# --- decoding ----------------------------------------------------------------------------------------------
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
    cache = model.start_decoding(images) if use_cache else None
    for _ in range(_max_steps(model, max_len)):
        if cache is not None:
            logits = model.next_token_logits(cache, seqs[:, -1])
        else:
            logits = model.next_token_logits_uncached(images, seqs)
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
    (guided decoding, `duomo.tasks.beit3.caption_guide`) adds a bonus per candidate to that choice and to the
    ended captions' scores. Stops when `beam` hypotheses have ended (early stopping) or at max_len.
    """
    model.eval()
    results = []
    steps = _max_steps(model, max_len)
    for index, img in enumerate(images):  # one image at a time keeps the bookkeeping plain
        cache = model.start_decoding(img.unsqueeze(0))
        seqs = [[model.sot_id]]
        scores = torch.zeros(1)
        finished: list[tuple[float, list[int]]] = []
        for _ in range(steps):
            last = torch.tensor([s[-1] for s in seqs], device=img.device)
            logp = F.log_softmax(model.next_token_logits(cache, last).float(), dim=-1).cpu()
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
    spm_path: str | os.PathLike | None = None,
    guide: CaptionGuide | None = None,
) -> list[str]:
    """Captions as text: greedy for beam 1, beam search otherwise; with a `guide`, guided beam search
    (`duomo.tasks.beit3.caption_guide`). `beam` None: 1 unguided, `GUIDED_BEAM` guided.

    Decoded with the tokenizer of the model's config; `spm_path` (else `$DUOMO_BEIT3_SPM`) is unilm's
    beit3.spm for a "beit3-spm" config.
    """
    tok = build_tokenizer(model.beit3.cfg, spm_path=spm_path)  # before decoding: a missing .spm fails fast
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


# --- metrics ----------------------------------------------------------------------------------------------
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


# --- evaluation ---------------------------------------------------------------------------------------------
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


@dataclass
class CaptionEvalSet:
    """Images (normalised pixels) with reference captions, and optionally the (colour, shape) objects of each
    image, main one first (for `caption_grounding`)."""

    pixels: torch.Tensor
    references: list[list[str]]
    objects: list[list[tuple[str, str]]] | None = None
    spm_path: str | os.PathLike | None = None

    def __len__(self) -> int:
        """Number of images."""
        return len(self.references)


def shapes_eval_set(
    split: str, size: int, cfg: BEiT3Config, seed: int = 0, spm_path: str | os.PathLike | None = None
) -> CaptionEvalSet:
    """A shapes split's images with one reference per caption style and their objects."""
    ds = ShapesDataset(split, size=size, image_size=cfg.image_size, seed=seed, max_objects=2)
    transform = image_transform(cfg.image_size, cfg.mean, cfg.std)
    pixels = torch.stack([transform(ds[i]["image"]) for i in range(size)])
    objects = [[(o.colour, o.shape) for o in ds.scene(i).objects] for i in range(size)]
    references = []
    for i in range(size):
        scene, rng = ds.scene(i), random.Random(f"refs/{seed}/{split}/{i}")
        references.append(sorted({make_caption(scene, style, rng) for style in CAPTION_STYLES}))
    return CaptionEvalSet(pixels, references, objects, spm_path)


def table_eval_set(table: object, spm_path: str | os.PathLike | None = None) -> CaptionEvalSet:
    """A caption table's images with all their captions as references (for users' own data)."""
    refs: dict[int, list[str]] = {}
    for row, text in zip(table.image_index.tolist(), table.texts, strict=True):
        refs.setdefault(row, []).append(text)
    rows = sorted(refs)
    return CaptionEvalSet(table.pixels[rows], [refs[r] for r in rows], None, spm_path)


@torch.no_grad()
def evaluate_caption(
    model: BEiT3ForCaptioning,
    data: CaptionEvalSet,
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
        **(caption_grounding(outs, data.objects) if data.objects is not None else {}),
        "images": float(len(outs)),
        "example": outs[0] if outs else "",
    }


@torch.no_grad()
def caption_image(
    model: BEiT3ForCaptioning,
    image: object,
    beam: int | None = None,
    max_len: int = MAX_CAPTION,
    spm_path: str | os.PathLike | None = None,
    guide: str | None = "auto",
    guide_weight: float = DEFAULT_WEIGHT,
    vision_init: str | None = None,
) -> str:
    """The caption of one image (path, bytes, PIL...); `spm_path` and `beam` as in `generate`.

    `guide`: "auto" decodes guided by the CLIP the captioner's image tower came from (when it records one),
    "none" plainly, a duomo CLIP name or folder guided by that one (`duomo.tasks.beit3.caption_guide`);
    `vision_init` is that record (the task folder's config).
    """
    cfg = model.beit3.cfg
    device = next(model.parameters()).device
    chosen = resolve_guide(vision_init, guide, guide_weight, str(device))
    pixels = preprocess_images([image], image_transform(cfg.image_size, cfg.mean, cfg.std))
    return generate(model, pixels.to(device), beam, max_len, spm_path, chosen)[0]
