"""Decontamination: drop pool rows whose image is (nearly) an image of the evaluation set.

A model evaluated on pictures it was trained on scores too well. The stage
embeds the evaluation set with the model that embedded the pool (the clip
stage's, from ``embeddings/_model.json``, unless ``model`` / ``pretrained``
say otherwise), puts the vectors in a FAISS inner-product index, and drops
every alive row whose image embedding has cosine >= ``threshold`` with some
evaluation image (``dropped_by`` = the stage's name, ``decontaminate``).
Cosines are screened in float32 and decided in float64, as in SemDeDup.

``eval_set`` is a folder of images, a Parquet file of images (a binary
column: ``image``, ``jpg``, ``png`` or ``webp``), or a Parquet file of
precomputed vectors (an ``image_embedding`` or ``embedding`` column, already
from the pool's model). A relative path is taken from the folder of the run's
input first: the demo pool's held-out set is ``eval_set: eval``.

``_stats/contaminated.parquet`` lists each dropped row with the evaluation
item it matched and their cosine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip_model import embedding_matrix
from curate.config import ConfigError, Range
from curate.dedup import DECISIONS, alive_scores, read_vectors, unit_rows
from curate.runfolder import scratch
from curate.semdedup import SCREEN
from curate.stages.base import StageContext, register_stage
from curate.stages.clip import EMBEDDINGS_DIR, MODEL_FILE, embed_images, prepare_model
from curate.stages.dedup import STATS, DecidedStage

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
VECTOR_COLUMNS = ("image_embedding", "embedding")
MATCHES = pa.schema([("uid", pa.string()), ("eval_index", pa.int64()), ("cosine", pa.float64())])


@register_stage("decontaminate")
@dataclass
class DecontaminateStage(DecidedStage):
    eval_set: str | None = None
    # A cosine: -1 would drop every row, 1 only exact copies of an evaluation image.
    threshold: Annotated[float, Range(-1, 1, low_open=True, why="drop when cosine >= it")] = 0.95
    model: str | None = None  # default: the model that embedded the pool
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if not self.eval_set:
            raise ValueError("eval_set is required: a folder or Parquet file of evaluation images")

    def columns_after(self, columns: set[str]) -> set[str]:
        if "clip_score" not in columns:
            raise ConfigError(
                f"stage {self.name}: decontamination compares image embeddings; "
                "it needs a clip stage before it"
            )
        return super().columns_after(columns)

    def plan(self, ctx: StageContext) -> None:
        with scratch(ctx.out_dir) as work:
            self._decide(ctx, work)

    def _decide(self, ctx: StageContext, work: Path) -> None:
        names, vectors = self._eval_vectors(ctx, work)
        np.save(work / "eval.npy", unit_rows(vectors))
        pq.write_table(alive_scores(ctx.input_files).select(["uid"]), work / "alive.parquet")
        files = sorted((ctx.run_dir / EMBEDDINGS_DIR).glob("*.parquet"))
        jobs = [
            {"path": str(f), "eval": str(work / "eval.npy"), "alive": str(work / "alive.parquet"),
             "threshold": self.threshold}
            for f in files
        ]  # fmt: skip
        found = ctx.engine.map_items(_match_task, jobs, f"{self.name}: match", ctx.progress)
        matches = pa.concat_tables(found or [MATCHES.empty_table()])
        matches = pa.table(
            {
                "uid": matches["uid"],
                "eval_item": pa.array(names, pa.string()).take(matches["eval_index"]),
                "cosine": matches["cosine"],
            }
        )
        n = matches.num_rows
        self._decisions = pa.table(
            {"uid": matches["uid"], "dup_group": pa.nulls(n, pa.int64()), "drop": [True] * n},
            DECISIONS,
        )
        self._save(ctx, eval_images=len(names), eval_items_matched=_distinct(matches))
        pq.write_table(matches, ctx.out_dir / STATS / "contaminated.parquet")

    def _eval_vectors(self, ctx: StageContext, work: Path) -> tuple[list[str], np.ndarray]:
        """The evaluation set's names and image vectors (embedded here when they are images)."""
        try:
            path = find_beside_input(self.eval_set, ctx.input_path)
            table = read_image_set(path)
        except ConfigError as exc:
            raise ConfigError(f"stage {self.name}: eval_set: {exc}") from exc
        if not table.num_rows:
            raise ConfigError(f"eval_set {path}: it holds no rows")
        vector = next((c for c in VECTOR_COLUMNS if c in table.column_names), None)
        if vector is None:  # images: undecodable ones come back with a null vector
            table = embed_images(table, work / "embed", self._prepared(ctx), ctx.engine)
            vector = "image_embedding"
        usable = table.filter(pc.is_valid(table[vector]))
        ctx.counters["eval_unusable"] = table.num_rows - usable.num_rows
        if not usable.num_rows:
            raise ConfigError(f"eval_set {path}: no image in it could be decoded, or no vector")
        return usable.column(0).to_pylist(), embedding_matrix(usable[vector])

    def _prepared(self, ctx: StageContext):
        if self.model is not None:
            return prepare_model(self.model, self.pretrained)
        described = ctx.run_dir / EMBEDDINGS_DIR / MODEL_FILE
        about = json.loads(described.read_text()) if described.is_file() else {}
        if about.get("precomputed") or not about.get("model"):
            raise ConfigError(
                f"stage {self.name}: the pool's embeddings were not made by a model this run "
                "can load; set `model` and `pretrained` to the model that made them, or give "
                "eval_set as Parquet with an image_embedding column"
            )
        return prepare_model(about["model"], about.get("pretrained"))


