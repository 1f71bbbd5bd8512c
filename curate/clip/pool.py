"""The pool's CLIP vectors: the model that makes them, embedding sets of images with it.

The clip stage embeds a whole pool; evaluation sets, decontamination's eval set
and ``datacomp_image``'s reference images are embedded with the same decode and
model code (``embed_images``), so a pool row and a set image holding the same
picture get the same vector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip.model import (
    Preprocess,
    ResolvedModel,
    load_model,
    resolve_model,
    tokenizer_for,
)
from curate.core.config import ConfigError
from curate.core.layout import EMBEDDINGS, MODEL_FILE
from curate.core.progress import Progress
from curate.io.vectors import embedding_matrix

if TYPE_CHECKING:
    from curate.engine import Engine

#: Embeddings files hold about this many rows.
ROWS_PER_FILE = 50_000


def prepare_model(model: str, pretrained: str | None) -> tuple[ResolvedModel, Preprocess, int]:
    """Resolve the weights and build the model once: its preprocessing and embedding width."""
    resolved = resolve_model(model, pretrained)
    built = load_model(resolved)
    dim = int(built.encode_text(_blank_tokens(resolved)).shape[-1])
    return resolved, Preprocess.of(built), dim


def pool_model(run_dir: Path | None, who: str, remedy: str) -> dict:
    """``RUN/embeddings/_model.json``: the model that made the pool's vectors, which any
    other text or image must be embedded with to share their space.

    It must name a model this run can load: a ``model`` with a ``pretrained`` tag or
    weights, or a checkpoint folder. DataComp's precomputed vectors name one only when
    the clip stage says which made them. ``who`` starts the errors; ``remedy`` says
    what else the user can do when no clip stage of the run made the vectors.
    """
    path = None if run_dir is None else Path(run_dir) / EMBEDDINGS / MODEL_FILE
    if path is None or not path.is_file():
        raise ConfigError(
            f"{who}: no clip stage of this run says which model made the pool's vectors "
            f"(no {path or EMBEDDINGS + '/' + MODEL_FILE}); {remedy}"
        )
    described = json.loads(path.read_text())
    model, pretrained = described.get("model"), described.get("pretrained")
    is_folder = isinstance(model, str) and Path(model).expanduser().is_dir()
    if model is None or (pretrained is None and not is_folder):
        source = described.get("precomputed")
        made_by = f"DataComp's precomputed {source!r} vectors" if source else "the embeddings"
        raise ConfigError(
            f"{who}: {made_by} do not say which model made them (_model.json: "
            f"model={model!r}, pretrained={pretrained!r}). Set `model` and `pretrained` on "
            "the clip stage to that model (ViT-B-32 / openai for b32, ViT-L-14 / openai for "
            f"l14, or a local weights file); or {remedy}"
        )
    return described


def embed_images(
    images: pa.Table, work: Path, prepared: tuple[ResolvedModel, Preprocess, int], engine: Engine
) -> pa.Table:
    """Embed a small table of (uid, image bytes) with one model worker: evaluation or
    reference sets.

    The same decode and model code as the pool's, so a pool row and a set image
    holding the same picture get the same vector. Returns uid, image_embedding
    (null where the image could not be decoded) and clip_error.
    """
    work.mkdir(parents=True, exist_ok=True)
    n = images.num_rows
    source = work / "images.parquet"
    pq.write_table(images.rename_columns(["uid", "image"]), source)
    todo = pa.table(
        {
            "uid": images.column(0),
            "caption": pa.nulls(n, pa.string()),
            "shard": pa.array([str(source)] * n, pa.string()),
            "column": pa.array(["image"] * n, pa.string()),
            "row": pa.array(np.arange(n), pa.int64()),
        }
    )
    pq.write_table(todo, work / "todo.parquet")
    batch = 256
    items = [
        {
            "chunk": k,
            "file": 0,
            "todo": str(work / "todo.parquet"),
            "start": s,
            "stop": min(s + batch, n),
        }
        for k, s in enumerate(range(0, n, batch))
    ]
    device = "cuda" if engine.resources()["GPU"] >= 1 else "cpu"
    out = work / "embedded"
    out.mkdir(exist_ok=True)
    embed(engine, items, (*prepared, device, "bf16"), 1, out)
    columns = ["uid", "image_embedding", "clip_error"]
    parts = sorted(out.glob("*.parquet"))
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in parts)


def _set_model(
    run_dir: Path | None, who: str, what: str, model: str | None, pretrained: str | None
):
    """The prepared model a set of images is embedded with: the one named, else the one
    that made the pool's vectors (``pool_model``)."""
    if model is not None:
        return prepare_model(model, pretrained)
    remedy = (
        f"{what} holds images: set `model` and `pretrained` on {who} to the model that made "
        f"the pool's vectors, or give {what} as Parquet with an image_embedding column"
    )
    about = pool_model(run_dir, who, remedy)
    return prepare_model(about["model"], about.get("pretrained"))


