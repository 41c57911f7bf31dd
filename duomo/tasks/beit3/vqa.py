"""Visual question answering with BEiT-3: evaluation, answering one question, question kinds.

VQA is classification over the answer vocabulary built from the training questions (`VQAModel` keeps it)
from the fused [image ; question] sequence; the losses (unilm's BCE on soft scores, or softmax CE) are in
`duomo.train.objectives.beit3.VQAObjective`. Data: `duomo.tasks.beit3.data.vqa_table` over the built-in
shapes world or any VQA manifest (`duomo.data.vqa`).
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from duomo.data.images import ImageLike
from duomo.data.tokenizers import build_tokenizer
from duomo.data.transforms import image_transform, preprocess_images
from duomo.errors import InputError
from duomo.models.beit3 import VQAModel
from duomo.tasks.beit3.data import TEXT_LENGTH, TaskTable

TASK = "vqa"


def question_type(question: str) -> str:
    """The kind of a question by its opening words: colour, shape, count, position, size or exists."""
    q = question.lower()
    if q.startswith(("what color", "what colour")):
        return "colour"
    if q.startswith("what shape"):
        return "shape"
    if q.startswith("how many"):
        return "count"
    if q.startswith("where"):
        return "position"
    if "large or small" in q:
        return "size"
    return "exists"


@torch.no_grad()
def evaluate_vqa(model: VQAModel, data: TaskTable, batch_size: int = 256) -> dict[str, float]:
    """VQA accuracy (the soft score of the top answer: top-1 accuracy for one right answer) overall and
    per question kind; also the majority-answer baseline of `data`."""
    model.eval()
    device = next(model.parameters()).device
    hits = []
    for start in range(0, len(data), batch_size):
        b = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logits = model(b["pixels"].to(device), b["tokens"].to(device), b["padding_mask"].to(device))
        hits.append(b["scores"].gather(1, logits.argmax(-1, keepdim=True).cpu()).squeeze(1))
    score = torch.cat(hits).tolist()
    out = {"accuracy": sum(score) / max(1, len(score)), "questions": float(len(score))}
    kinds = [question_type(q) for q in data.texts]
    for kind in sorted(set(kinds)):
        mine = [s for s, k in zip(score, kinds, strict=True) if k == kind]
        out[f"accuracy_{kind}"] = sum(mine) / len(mine)
    best = Counter(data.columns["scores"].argmax(-1).tolist()).most_common(1)[0][0] if len(data) else 0
    out["majority_baseline"] = float(data.columns["scores"][:, best].mean()) if len(data) else 0.0
    return out


@torch.no_grad()
def answer(
    model: VQAModel, image: ImageLike, question: str, spm_path: str | os.PathLike | None = None
) -> tuple[str, float]:
    """The answer to a question about an image (path, bytes, PIL...) and its probability as trained: a
    softmax over answers for a "ce" model, the answer's own sigmoid for "bce" (unilm)."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something like 'what color is the star?'")
    cfg = model.beit3.cfg
    pixels = preprocess_images([image], image_transform(cfg.image_size, cfg.mean, cfg.std))
    ids, pad = build_tokenizer(cfg, spm_path=spm_path).encode_with_padding([question], TEXT_LENGTH)
    return best_answer(model, pixels, ids, pad)


@torch.no_grad()
def best_answer(
    model: VQAModel, pixels: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor
) -> tuple[str, float]:
    """The top answer for one [1, ...] input, with its probability as trained."""
    model.eval()
    device = next(model.parameters()).device
    logits = model(pixels.to(device), ids.to(device), pad.to(device))[0].float()
    probs = torch.softmax(logits, -1) if model.loss == "ce" else torch.sigmoid(logits)
    best = int(probs.argmax())
    return model.answers[best], float(probs[best])
