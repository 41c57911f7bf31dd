"""Visual question answering with BEiT-3 on the shapes world: answer vocabulary, data, fine-tuning, accuracy.

VQA is classification over a fixed answer vocabulary from the fused [image ; question] sequence
(`BEiT3ForVQA`). The loss is unilm's: `BCE_with_logits(logits, scores) * num_answers` on soft answer scores;
the shapes world has one right answer per question, so the scores are one-hot. A fine-tuned model is saved
as a folder: `config.json` ({"task": "vqa", "beit3": config, "answers": [...]}) + `model.safetensors`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duomo.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesDataset
from duomo.errors import InputError
from duomo.models.beit3 import BEiT3, BEiT3Config, BEiT3ForVQA, create_beit3
from duomo.train.mdm import (  # noqa: F401  (tokenize: CLIP ids, kept importable from here)
    load_task_weights,
    read_task_config,
    save_task_folder,
    shapes_pixels,
    tokenize,
    train_steps,
)

TASK = "vqa"
QUESTION_LENGTH = 32  # tokens, with <sot>/<eot>; shapes questions use at most ~12


def question_tokens(
    cfg: BEiT3Config, questions: list[str], spm_path: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, padding mask) of questions with the tokenizer of `cfg` (CLIP, or unilm's beit3.spm).

    `spm_path` (else `$DUOMO_BEIT3_SPM`) is the .spm file a "beit3-spm" config needs; "clip" ignores it.
    """
    from duomo.data.spm_tokenizer import beit3_tokenizer

    return beit3_tokenizer(cfg, spm_path).encode_with_padding(questions, QUESTION_LENGTH)


def shapes_answers() -> list[str]:
    """Every answer the shapes world gives: colours, shapes, counts 0-5, positions, sizes, yes/no."""
    counts = [str(n) for n in range(len(POSITIONS) + 1)]
    return [*COLOURS, *SHAPES, *counts, *POSITIONS, *SIZES, "yes", "no"]


def question_type(question: str) -> str:
    """The kind of a shapes question: colour, shape, count, position, size or exists."""
    q = question.lower()
    if q.startswith("what color"):
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


class VQAModel(BEiT3ForVQA):
    """`BEiT3ForVQA` that knows its answer vocabulary (same parameter names as unilm's VQA model)."""

    def __init__(self, backbone: BEiT3, answers: list[str], loss: str = "bce") -> None:
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


class ShapesVQA:
    """(image, question, answer) triples of a shapes split, images rendered and normalised once."""

    def __init__(
        self,
        split: str,
        size: int,
        cfg: BEiT3Config,
        answers: list[str],
        seed: int = 0,
        max_objects: int = 2,
        spm_path: str | Path | None = None,
    ) -> None:
        ds = ShapesDataset(split, size=size, image_size=cfg.image_size, seed=seed, max_objects=max_objects)
        samples = [ds[i] for i in range(size)]
        self.pixels = shapes_pixels(samples, cfg.image_size, cfg.mean, cfg.std)
        index = {a: i for i, a in enumerate(answers)}
        triples = [(i, q, a) for i, s in enumerate(samples) for q, a in s["qa"]]
        unknown = sorted({a for _, _, a in triples if a not in index})
        if unknown:
            raise InputError(f"answers {unknown} are not in the answer vocabulary")
        self.image_index = torch.tensor([i for i, _, _ in triples])
        self.questions = [q for _, q, _ in triples]
        self.targets = torch.tensor([index[a] for _, _, a in triples])
        self.ids, self.padding = question_tokens(cfg, self.questions, spm_path)

    def __len__(self) -> int:
        """Number of questions."""
        return len(self.questions)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows `idx` as a batch: pixels, tokens, padding_mask, target (answer index)."""
        ids, pad = self.ids[idx], self.padding[idx]
        length = int((~pad).sum(1).max())
        return {
            "pixels": self.pixels[self.image_index[idx]],
            "tokens": ids[:, :length],
            "padding_mask": pad[:, :length],
            "target": self.targets[idx],
        }

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled training batches."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self), generator=gen)
            for start in range(0, len(self) - batch_size + 1, batch_size):
                yield self.batch(order[start : start + batch_size])


VQA_LOSSES = ("bce", "ce")


class VQAObjective:
    """The VQA loss: "bce" is unilm's (mean BCE-with-logits on answer scores, times the number of answers),
    made for VQAv2's soft multi-annotator scores; "ce" is softmax cross-entropy, for one right answer per
    question as in shapes, where it leaves the all-answers-unlikely phase BCE starts with much sooner."""

    def __init__(self, loss: str = "bce") -> None:
        if loss not in VQA_LOSSES:
            raise InputError(f"unknown VQA loss {loss!r}; choose one of {VQA_LOSSES}")
        self.loss = loss

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss", "acc"} of one batch."""
        logits = model(batch["pixels"], batch["tokens"], batch["padding_mask"])
        if self.loss == "ce":
            loss = F.cross_entropy(logits.float(), batch["target"])
            return {"loss": loss, "acc": (logits.argmax(-1) == batch["target"]).float().mean()}
        scores = F.one_hot(batch["target"], logits.shape[-1]).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, scores) * logits.shape[-1]
        acc = (logits.argmax(-1) == batch["target"]).float().mean()
        return {"loss": loss, "acc": acc}