def _distinct(matches: pa.Table) -> int:
    return int(pc.count_distinct(matches["eval_item"]).as_py()) if matches.num_rows else 0


def find_beside_input(eval_set: str, input_path: Path | None) -> Path:
    """A set's path; a relative one is looked up beside the run's input first."""
    path = Path(eval_set).expanduser()
    if not path.is_absolute() and input_path is not None:
        base = Path(input_path)
        beside = (base if base.is_dir() else base.parent) / path
        if beside.exists():
            return beside
    if not path.exists():
        raise ConfigError(f"{eval_set!r}: no such file or folder")
    return path


def read_image_set(path: Path) -> pa.Table:
    """(name, image bytes) or (name, vector): images of a folder, or a Parquet file's rows."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ConfigError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        names = [str(p.relative_to(path)) for p in files]
        return pa.table({"name": names, "image": [p.read_bytes() for p in files]})
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"{path}: not a folder or a readable Parquet file: {exc}") from exc
    column = next((c for c in (*VECTOR_COLUMNS, *IMAGE_COLUMNS) if c in table.column_names), None)
    if column is None:
        wanted = ", ".join((*VECTOR_COLUMNS, *IMAGE_COLUMNS))
        raise ConfigError(f"{path}: needs one of the columns {wanted}")
    if column in IMAGE_COLUMNS and pa.types.is_struct(table[column].type):
        table = table.set_column(  # Hugging Face datasets' Image feature: {bytes, path}
            table.schema.get_field_index(column), column, pc.struct_field(table[column], "bytes")
        )
    if column in VECTOR_COLUMNS:
        table = table.set_column(
            table.schema.get_field_index(column), column, _fixed_size(table[column], path)
        )
    named = next((c for c in ("uid", "path", "name") if c in table.column_names), None)
    names = table[named].cast(pa.string()) if named else pa.array(map(str, range(len(table))))
    return pa.table({"name": names, column: table[column]})


def _fixed_size(vectors: pa.ChunkedArray, path: Path) -> pa.ChunkedArray:
    """Vectors as fixed_size_list (a plain list column is accepted if all rows are as long)."""
    kind = vectors.type
    if pa.types.is_fixed_size_list(kind):
        return vectors
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise ConfigError(f"{path}: vectors of type {kind}; expected lists of floats")
    lengths = pc.unique(pc.list_value_length(vectors).drop_null()).to_pylist()
    if len(lengths) != 1:
        raise ConfigError(f"{path}: vectors of different lengths {sorted(lengths)[:5]}")
    return vectors.cast(pa.list_(kind.value_type, lengths[0]))


def _match_task(item: dict) -> pa.Table:
    """The alive rows of one embeddings file within ``threshold`` of an evaluation image."""
    import faiss

    targets = np.load(item["eval"])
    wanted = pq.read_table(item["alive"])["uid"]
    uids, vectors = read_vectors(Path(item["path"]), "image_embedding", wanted)
    x = unit_rows(vectors)
    index = faiss.IndexFlatIP(targets.shape[1])
    index.add(np.nan_to_num(targets.astype(np.float32)))
    limits, _, found = index.range_search(
        np.nan_to_num(x.astype(np.float32)), item["threshold"] - SCREEN
    )
    rows = np.repeat(np.arange(len(x)), np.diff(limits).astype(np.int64))
    cosine = np.einsum("ij,ij->i", x[rows], targets[found])
    hit = cosine >= item["threshold"]
    rows, found, cosine = rows[hit], found[hit], cosine[hit]
    best = np.lexsort((-cosine, rows))  # per row: highest cosine first
    first = best[np.r_[True, rows[best][1:] != rows[best][:-1]]] if len(best) else best
    return pa.table(
        {
            "uid": uids.take(pa.array(rows[first], pa.int64())),
            "eval_index": pa.array(found[first], pa.int64()),
            "cosine": pa.array(cosine[first], pa.float64()),
        },
        MATCHES,
    )
