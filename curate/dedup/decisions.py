"""What the dedup and decontamination stages share: who survives, group ids, decisions.

Each of those stages first decides which alive rows it drops, in engine tasks
that each write the decisions of their share of the work (a hash partition, a
bucket of clusters) as Parquet files (``write_decisions``); no row passes
through the driver. Then the decisions are applied to the ledger batch by batch:
every worker loads the files once (``read_decisions``). A decision table holds
only the rows it concerns (duplicates, contaminated rows), so it is small next
to the pool.

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

from curate.core.schema import alive_mask, set_column
from curate.io.stats import sql_name, sql_string
from curate.io.vectors import embedding_matrix

DECISIONS = pa.schema([("uid", pa.string()), ("dup_group", pa.int64()), ("drop", pa.bool_())])
REGROUP = pa.schema([("old", pa.int64()), ("new", pa.int64())])
PARENTS = pa.schema([("uid", pa.string()), ("parent", pa.string())])


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


def survivor_rank(uids: pa.Array, scores: pa.Array) -> np.ndarray:
    """Each row's place in the survivor order of all the given rows (0 = best)."""
    order = survivor_order(
        np.asarray(uids.to_pylist(), dtype=str),
        scores.to_numpy(zero_copy_only=False).astype(np.float64),
    )
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def alive_sql(path: Path, score: str, columns: tuple[str, ...] = (), where: str = "") -> str:
    """DuckDB SQL for one ledger file's alive rows: uid, score, then ``columns``.

    ``score`` is that column as FLOAT with NaN as null (null on every row when
    the file lacks it: survivors then rank by uid alone); ``where`` narrows the rows.
    """
    names = pq.read_schema(path).names
    value = "NULL::FLOAT"
    if score in names:
        quoted = sql_name(score)
        value = f"CASE WHEN isnan({quoted}::FLOAT) THEN NULL ELSE {quoted}::FLOAT END"
    select = ", ".join(["uid", f"{value} AS score", *map(sql_name, columns)])
    narrowed = f" AND ({where})" if where else ""
    return f"SELECT {select} FROM read_parquet({sql_string(path)}) WHERE keep{narrowed}"


def final_decisions(absorbed: pa.Table, moved: pa.Table | None = None) -> tuple[pa.Table, pa.Table]:
    """Decisions and group renames from who absorbed whom (``absorbed``: uid, parent).

    Each absorbed row is dropped into its absorber's group; each absorber is kept
    at the head of its own (the rule only ever absorbs into a kept row, so no
    absorber is itself in ``absorbed``). ``moved`` (uid, parent) lists absorbers
    that were absorbed elsewhere, into rows that stay (SemDeDup: survivors
    absorbed across clusters, decided by ``final_decisions(moved)``): the rows
    they absorbed follow them into the new head's group, and the decisions on
    the moved absorbers and their new heads are left to that other call, so each
    row is decided once, by whichever task holds it.
    """
    moved_to = {}
    if moved is not None:
        moved_to = dict(zip(moved["uid"].to_pylist(), moved["parent"].to_pylist()))
    heads_elsewhere = set(moved_to.values())
    uids, parents = absorbed["uid"].to_pylist(), absorbed["parent"].to_pylist()
    groups = [group_id(moved_to.get(p, p)) for p in parents]
    heads = sorted({p for p in parents if p not in moved_to and p not in heads_elsewhere})
    decisions = pa.table(
        {
            "uid": uids + heads,
            "dup_group": groups + [group_id(u) for u in heads],
            "drop": [True] * len(uids) + [False] * len(heads),
        },
        DECISIONS,
    )
    regroup = pa.table({"old": [group_id(u) for u in uids], "new": groups}, REGROUP)
    return decisions, regroup


def write_decisions(folder: Path, name: str, decisions: pa.Table, regroup: pa.Table) -> None:
    """One task's decisions and group renames, as ``folder/{decisions,regroup}/NAME.parquet``."""
    for kind, table in (("decisions", decisions), ("regroup", regroup)):
        if table.num_rows:
            (folder / kind).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, folder / kind / f"{name}.parquet")


def read_decisions(folder: Path) -> tuple[pa.Table, pa.Table]:
    """Every task's decisions and group renames under ``folder`` (``write_decisions``)."""
    decisions = read_tables(sorted((folder / "decisions").glob("*.parquet")), DECISIONS)
    regroup = read_tables(sorted((folder / "regroup").glob("*.parquet")), REGROUP)
    return decisions.combine_chunks(), regroup.combine_chunks()


def read_tables(files: list[Path], schema: pa.Schema) -> pa.Table:
    """Parquet files as one table of ``schema`` (empty without files)."""
    tables = [pq.read_table(f, schema=schema) for f in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_vectors(path: Path, column: str) -> tuple[pa.Array, np.ndarray]:
    """The uids of ``path`` that have a vector in ``column``, and those vectors."""
    table = pq.read_table(path, columns=["uid", column])
    table = table.filter(pc.is_valid(table[column]))
    return table["uid"].combine_chunks(), embedding_matrix(table[column])


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