@torch.no_grad()
def evaluate_vqa(model: VQAModel, data: ShapesVQA, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy overall and per question type; also the majority-answer baseline of `data`."""
    model.eval()
    preds = []
    for start in range(0, len(data), batch_size):
        b = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        preds.append(model(b["pixels"], b["tokens"], b["padding_mask"]).argmax(-1))
    correct = (torch.cat(preds) == data.targets).tolist()
    out = {"accuracy": sum(correct) / max(1, len(correct)), "questions": float(len(correct))}
    kinds = [question_type(q) for q in data.questions]
    for kind in sorted(set(kinds)):
        hits = [c for c, k in zip(correct, kinds, strict=True) if k == kind]
        out[f"accuracy_{kind}"] = sum(hits) / len(hits)
    majority = Counter(data.targets.tolist()).most_common(1)[0][1] if len(data) else 0
    out["majority_baseline"] = majority / max(1, len(data))
    return out


def finetune_vqa(
    model: VQAModel,
    train: ShapesVQA,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
    head_lr_weight: float = 1.0,
    loss: str = "bce",
) -> list[dict[str, float]]:
    """Fine-tune a VQA model on `train` for `steps` AdamW steps (cosine schedule, 10% warm-up).

    The head may learn `head_lr_weight` times faster (unilm: 20 from a pretrained VQAv2 backbone; from
    scratch on shapes 10 was unstable, so the default is 1).
    """
    torch.manual_seed(seed)
    objective = VQAObjective(loss)  # an unknown loss fails before any work
    if isinstance(model, VQAModel):
        model.loss = loss
    batches = train.batches(batch_size, seed)
    return train_steps(
        model,
        objective,
        batches,
        steps,
        lr,
        warmup=steps // 10,
        log_every=log_every,
        head_lr_weight=head_lr_weight,
    )


def new_vqa_model(config: str | BEiT3Config = "beit3-tiny", backbone: BEiT3 | None = None) -> VQAModel:
    """A VQA model over the shapes answers, on a fresh backbone or a given (e.g. pretrained) one."""
    return VQAModel(backbone if backbone is not None else create_beit3(config), shapes_answers())


def save_vqa(model: VQAModel, path: str | Path) -> Path:
    """Write config.json (task, backbone config, answers) and model.safetensors to folder `path`."""
    return save_task_folder(model, path, TASK, answers=model.answers, loss=model.loss)


def load_vqa(path: str | Path) -> VQAModel:
    """A VQA model saved with `save_vqa`, in eval mode."""
    path = Path(path)
    data = read_task_config(path, TASK)
    model = VQAModel(BEiT3(BEiT3Config.from_dict(data["beit3"])), data["answers"], data.get("loss", "bce"))
    load_task_weights(model, path, data)
    return model.eval()


@torch.no_grad()
def answer(
    model: VQAModel, image: object, question: str, spm_path: str | Path | None = None
) -> tuple[str, float]:
    """The answer to a question about an image (path, bytes, PIL...) and its probability (sigmoid score).

    `spm_path`: unilm's beit3.spm, for a model whose config uses it (else `$DUOMO_BEIT3_SPM`).
    """
    from duomo.data.transforms import image_transform, preprocess_images

    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty; ask something like 'what color is the star?'")
    cfg = model.beit3.cfg
    pixels = preprocess_images([image], image_transform(cfg.image_size, cfg.mean, cfg.std))
    ids, pad = question_tokens(cfg, [question], spm_path)
    model.eval()
    return best_answer(model, pixels, ids, pad)


@torch.no_grad()
def best_answer(
    model: VQAModel, pixels: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor
) -> tuple[str, float]:
    """The top answer for one [1, ...] input on the model's device, with its probability as trained:
    a softmax over answers for a "ce" model, the answer's own sigmoid for "bce" (unilm)."""
    device = next(model.parameters()).device
    logits = model(pixels.to(device), ids.to(device), pad.to(device))[0].float()
    probs = torch.softmax(logits, -1) if getattr(model, "loss", "bce") == "ce" else torch.sigmoid(logits)
    best = int(probs.argmax())
    return model.answers[best], float(probs[best])


def vqa_splits(
    cfg: BEiT3Config,
    size: int = 300,
    seed: int = 0,
    splits: tuple[str, ...] = ("val", "heldout"),
    spm_path: str | Path | None = None,
) -> dict[str, ShapesVQA]:
    """Evaluation sets of `size` images per split (about 8 questions an image)."""
    return {s: ShapesVQA(s, size, cfg, shapes_answers(), seed=seed + 1, spm_path=spm_path) for s in splits}