def set_vectors(
    path: Path,
    work: Path,
    engine: Engine,
    *,
    who: str,
    what: str,
    run_dir: Path | None,
    model: str | None = None,
    pretrained: str | None = None,
) -> tuple[list[str], np.ndarray, int]:
    """A set of images or vectors (``curate.io.image_sets``) that ``who`` reads as its
    ``what``: its items' names and float32 vectors, and how many items were unusable
    (an image that cannot be decoded, a null or non-finite vector). Images are embedded
    in ``work`` with ``model``, else with the model that made the pool's vectors; a set
    with no usable item is an error."""
    from curate.io.image_sets import VECTOR_COLUMNS, read_image_set

    try:
        table = read_image_set(path)
        vector = next((c for c in VECTOR_COLUMNS if c in table.column_names), None)
        if vector is None and table.num_rows:
            prepared = _set_model(run_dir, who, what, model, pretrained)
            table = embed_images(table, work, prepared, engine)
            vector = "image_embedding"
    except ConfigError as exc:
        raise ConfigError(f"{who}: {what}: {exc}") from exc
    usable = table.filter(pc.is_valid(table[vector])) if vector else table.slice(0, 0)
    x = embedding_matrix(usable[vector]).astype(np.float32) if usable.num_rows else None
    finite = np.zeros(0, bool) if x is None else np.isfinite(x).all(axis=1)
    if not finite.any():
        raise ConfigError(
            f"{who}: {what} {path}: no usable item (no rows, no image that could be decoded, "
            "or no finite vector)"
        )
    names = usable.column(0).filter(pa.array(finite)).cast(pa.string()).to_pylist()
    return names, x[finite], table.num_rows - len(names)


def embeddings_by_file(folder: Path, files: int) -> list[list[Path]]:
    """For each ledger file (by place), the embeddings files holding its rows: read from the
    ``file`` column's statistics in their footers, nothing else."""
    holding: list[list[Path]] = [[] for _ in range(files)]
    for path in sorted(Path(folder).glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        column = meta.schema.names.index("file")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            low, high = (stats.min, stats.max) if stats and stats.has_min_max else (0, files - 1)
            for i in range(low, high + 1):
                if not holding[i] or holding[i][-1] != path:
                    holding[i].append(path)
    return holding


def _blank_tokens(resolved: ResolvedModel):
    return tokenizer_for(resolved)([""])


def embed(
    engine: Engine,
    chunks: list[dict],
    model_args: tuple,
    workers: int,
    out: Path,
    progress: Progress | None = None,
    *,
    jpeg_draft: bool = False,
    on_device: bool = False,
) -> None:
    """Chunks decoded on CPU workers, embedded by ``workers`` model workers (a GPU each on
    CUDA), written to ``out`` as Parquet parts of about ``ROWS_PER_FILE`` rows.
    ``jpeg_draft`` and ``on_device``: see ``curate.clip.embed.DecodeSpec``."""
    from curate.clip.embed import DecodeSpec, Embedder, decode_chunk

    resolved, preprocess, _, device, _ = model_args
    spec = DecodeSpec(resolved, preprocess, jpeg_draft=jpeg_draft, on_device=on_device)
    engine.map_with_models(
        chunks,
        decode_chunk,
        {"spec": spec},
        Embedder,
        model_args,
        workers,
        1 if device == "cuda" else 0,
        out,
        ROWS_PER_FILE,
        progress,
    )
