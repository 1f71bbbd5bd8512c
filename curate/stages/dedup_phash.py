"""Perceptual-hash dedup: downloaded images whose pHashes are a few bits apart are one group.

The dedup that needs no model: users without a GPU or CLIP weights can run it
right after the download (Data-Juicer's image deduplicator is its peer). Each
group keeps one survivor by the rule of the other dedup stages (highest
``score``, ``clip_score`` by default, then smallest uid; a row's neighbours are
the rows within ``max_distance`` bits, ``curate.dedup.phash``); every row of a
group records it in ``dup_group``, the others are dropped with ``dropped_by`` =
the stage's name. A row whose image cannot be decoded is not hashed: it stays,
counted as ``unhashed`` in the manifest.

The driver plans; the engine's tasks do the row work, in three rounds:

1. per ledger file: the pHash of each alive row's downloaded image (uid, score,
   phash), read from the file's own image shards; and its distinct hashes, once
   per band, split by a hash of the band's value;
2. per band and partition of its values: the distinct hashes that share the
   band's value, compared (``near_pairs``) → pairs within ``max_distance``;
3. one task: the rows whose hash is shared or in a pair, in survivor order,
   each absorbed by its best kept neighbour → the decisions (``_stats/``).

Round 3 holds the rows that have a near duplicate, not the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError, Range
from curate.core.layout import IMAGES
from curate.core.runfolder import scratch
from curate.core.stage import StageContext, register_stage
from curate.dedup.decided import DecidedStage
from curate.dedup.decisions import (
    PARENTS,
    alive_sql,
    final_decisions,
    read_tables,
    write_decisions,
)
from curate.dedup.phash import absorb_by_hash, bands, near_pairs, phashes
from curate.io.images import holding_images, images_by_file
from curate.io.stats import connect, partition_files, partitions_for, scatter, sql_paths

HASHES = pa.schema([("uid", pa.string()), ("score", pa.float32()), ("phash", pa.uint64())])
PAIRS = pa.schema([("a", pa.uint64()), ("b", pa.uint64())])
#: Images decoded and hashed at a time.
HASH_BATCH = 512


@register_stage("dedup_phash")
@dataclass
class PhashDedupStage(DecidedStage):
    """Rows whose images' pHashes are at most ``max_distance`` bits apart are one group."""

    max_distance: Annotated[int, Range(0, 16, why="bits of 64 that may differ")] = 2
    score: str = "clip_score"  # survivors rank by it (without clip_score: smallest uid)

    def columns_after(self, columns: set[str]) -> set[str]:
        if "status" not in columns:
            raise ConfigError(f"stage {self.name}: needs downloaded images (a download stage)")
        return super().columns_after(columns)

    def plan(self, ctx: StageContext) -> None:
        decided = self._decisions_dir()
        decided.mkdir()
        images = ctx.run_dir / IMAGES
        parts = partitions_for(ctx.input_files)
        with scratch(ctx.out_dir) as work:
            jobs = [
                (path, images, names, self.score, work, i, self.max_distance, parts)
                for i, (path, names) in enumerate(zip(ctx.input_files, images_by_file(images)))
            ]
            start = time.perf_counter()
            counted = self._map(ctx, _hash_file, jobs, "hash")
            hash_seconds = round(time.perf_counter() - start, 2)
            hashed = sorted((work / "hashes").glob("*.parquet"))
            jobs = [
                (partition_files(work / "bands" / str(band), part), self.max_distance, band,
                 work / "pairs" / f"{band}-{part}.parquet")
                for band in range(self.max_distance + 1)
                for part in range(parts)
            ]  # fmt: skip
            pairs = sum(self._map(ctx, _pairs_task, jobs, "compare"))
            job = (hashed, sorted((work / "pairs").glob("*.parquet")), decided)
            ((groups, dropped),) = self._map(ctx, _decide_task, [job], "groups")
        ctx.counters.update(
            hashed=sum(h for h, _ in counted),
            unhashed=sum(u for _, u in counted),
            hash_seconds=hash_seconds,
            near_pairs=pairs,
            groups=groups,
            dropped=dropped,
        )


def _hash_file(job: tuple[Path, Path, list[str], str, Path, int, int, int]) -> tuple[int, int]:
    """One ledger file's alive rows with an image: (uid, score, phash), and its distinct
    hashes split, band by band, by a hash of the band's value; (hashed, unhashed)."""
    path, images, names, score, work, index, max_distance, parts = job
    (work / "hashes").mkdir(parents=True, exist_ok=True)
    with connect() as con:
        alive = con.sql(alive_sql(path, score, where="status = 'success'")).to_arrow_table()
    found_rows, unhashed = [], 0
    for shard, column in holding_images(images, names):
        for batch in pq.ParquetFile(shard).iter_batches(HASH_BATCH, columns=["uid", column]):
            at = pc.index_in(batch["uid"], value_set=alive["uid"])
            found = at.is_valid()
            rows = alive.take(at.filter(found))
            codes, ok = phashes(batch[column].filter(found).to_pylist())
            unhashed += int((~ok).sum())
            table = rows.append_column("phash", pa.array(codes, pa.uint64()))
            found_rows.append(table.filter(pa.array(ok)).cast(HASHES))
    table = pa.concat_tables(found_rows) if found_rows else HASHES.empty_table()
    pq.write_table(table, work / "hashes" / f"{index:06d}.parquet")
    with connect() as con:
        con.register("hashes", table)
        for band, (shift, width) in enumerate(bands(max_distance)):
            value = f"((phash >> {shift}) & {(1 << width) - 1})"
            folder = work / "bands" / str(band) / f"{index:06d}"
            scatter(con, "SELECT DISTINCT phash FROM hashes", value, folder, parts)
    return table.num_rows, unhashed


def _pairs_task(job: tuple[list[Path], int, int, Path]) -> int:
    """The pairs within ``max_distance`` among the distinct hashes of one partition of
    ``band``'s values, found by that band first; how many."""
    files, max_distance, band, out = job
    if not files:
        return 0
    sql = f"SELECT DISTINCT phash FROM read_parquet({sql_paths(files)}, hive_partitioning = false)"
    with connect() as con:
        hashes = con.sql(sql).to_arrow_table()["phash"].to_numpy().astype(np.uint64)
    a, b = near_pairs(hashes, max_distance, band)
    if len(a):
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"a": a, "b": b}, PAIRS), out)
    return len(a)


def _decide_task(job: tuple[list[Path], list[Path], Path]) -> tuple[int, int]:
    """The rows with a near or equal hash, absorbed by the rule; (groups, rows dropped)."""
    files, pair_files, decided = job
    pairs = read_tables(pair_files, PAIRS).combine_chunks()
    with connect() as con:
        con.register("pairs", pairs)
        rows = f"read_parquet({sql_paths(files)})"
        involved = f"""
            SELECT phash FROM {rows} GROUP BY phash HAVING count(*) > 1
            UNION SELECT a FROM pairs UNION SELECT b FROM pairs
        """
        table = con.sql(
            f"SELECT uid, score, phash FROM {rows} WHERE phash IN ({involved})"
        ).to_arrow_table()
    edges = (pairs["a"].to_numpy(), pairs["b"].to_numpy())
    uids = table["uid"].to_pylist()
    scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    parent = absorb_by_hash(uids, scores, table["phash"].to_numpy(), edges)
    absorbed = pa.table({"uid": list(parent), "parent": list(parent.values())}, PARENTS)
    write_decisions(decided, "phash", *final_decisions(absorbed))
    return len(set(parent.values())), len(parent)
