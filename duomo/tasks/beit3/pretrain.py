"""Masked-data-modelling pretraining data: image-only, text-only and pair batches in turn.

Images and captions come from any caption pair source ("shapes" adds the "question answer" strings of its
QA pairs as monomodal text). Batch i of epoch e is drawn from (seed, e, i) alone, so a resumed run sees
exactly the batches of the uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch.utils.data import Dataset

from duomo.data.tokenizers import special_ids
from duomo.errors import InputError
from duomo.models.beit3 import BEiT3Config
from duomo.tasks.beit3.data import TaskTable, _tokens, caption_table
from duomo.train.data import Batch, LoaderFactory, RowCollate, sample_seed
from duomo.train.objectives.beit3 import MDMConfig, MDMObjective

KINDS = ("image", "text", "pair")


def pretraining_texts(source: Dataset, table: TaskTable) -> list[str]:
    """Monomodal texts: the captions, plus the shapes world's "question answer" strings."""
    qa = []
    world = getattr(source, "scene", None)
    if world is not None:
        qa = [f"{q} {a}" for i in range(len(source)) for q, a in source.scene(i).metadata["qa"]]
    return qa + table.texts


def mdm_loader_factory(
    table: TaskTable,
    text_ids: torch.Tensor,
    text_pad: torch.Tensor,
    batch_size: int,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
    rank: int = 0,
) -> LoaderFactory:
    """`make(epoch, start)`: an epoch of len(images) // batch_size batches, kind i % len(kinds) each."""
    n_images, n_pairs, n_texts = table.pixels.shape[0], len(table), len(text_ids)
    per_epoch = max(1, n_images // batch_size)
    if n_pairs < 1:
        raise InputError("pretraining needs at least one image-caption pair")
    collate = RowCollate()

    def make(epoch: int, start: int) -> Iterable[Batch]:
        for i in range(start, per_epoch):
            step_seed = sample_seed(seed, epoch, f"mdm/{rank}/{i}")
            gen = torch.Generator().manual_seed(step_seed)
            kind = kinds[(epoch * per_epoch + i) % len(kinds)]
            batch: Batch = {}
            if kind == "pair":
                rows = torch.randint(0, n_pairs, (batch_size,), generator=gen)
                batch = collate([table[int(r)] for r in rows])
            elif kind == "image":
                rows = torch.randint(0, n_images, (batch_size,), generator=gen)
                batch = {"pixels": table.pixels[rows]}
            else:
                rows = torch.randint(0, n_texts, (batch_size,), generator=gen)
                batch = collate([{"tokens": text_ids[r], "padding_mask": text_pad[r]} for r in rows.tolist()])
            batch["seed"] = torch.tensor(step_seed)
            yield batch

    return make


def pretraining_data(
    source: Dataset,
    cfg: BEiT3Config,
    batch_size: int,
    seed: int,
    freeze_vision: bool,
    spm_path: str | os.PathLike | None = None,
) -> tuple[TaskTable, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(pair table, text ids, text padding, batch kinds): a frozen vision pathway skips image batches."""
    table = caption_table(source, cfg, spm_path)
    ids, pad = _tokens(cfg, pretraining_texts(source, table), spm_path)
    kinds = ("text", "pair") if freeze_vision else KINDS
    return table, ids, pad, kinds


def mdm_objective(cfg: BEiT3Config, freeze_vision: bool, seed: int = 0) -> MDMObjective:
    """The masked-data-modelling objective; with a frozen vision pathway, MLM only (VLMo's second stage)."""
    sot, eot, _ = special_ids(cfg)
    mdm = MDMConfig(special_ids=(sot, eot))
    if freeze_vision:
        mdm.image_ratio = 0.0
    return MDMObjective(mdm, seed=seed)
