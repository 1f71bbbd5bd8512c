"""Decontamination: drop pool rows whose image is (nearly) an image of the evaluation set.

A model evaluated on pictures it was trained on scores too well. The stage
embeds the evaluation set with the model that embedded the pool (the clip
stage's, from ``embeddings/_model.json``, unless ``model`` / ``pretrained``
say otherwise), puts the vectors in a FAISS inner-product index, and drops
every alive row whose image embedding has cosine >= ``threshold`` with some
evaluation image (``dropped_by`` = the stage's name, ``decontaminate``).
Cosines are screened in float32 and decided in float64, as in SemDeDup.

The driver holds the evaluation set, never the pool: a task per embeddings
file matches its rows where they lie, and tasks per hash partition of the uid
keep the matches of rows still alive (a join with the ledger's alive uids) and
write the decisions that every worker then applies (``curate.dedup.decisions``).

``eval_set`` is a folder of images, a Parquet file of images (a binary
column: ``image``, ``jpg``, ``png`` or ``webp``), or a Parquet file of
precomputed vectors (an ``image_embedding`` or ``embedding`` column, already
from the pool's model). A relative path is taken from the folder of the run's
input first: the demo pool's held-out set is ``eval_set: eval``.

``_stats/contaminated.parquet`` lists each dropped row with the evaluation
item it matched and their cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip.pool import set_vectors
from curate.core.config import ConfigError, Range
from curate.core.layout import EMBEDDINGS
from curate.core.runfolder import scratch
from curate.core.stage import StageContext, register_stage
from curate.dedup.decided import ALIVE, DecidedStage, scatter_alive
from curate.dedup.decisions import (
    DECISIONS,
    REGROUP,
    read_tables,
    read_vectors,
    write_decisions,
)
from curate.dedup.semdedup import SCREEN
from curate.io.image_sets import find_beside_input
from curate.io.stats import connect, partition_files, partitions_for, scatter, write_query
from curate.io.vectors import unit_rows

MATCHES = pa.schema([("uid", pa.string()), ("eval_index", pa.int64()), ("cosine", pa.float64())])
FOUND = pa.schema([("uid", pa.string()), ("eval_item", pa.string()), ("cosine", pa.float64())])


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
        decided = self._decisions_dir()
        decided.mkdir()
        with scratch(ctx.out_dir) as work:
            self._decide(ctx, work, decided)

    def _decide(self, ctx: StageContext, work: Path, decided: Path) -> None:
        """Every vector file matched against the evaluation set where it lies, then the
        matches of alive rows kept by a join with the ledger by uid partition (only the
        matches move, never a vector): all in tasks."""
        names, vectors = self._eval_vectors(ctx, work)
        np.save(work / "eval.npy", unit_rows(vectors, np.float64))
        pq.write_table(pa.table({"eval_item": pa.array(names, pa.string())}), work / "names.pq")
        parts = partitions_for(ctx.input_files)
        files = enumerate(sorted((ctx.run_dir / EMBEDDINGS).glob("*.parquet")))
        jobs = [{"path": f, "eval": work / "eval.npy", "threshold": self.threshold,
                 "out": work / "matches" / f"{i:06d}", "parts": parts}
                for i, f in files]  # fmt: skip
        self._map(ctx, _match_task, jobs, "match")
        files = enumerate(ctx.input_files)
        jobs = [(f, "clip_score", work / "alive" / f"{i:06d}", parts) for i, f in files]
        self._map(ctx, scatter_alive, jobs, "alive rows")
        jobs = [{"matches": partition_files(work / "matches", p),
                 "alive": partition_files(work / "alive", p), "names": work / "names.pq",
                 "out": work / "found" / f"part-{p:05d}.parquet", "decided": decided}
                for p in range(parts)]  # fmt: skip
        found = self._map(ctx, _alive_matches, jobs, "alive matches")
        listing = (sorted((work / "found").glob("*.parquet")), decided / "contaminated.parquet")
        self._map(ctx, _list_matches, [listing], "list")
        ctx.counters.update(
            eval_images=len(names),
            eval_items_matched=len(set().union(*(items for _, items in found))),
            dropped=sum(rows for rows, _ in found),
        )

    def _eval_vectors(self, ctx: StageContext, work: Path) -> tuple[list[str], np.ndarray]:
        """The evaluation set's names and image vectors (embedded here when they are images)."""
        who = f"stage {self.name}"
        try:
            path = find_beside_input(self.eval_set, ctx.input_path)
        except ConfigError as exc:
            raise ConfigError(f"{who}: eval_set: {exc}") from exc
        names, vectors, unusable = set_vectors(
            path, work / "embed", ctx.engine, who=who, what="eval_set", run_dir=ctx.run_dir,
            model=self.model, pretrained=self.pretrained,
        )  # fmt: skip
        ctx.counters["eval_unusable"] = unusable
        return names, vectors


def _match_task(item: dict) -> None:
    """Every row of one embeddings file within ``threshold`` of an evaluation image (alive or
    not: the ledger decides that later), split by the uid's hash."""
    import faiss

    targets = np.load(item["eval"])
    uids, vectors = read_vectors(item["path"], "image_embedding")
    x = unit_rows(vectors, np.float64)
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
    matches = pa.table(
        {
            "uid": uids.take(pa.array(rows[first], pa.int64())),
            "eval_index": pa.array(found[first], pa.int64()),
            "cosine": pa.array(cosine[first], pa.float64()),
        },
        MATCHES,
    )
    with connect() as con:
        con.register("matches", matches)
        scatter(con, "SELECT * FROM matches", "uid", item["out"], item["parts"])


def _alive_matches(job: dict) -> tuple[int, list[str]]:
    """One partition's matches of alive rows: their decisions, and the rows for the listing
    (``found``); returns how many, and which evaluation items they match."""
    alive = read_tables(job["alive"], ALIVE)["uid"]
    matches = read_tables(job["matches"], MATCHES)
    matches = matches.filter(pc.is_in(matches["uid"], value_set=alive))
    names = pq.read_table(job["names"])["eval_item"]
    job["out"].parent.mkdir(exist_ok=True)
    found = pa.table(
        [matches["uid"], names.take(matches["eval_index"]), matches["cosine"]], schema=FOUND
    )
    pq.write_table(found, job["out"])
    n = matches.num_rows
    decisions = pa.table(
        {"uid": matches["uid"], "dup_group": pa.nulls(n, pa.int64()), "drop": [True] * n},
        DECISIONS,
    )
    write_decisions(job["decided"], job["out"].stem, decisions, REGROUP.empty_table())
    return n, sorted(set(found["eval_item"].to_pylist()))


def _list_matches(job: tuple[list[Path], Path]) -> None:
    """``contaminated.parquet``: every dropped row with the evaluation item it matched."""
    files, out = job
    write_query("SELECT * FROM {files} ORDER BY uid", files, out, FOUND.empty_table())
