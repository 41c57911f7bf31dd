"""`train_beit3(...)`: pretrain or fine-tune a BEiT-3 task as `duomo beit3-train` asks, then evaluate.

The one function below the CLI: where the run starts (fresh, a CLIP's image tower, a pretrained folder),
which data (the built-in world or the user's own), which objective; the trainer does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from duomo.data.tokenizers import special_ids
from duomo.errors import InputError
from duomo.io.resolve import provenance
from duomo.models.beit3 import (
    BEiT3ForCaptioning,
    BEiT3ForMDM,
    BEiT3ForRetrieval,
    ClassifyModel,
    VQAModel,
)
from duomo.models.beit3.from_clip import freeze_vision as freeze
from duomo.tasks.beit3 import caption, classify, data, pretrain, retrieval, vqa
from duomo.tasks.beit3.caption_guide import resolve_guide
from duomo.tasks.beit3.start import load_pretrained, start_backbone
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.train.objectives.beit3 import (
    CaptionObjective,
    RetrievalObjective,
    VQAObjective,
    classify_objective,
)

TASKS = ("pretrain", "vqa", "caption", "retrieval", "classify")


@dataclass
class BEiT3Run:
    """What `duomo beit3-train` was asked to do."""

    task: str
    out: Path
    data: str = "shapes"
    eval_data: list[str] = field(default_factory=list)  # "name=spec"; default for shapes: val and heldout
    init: Path | None = None
    config: str = "beit3-tiny"
    vision_init: str | None = None
    freeze_vision: bool = False
    size: int = 2000
    eval_size: int = 200
    loss: str = "bce"
    label: str = "shape"
    spm: Path | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields: steps, lr, batch_size, ...

    def check(self) -> None:
        """Refuse inconsistent requests before any work."""
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; choose {', '.join(TASKS)}")
        if self.init is not None and self.vision_init is not None:
            raise InputError(
                "--vision-init starts a fresh backbone; --init already brings one: drop one of them"
            )
        if self.task == "pretrain" and self.init is not None:
            raise InputError("pretrain starts from scratch (or --vision-init); drop --init")
        if self.task == "pretrain" and self.freeze_vision and self.vision_init is None:
            raise InputError(
                "pretrain --freeze-vision keeps a CLIP image tower fixed: add --vision-init MODEL"
            )
        if self.task == "vqa" and self.loss not in ("bce", "ce"):
            raise InputError(f"unknown VQA loss {self.loss!r}; choose bce or ce")
        for item in self.eval_data:
            if "=" not in item:
                raise InputError(
                    f"--eval-data {item!r}: write NAME=DATA, e.g. heldout=runs/heldout/vqa.jsonl"
                )


def eval_specs(run: BEiT3Run) -> list[tuple[str, str]]:
    """(name, data spec) of each evaluation set: as given, else a shapes run's val and held-out splits."""
    if run.eval_data:
        return [tuple(item.split("=", 1)) for item in run.eval_data]  # type: ignore[misc]
    if run.data.partition(":")[0] == "shapes" and run.eval_size:
        splits = ("val",) if run.task == "classify" and run.label == "pair" else ("val", "heldout")
        return [(s, f"shapes:{s}") for s in splits]
    return []


