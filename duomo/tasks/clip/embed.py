"""Embedding many image files with decoding ahead of the model, and writing the vectors to disk."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duomo.errors import DuomoError, InputError

OUTPUT_FORMATS = (".npy", ".parquet")


@dataclass
class EmbeddingResult:
    """Vectors for the files that decoded, and the reasons for those that did not."""

    paths: list[str]
    embeddings: np.ndarray
    failures: dict[str, str] = field(default_factory=dict)
    layout: str = ""  # how model calls were spread over the cores


def embed_image_files(
    pipeline,
    paths: Sequence[Path],
    batch_size: int = 32,
    workers: int = 2,
    on_batch: Callable[[int], None] | None = None,
    layout: str | None = "auto",
) -> EmbeddingResult:
    """Embed image files in batches, decoding in threads ahead of the model; bad files are skipped.
    `layout` spreads model calls over the cores: "auto" (measured), or "WxT" (see duomo.tasks.layout)."""
    from duomo.tasks.layout import layout_encoder

    encode = layout_encoder(pipeline, layout, batch_size)

    def prepare(path: Path) -> torch.Tensor | str:
        try:
            return pipeline.preprocess(str(path))
        except DuomoError as exc:
            return str(exc)

    ok: list[str] = []
    chunks: list[np.ndarray] = []
    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, encode:
        batch_paths: list[str] = []
        batch: list[torch.Tensor] = []

        def flush() -> None:
            if batch:
                chunks.append(encode(torch.stack(batch)).numpy())
                ok.extend(batch_paths)
                if on_batch:
                    on_batch(len(batch))
                batch.clear()
                batch_paths.clear()

        for path, item in zip(paths, pool.map(prepare, paths), strict=True):
            if isinstance(item, str):
                failures[str(path)] = item
                if on_batch:
                    on_batch(1)
                continue
            batch.append(item)
            batch_paths.append(str(path))
            if len(batch) == batch_size:
                flush()
        flush()
    dim = pipeline.embed_dim
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=np.float32)
    return EmbeddingResult(ok, matrix.astype(np.float32), failures, encode.describe())


def write_embeddings(
    out: Path, keys: Sequence[str], embeddings: np.ndarray, overwrite: bool = False
) -> list[Path]:
    """Write vectors atomically as .npy (with a `.keys.json` sidecar) or .parquet (key, embedding)."""
    if out.suffix not in OUTPUT_FORMATS:
        raise InputError(f"output {out} must end in one of {', '.join(OUTPUT_FORMATS)}")
    written = [out] if out.suffix == ".parquet" else [out, out.with_suffix(".keys.json")]
    existing = [p for p in written if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temps: list[str] = []

    def temp(target: Path) -> str:
        """A unique temporary sibling of `target` (two runs never share one), removed unless renamed."""
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        temps.append(name)
        return name

    try:
        if out.suffix == ".npy":
            vectors_tmp, keys_tmp = temp(out), temp(written[1])
            with open(vectors_tmp, "wb") as f:
                np.save(f, embeddings)
            Path(keys_tmp).write_text(json.dumps(list(keys), ensure_ascii=False), encoding="utf-8")
            # both files are complete before either replaces what was there; vectors first, keys last, so
            # a reader that finds the new keys finds the new vectors (and len(keys) == rows either way)
            os.replace(vectors_tmp, out)
            os.replace(keys_tmp, written[1])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table(
                {"key": list(keys), "embedding": pa.array(list(embeddings), type=pa.list_(pa.float32()))}
            )
            table_tmp = temp(out)
            pq.write_table(table, table_tmp)
            os.replace(table_tmp, out)
    finally:
        for name in temps:
            if os.path.exists(name):
                os.unlink(name)
    return written
