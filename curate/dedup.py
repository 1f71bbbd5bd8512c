"""What the dedup and decontamination stages share: who survives, group ids, decisions.

Each of those stages first decides, on the driver (with Ray tasks where the
work is large), which alive rows it drops, then applies the decisions to the
ledger batch by batch. A decision table holds only the rows it concerns
(duplicates, contaminated rows), so it is small next to the pool and travels
with the stage to every worker.

Survivor rule, everywhere: the highest score first (``clip_score`` unless the
stage's ``score`` names another column, e.g. DataComp's
``clip_l14_similarity_score``; null or NaN counts as lowest), then the
smallest uid.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip_model import embedding_matrix
from curate.schema import alive_mask, set_column

DECISIONS = pa.schema([("uid", pa.string()), ("dup_group", pa.int64()), ("drop", pa.bool_())])
REGROUP = pa.schema([("old", pa.int64()), ("new", pa.int64())])
ALIVE = pa.schema([("uid", pa.string()), ("score", pa.float32())])


def group_id(uid: str) -> int:
    """A duplicate group's id: a 63-bit hash of its survivor's uid.

    A hash of the whole uid, not a prefix: input uids may share prefixes
    (sequential ones do). Groups that later merge (an exact group's survivor
    absorbed by a semantic group) are renamed to the new survivor's id; the
    survivor of group ``g`` is its row with ``keep``.
    """
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def survivor_order(uids: list[str] | np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices that sort rows best first: highest score, null/NaN last, then smallest uid."""
    scores = np.asarray(scores, dtype=np.float64)
    missing = np.isnan(scores)
    return np.lexsort((np.asarray(uids, dtype=str), -np.where(missing, 0, scores), missing))


def alive_scores(files: list[Path], column: str = "clip_score") -> pa.Table:
    """uid and score (``column``; NaN as null; all null without the column) of each alive row."""
    parts = []
    for path in files:
        names = pq.read_schema(path).names
        columns = ["uid", "keep"] + ([column] if column in names else [])
        table = pq.read_table(path, columns=columns)
        table = table.filter(alive_mask(table))
        if column in names:
            score = table[column].cast(pa.float32())
            score = pc.if_else(pc.is_nan(score), pa.scalar(None, pa.float32()), score)
        else:
            score = pa.nulls(table.num_rows, pa.float32())
        parts.append(pa.table({"uid": table["uid"], "score": score}, schema=ALIVE))
    return pa.concat_tables(parts) if parts else ALIVE.empty_table()


def read_vectors(path: Path, column: str, wanted: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The uids of ``path`` that are in ``wanted`` and have a vector, and those vectors."""
    table = pq.read_table(path, columns=["uid", column])
    keep = pc.and_(pc.is_in(table["uid"], value_set=wanted), pc.is_valid(table[column]))
    table = table.filter(keep)
    return table["uid"].combine_chunks(), embedding_matrix(table[column])


def unit_rows(vectors: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows scaled to length 1 in ``dtype``; zero or non-finite rows become NaN (never match)."""
    x = np.asarray(vectors, dtype=dtype)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((norms > 0) & np.isfinite(norms), x / norms, np.nan)


def apply_decisions(
    batch: pa.Table, decisions: pa.Table, stage: str, regroup: pa.Table | None = None
) -> pa.Table:
    """Set ``dup_group`` and drop the alive rows ``decisions`` marks, reason ``stage``.

    ``regroup`` renames groups (old id → new id) on every row, dropped or not: when
    a survivor is itself absorbed, the rows it had absorbed follow it.
    """
    index = pc.index_in(batch["uid"], value_set=decisions["uid"])
    old = batch["dup_group"] if "dup_group" in batch.column_names else None
    old = pa.nulls(batch.num_rows, pa.int64()) if old is None else old.cast(pa.int64())
    renamed = old
    if regroup is not None and regroup.num_rows:
        renamed = pc.coalesce(regroup["new"].take(pc.index_in(old, value_set=regroup["old"])), old)
    batch = set_column(batch, "dup_group", pc.coalesce(decisions["dup_group"].take(index), renamed))
    marked = pc.fill_null(decisions["drop"].take(index), False).to_numpy(zero_copy_only=False)
    alive = alive_mask(batch)
    drop = alive & marked
    reason = pc.if_else(pa.array(drop), pa.scalar(stage), pa.scalar(None, pa.string()))
    batch = set_column(batch, "dropped_by", pc.coalesce(batch["dropped_by"], reason))
    return set_column(batch, "keep", pa.array(alive & ~drop))