def train_beit3(run: BEiT3Run, log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Train as `run` says, write the task folder to run.out, then yield one eval record per split."""
    run.check()
    train_cfg = beit3_train_config(out=str(run.out), **run.train)
    seed = train_cfg.seed
    torch.manual_seed(seed)
    pretrained, recorded = load_pretrained(run.init) if run.init is not None else (None, None)
    vision_init = provenance(run.vision_init) if run.vision_init is not None else recorded
    backbone = pretrained.beit3 if pretrained is not None else start_backbone(run.config, run.vision_init)
    cfg = backbone.cfg
    meta = {"vision_init": vision_init, "data": run.data}
    spm = run.spm
    if run.task == "pretrain":
        source = data.caption_source(run.data, cfg, run.size, seed)
        table, ids, pad, kinds = pretrain.pretraining_data(
            source, cfg, train_cfg.batch_size, seed, run.freeze_vision, spm
        )
        model = BEiT3ForMDM(backbone)
        if run.freeze_vision:
            freeze(model)
        loaders = lambda info: pretrain.mdm_loader_factory(  # noqa: E731
            table, ids, pad, train_cfg.batch_size, kinds, seed, info.rank
        )
        result = fit_task(
            model, pretrain.mdm_objective(cfg, run.freeze_vision, seed), loaders, train_cfg, "mdm", meta
        )
        log(f"saved {result['model']}")
        return
    if run.task == "vqa":
        table = data.vqa_table(data.vqa_source(run.data, cfg, run.size, seed), cfg, spm_path=spm)
        _report_skips(table, log)
        model = VQAModel(backbone, table.extra["answers"], run.loss)
        objective = VQAObjective(run.loss)
    elif run.task == "caption":
        table = data.caption_table(data.caption_source(run.data, cfg, run.size, seed), cfg, spm)
        _report_skips(table, log)
        sot, eot, _ = special_ids(cfg)
        vocab = data.caption_vocabulary(table, sot)
        torch.manual_seed(seed)
        if pretrained is not None:
            model = BEiT3ForCaptioning.from_mdm(pretrained, sot, eot, vocab)
        else:
            model = BEiT3ForCaptioning(backbone, sot, eot, vocab=vocab)
        objective = CaptionObjective(seed=seed)
    elif run.task == "retrieval":
        table = data.caption_table(data.caption_source(run.data, cfg, run.size, seed), cfg, spm)
        _report_skips(table, log)
        torch.manual_seed(seed)
        model = BEiT3ForRetrieval(backbone)
        objective = RetrievalObjective()
    else:
        source, classes = data.classify_source(run.data, cfg, run.label, run.size, seed)
        table = data.classify_table(source, cfg)
        _report_skips(table, log)
        torch.manual_seed(seed)
        model = ClassifyModel(backbone, classes, run.label if run.data.startswith("shapes") else "class")
        objective = classify_objective
    if run.freeze_vision:
        freeze(model)
    result = fit_task(model, objective, table, train_cfg, run.task, meta)
    log(f"saved {result['model']}")
    yield from evaluate_run(run, model, vision_init, seed)


def _report_skips(table: data.TaskTable, log: Callable[[str], None]) -> None:
    if table.skipped:
        log(f"skipped {table.skipped} bad or unusable rows of the training data")


def evaluate_run(
    run: BEiT3Run, model: torch.nn.Module, vision_init: str | None, seed: int
) -> Iterator[dict[str, Any]]:
    """One record per evaluation set (and, for a guided captioner, per decoding)."""
    cfg, spm = model.beit3.cfg, run.spm
    for name, spec in eval_specs(run):
        shapes = spec.startswith("shapes")
        record: dict[str, Any] = {"task": run.task, "split": name}
        if run.task == "vqa":
            table = data.vqa_table(
                data.vqa_source(spec, cfg, run.eval_size, seed + 1), cfg, model.answers, spm
            )
            yield record | vqa.evaluate_vqa(model, table)
        elif run.task == "caption":
            if shapes:
                split = spec.partition(":")[2] or "val"
                evalset = caption.shapes_eval_set(split, run.eval_size, cfg, seed + 1, spm)
            else:
                evalset = caption.table_eval_set(
                    data.caption_table(data.caption_source(spec, cfg), cfg, spm), spm
                )
            guide = resolve_guide(vision_init)
            for g in (None, guide) if guide is not None else (None,):
                decoding = {"decoding": "guided" if g else "greedy"}
                yield record | decoding | caption.evaluate_caption(model, evalset, guide=g)
        elif run.task == "retrieval":
            table = data.caption_table(data.caption_source(spec, cfg, run.eval_size, seed + 1), cfg, spm)
            yield record | retrieval.evaluate_retrieval(model, table)
        elif run.task == "classify":
            source, classes = data.classify_source(spec, cfg, run.label, run.eval_size, seed + 1)
            if classes != model.classes:
                raise InputError(f"--eval-data {name}: its classes {classes[:5]} differ from the model's")
            yield record | classify.evaluate_classify(model, data.classify_table(source, cfg))
