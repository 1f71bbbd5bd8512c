"""Deduplication stages: exact (same image bytes) and semantic (SemDeDup on image embeddings).

Both decide on the driver and apply batch by batch (see ``curate.dedup``).
Only alive rows take part. Each group of duplicates keeps one survivor —
highest ``clip_score``, then smallest uid — and every row of the group,
survivor included, records the group in ``dup_group``; the others are
dropped with ``dropped_by`` = the stage's name (``dedup_exact``,
``dedup_semantic`` by default).

``dedup_semantic`` reads the image embeddings of the clip stage
(``RUN/embeddings/``) or, for DataComp metadata, the ``.npz`` beside each
metadata parquet (``embeddings: l14`` reads ``l14_img``) without any model.
The pool is never held whole: k-means trains on a sample, rows are assigned
to centroids file by file, and clusters are deduplicated bucket by bucket —
Ray tasks on the ray engine, the same functions in-process otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import ConfigError, Count, Range
from curate.dedup import (
    DECISIONS,
    REGROUP,
    alive_scores,
    apply_decisions,
    group_id,
    survivor_order,
    unit_rows,
)
from curate.runfolder import scratch
from curate.semdedup import absorb_on_graph, absorbers, assign, pairs_between, train_centroids
from curate.stages.base import MapStage, StageContext, register_stage
from curate.stats import sql_paths
from curate.uids import uid_keys

#: Rows of the pool per bucket of clusters deduplicated by one task.
BUCKET_ROWS = 50_000
CLIP_EMBEDDINGS = "embeddings"
STATS = "_stats"


class DecidedStage(MapStage):
    """A stage whose ``plan`` leaves decisions that ``__call__`` applies to each batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_decisions(batch, self._decisions, self.name, getattr(self, "_regroup", None))

    def columns_after(self, columns: set[str]) -> set[str]:
        score = getattr(self, "score", "clip_score")
        if score != "clip_score" and score not in columns:
            raise ConfigError(f"stage {self.name}: no column {score!r} to rank survivors by")
        return columns | {"dup_group"}

    def _save(self, ctx: StageContext, **counters) -> None:
        stats = ctx.out_dir / STATS
        stats.mkdir(exist_ok=True)
        pq.write_table(self._decisions, stats / "decisions.parquet")
        dropped = int(pc.sum(self._decisions["drop"]).as_py() or 0)
        ctx.counters.update(counters, dropped=dropped)


@register_stage("dedup_exact")
@dataclass
class ExactDedupStage(DecidedStage):
    """Rows whose image sha256 is equal are one group; one survivor each."""

    score: str = "clip_score"  # survivors rank by it (without clip_score: smallest uid)

    def columns_after(self, columns: set[str]) -> set[str]:
        if "sha256" not in columns:
            raise ConfigError(
                f"stage {self.name}: exact dedup needs the images' sha256 (a download stage "
                "before it, or DataComp metadata with a sha256 column)"
            )
        return super().columns_after(columns)

    def plan(self, ctx: StageContext) -> None:
        dups = _same_sha256(ctx.input_files, self.score)
        sha = dups["sha256"].to_numpy(zero_copy_only=False)
        order = np.lexsort((survivor_rank(dups["uid"], dups["score"]), sha))
        sha, uids = sha[order], np.asarray(dups["uid"].to_pylist(), dtype=object)[order]
        starts = np.r_[True, sha[1:] != sha[:-1]] if len(sha) else np.zeros(0, bool)
        survivor = uids[np.maximum.accumulate(np.where(starts, np.arange(len(sha)), 0))]
        parents = pa.table({"uid": uids[~starts], "parent": survivor[~starts]}, _PARENTS)
        self._decisions, self._regroup = _final_decisions(parents)
        self._save(ctx, groups=int(starts.sum()), rows_in_groups=len(uids))


def survivor_rank(uids: pa.Array, scores: pa.Array) -> np.ndarray:
    """Each row's place in the survivor order of all the given rows (0 = best)."""
    order = survivor_order(
        np.asarray(uids.to_pylist(), dtype=str),
        scores.to_numpy(zero_copy_only=False).astype(np.float64),
    )
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _same_sha256(files: list[Path], column: str) -> pa.Table:
    """uid, sha256, score of the alive rows whose sha256 another alive row shares."""
    schema = pa.schema([("uid", pa.string()), ("sha256", pa.string()), ("score", pa.float32())])
    if not files:
        return schema.empty_table()
    score = "NULL::FLOAT"
    if column in pq.read_schema(files[0]).names:
        name = '"' + column.replace('"', '""') + '"'
        score = f"CASE WHEN isnan({name}::FLOAT) THEN NULL ELSE {name}::FLOAT END"
    sql = f"""
        WITH alive AS (
            SELECT uid, sha256, {score} AS score FROM read_parquet({sql_paths(files)})
            WHERE keep AND sha256 IS NOT NULL AND sha256 <> ''
        )
        SELECT uid, sha256, score FROM alive
        WHERE sha256 IN (SELECT sha256 FROM alive GROUP BY sha256 HAVING count(*) > 1)
    """
    with duckdb.connect() as con:
        return con.sql(sql).to_arrow_table().cast(schema)


@register_stage("dedup_semantic")
@dataclass
class SemanticDedupStage(DecidedStage):
    """SemDeDup: within k-means clusters of image embeddings, drop rows with cosine > 1 − ε."""

    epsilon: Annotated[
        float, Range(0, 2, low_open=True, high_open=True, why="drop when cosine > 1 - epsilon")
    ] = 0.05
    clusters: Count | None = None  # k; default: one per 1,000 alive rows
    sample_per_cluster: Count = 100  # k-means trains on up to clusters × this many rows
    iterations: Count = 20
    embeddings: str = "auto"  # "clip" (RUN/embeddings), a DataComp .npz prefix (l14, b32)
    score: str = "clip_score"  # survivors rank by it (without clip_score: smallest uid)

    def columns_after(self, columns: set[str]) -> set[str]:
        if self.embeddings == "clip" and "clip_score" not in columns:
            raise ConfigError(
                f"stage {self.name}: `embeddings: clip` needs a clip stage before it "
                "(or `embeddings: l14` for DataComp metadata's .npz embeddings)"
            )
        return super().columns_after(columns)

    def plan(self, ctx: StageContext) -> None:
        with scratch(ctx.out_dir) as work:
            self._decide(ctx, work)

    def _decide(self, ctx: StageContext, work: Path) -> None:
        progress = ctx.progress
        clock = _Clock()
        alive = alive_scores(ctx.input_files, self.score)
        pq.write_table(alive, work / "alive.parquet")
        files, column, source = self._vector_files(ctx, work)
        clock.lap("read")
        k = self.clusters or max(1, round(alive.num_rows / 1000))
        sample_size = min(alive.num_rows, k * self.sample_per_cluster)
        pq.write_table(pa.table({"uid": hashed_sample(alive["uid"], sample_size, ctx.seed)}),
                       work / "sample.parquet")  # fmt: skip
        jobs = [{"path": str(f), "column": column, "alive": str(work / "alive.parquet"),
                 "sample": str(work / "sample.parquet"),
                 "out": str(work / "vectors" / f"part-{i:05d}.arrow")}
                for i, f in enumerate(files)]  # fmt: skip
        (work / "vectors").mkdir()
        sample = _sorted_sample(
            ctx.engine.map_items(_stage_task, jobs, f"{self.name}: read", progress)
        )
        if not len(sample):  # no alive row has a usable embedding: nothing to compare
            self._decisions, self._regroup = DECISIONS.empty_table(), REGROUP.empty_table()
            self._save(ctx, embeddings=source, clusters=0, embedded=0, no_embedding=alive.num_rows)
            return
        centroids = train_centroids(sample, k, self.iterations, ctx.seed)
        np.save(work / "centroids.npy", centroids)
        clock.lap("kmeans")
        buckets = max(1, min(len(centroids), math.ceil(alive.num_rows / BUCKET_ROWS)))
        jobs = [
            {"path": job["out"], "centroids": str(work / "centroids.npy"), "buckets": buckets,
             "out": str(work / "buckets"), "part": i}
            for i, job in enumerate(jobs)
        ]  # fmt: skip
        embedded = sum(ctx.engine.map_items(_assign_task, jobs, f"{self.name}: assign", progress))
        clock.lap("assign")
        threshold = 1.0 - self.epsilon
        folders = sorted((work / "buckets").glob("*")) if embedded else []
        jobs = [{"dir": str(d), "threshold": threshold, "buckets": buckets,
                 "out": str(work / "survivors")} for d in folders]  # fmt: skip
        done = ctx.engine.map_items(_bucket_task, jobs, f"{self.name}: within clusters", progress)
        parents = pa.concat_tables([p for p, _ in done] or [_PARENTS.empty_table()])
        clusters = pa.concat_tables([c for _, c in done] or [_CLUSTERS.empty_table()])
        clock.lap("within_clusters")
        folders = sorted((work / "survivors").glob("*")) if len(centroids) > 1 else []
        jobs = [{"dir": str(d), "threshold": threshold} for d in folders]
        edges = ctx.engine.map_items(_cross_task, jobs, f"{self.name}: across clusters", progress)
        crossed = _absorb_across(pa.concat_tables(edges or [_EDGES.empty_table()]), alive)
        self._decisions, self._regroup = _final_decisions(parents, crossed)
        clock.lap("across_clusters")
        self._save(
            ctx,
            embeddings=source,
            clusters=len(centroids),
            sample=len(sample),
            embedded=embedded,
            no_embedding=alive.num_rows - embedded,
            groups=int(pc.count_distinct(self._decisions["dup_group"]).as_py()),
            dropped_across_clusters=crossed.num_rows,
            largest_cluster=int(pc.max(clusters["rows"]).as_py() or 0),
            seconds=clock.laps,
        )
        pq.write_table(clusters.sort_by("cluster"), ctx.out_dir / STATS / "clusters.parquet")
        np.save(ctx.out_dir / STATS / "centroids.npy", centroids)

    def _vector_files(self, ctx: StageContext, work: Path) -> tuple[list[Path], str, str]:
        """Parquet files of (uid, vector) to read, the vector column, and where they came from."""
        from curate.datacomp import MANIFEST, read_npz_embeddings

        source = self.embeddings
        clip_files = sorted((ctx.run_dir / CLIP_EMBEDDINGS).glob("*.parquet"))
        has_clip = ctx.input_schema is not None and "clip_score" in ctx.input_schema.names
        if source == "auto":
            if has_clip and clip_files:
                source = "clip"
            elif ctx.ingest_dir is not None and (ctx.ingest_dir / MANIFEST).is_file():
                source = "l14"
            else:
                raise ConfigError(
                    f"stage {self.name}: no image embeddings: run a clip stage before it, or "
                    "ingest DataComp metadata with its .npz files"
                )
        if source == "clip":
            return clip_files, "image_embedding", source
        folder = work / "npz"
        folder.mkdir()
        files = []
        for i, table in enumerate(read_npz_embeddings(ctx.ingest_dir, f"{source}_img")):
            files.append(folder / f"part-{i:05d}.arrow")
            _write_arrow(table, files[-1])
        return files, "embedding", f"{source}_img"


class _Clock:
    """Seconds per phase of a stage, for its manifest."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 2)
        self._last = now


_CLUSTERS = pa.schema([("cluster", pa.int32()), ("rows", pa.int64()), ("dropped", pa.int64())])
_PARENTS = pa.schema([("uid", pa.string()), ("parent", pa.string())])
_EDGES = pa.schema([("a", pa.string()), ("b", pa.string())])


def hashed_sample(uids: pa.Array, size: int, seed: int) -> pa.Array:
    """``size`` uids chosen by a seeded hash of each uid: the same rows whatever the file order."""
    if size >= len(uids):
        return uids
    keys = uid_keys(uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids)
    keys = (keys ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) * np.uint64(0xBF58476D1CE4E5B9)
    return uids.take(pa.array(np.argpartition(keys, size - 1)[:size]))


def _sorted_sample(parts: list[tuple[list[str], np.ndarray]]) -> np.ndarray:
    """The sample's unit vectors in uid order (so k-means sees the same input every time)."""
    uids = [u for p, _ in parts for u in p]
    if not uids:
        return np.zeros((0, 1), np.float32)
    vectors = np.concatenate([v for _, v in parts])[np.argsort(np.asarray(uids, dtype=str))]
    x = unit_rows(vectors, np.float32)
    return x[np.isfinite(x).all(axis=1)]


def _write_arrow(table: pa.Table, path: Path) -> None:
    """Work files are Arrow IPC: vectors go to disk and back as raw buffers (Parquet's nested
    encoding of a fixed_size_list took most of the stage's time)."""
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(*paths: Path) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_file(p).read_all() for p in paths)


def _read_source(path: Path, column: str) -> pa.Table:
    if path.suffix == ".arrow":
        return _read_arrow(path).select(["uid", column])
    return pq.read_table(path, columns=["uid", column])


def _stage_task(item: dict) -> tuple[list[str], np.ndarray]:
    """One source file's alive rows with a vector → a work file (uid, score, vector);
    returns the uids and vectors of its rows in the k-means sample."""
    from curate.clip_model import embedding_matrix

    alive = pq.read_table(item["alive"])
    table = _read_source(Path(item["path"]), item["column"])
    index = pc.index_in(table["uid"], value_set=alive["uid"])
    keep = pc.and_(pc.is_valid(index), pc.is_valid(table[item["column"]]))
    table, index = table.filter(keep), index.filter(keep)
    table = pa.table(
        {"uid": table["uid"], "score": alive["score"].take(index), "vector": table[item["column"]]}
    )
    _write_arrow(table, Path(item["out"]))
    sampled = table.filter(pc.is_in(table["uid"], value_set=pq.read_table(item["sample"])["uid"]))
    return sampled["uid"].to_pylist(), embedding_matrix(sampled["vector"])


def _assign_task(item: dict) -> int:
    """Assign one work file's rows to clusters; write them to their bucket's folder."""
    from curate.clip_model import embedding_matrix

    table = _read_arrow(Path(item["path"]))
    if not table.num_rows:
        return 0
    first, second = assign(unit_rows(embedding_matrix(table["vector"]), np.float32),
                           np.load(item["centroids"]))  # fmt: skip
    table = table.append_column("cluster", pa.array(first, pa.int32()))
    table = table.append_column("second", pa.array(second, pa.int32()))
    _write_buckets(table, first, item["buckets"], Path(item["out"]), f"part-{item['part']:05d}")
    return table.num_rows


def _write_buckets(table: pa.Table, cluster: np.ndarray, buckets: int, out: Path, name: str):
    """Rows into ``out/<cluster % buckets>/name.parquet``: a bucket's clusters, from every file."""
    bucket = cluster % buckets
    for b in np.unique(bucket):
        folder = out / f"{b:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_arrow(table.filter(pa.array(bucket == b)), folder / f"{name}.arrow")


def _bucket_task(item: dict) -> tuple[pa.Table, pa.Table]:
    """Deduplicate every cluster of one bucket: who absorbed whom, and per-cluster counts.

    The survivors go on to the cross-cluster pass, each twice: at home (its
    cluster) and as a guest in its second-nearest cluster (``at``).
    """
    from curate.clip_model import embedding_matrix

    table = _read_arrow(*sorted(Path(item["dir"]).glob("*.arrow")))
    cluster = table["cluster"].to_numpy()
    order = np.lexsort((survivor_rank(table["uid"], table["score"]), cluster))
    table, cluster = table.take(pa.array(order)), cluster[order]
    uids = table["uid"].to_pylist()
    ids, starts, sizes = np.unique(cluster, return_index=True, return_counts=True)
    kept = np.ones(len(uids), bool)
    absorbed, absorber, dropped = [], [], []
    for start, size in zip(starts, sizes):
        x = unit_rows(embedding_matrix(table["vector"].slice(start, size)))
        parent = absorbers(x, item["threshold"])
        for j in np.flatnonzero(parent >= 0):
            absorbed.append(uids[start + j])
            absorber.append(uids[start + parent[j]])
        kept[start : start + size] = parent < 0
        dropped.append(int((parent >= 0).sum()))
    survivors = table.filter(pa.array(kept))
    second = survivors["second"].to_numpy()
    name = Path(item["dir"]).name
    for role, at in (("home", survivors["cluster"].to_numpy()), ("guest", second)):
        rows = survivors.append_column("at", pa.array(at, pa.int32())).filter(pa.array(at >= 0))
        _write_buckets(rows, at[at >= 0], item["buckets"], Path(item["out"]), f"{role}-{name}")
    parents = pa.table({"uid": absorbed, "parent": absorber}, _PARENTS)
    return parents, pa.table({"cluster": ids, "rows": sizes, "dropped": dropped}, _CLUSTERS)


def _cross_task(item: dict) -> pa.Table:
    """Pairs too close across a cluster boundary: in each cluster, guests against the home
    survivors and against each other (guests from different clusters)."""
    from curate.clip_model import embedding_matrix

    table = _read_arrow(*sorted(Path(item["dir"]).glob("*.arrow")))
    edges_a, edges_b = [], []
    at = table["at"].to_numpy()
    for c in np.unique(at):
        here = table.filter(pa.array(at == c))
        home = here["cluster"].to_numpy()
        uids = np.asarray(here["uid"].to_pylist(), dtype=object)
        x = unit_rows(embedding_matrix(here["vector"]))
        guests, hosts = np.flatnonzero(home != c), np.flatnonzero(home == c)
        if not len(guests):
            continue
        i, j = pairs_between(x[guests], x[hosts], item["threshold"])
        edges_a += list(uids[guests[i]])
        edges_b += list(uids[hosts[j]])
        i, j = pairs_between(x[guests], x[guests], item["threshold"])
        apart = home[guests[i]] != home[guests[j]]
        i, j = i[apart & (i < j)], j[apart & (i < j)]
        edges_a += list(uids[guests[i]])
        edges_b += list(uids[guests[j]])
    return pa.table({"a": edges_a, "b": edges_b}, _EDGES)


def _absorb_across(edges: pa.Table, alive: pa.Table) -> pa.Table:
    """Survivors absorbed by a survivor of another cluster (the rule, on the pairs found)."""
    pairs = sorted(set(zip(edges["a"].to_pylist(), edges["b"].to_pylist())))
    nodes = pa.array(sorted({u for pair in pairs for u in pair}), pa.string())
    if not len(nodes):
        return _PARENTS.empty_table()
    scores = alive["score"].take(pc.index_in(nodes, value_set=alive["uid"]))
    order = np.asarray(nodes.to_pylist(), dtype=object)[np.argsort(survivor_rank(nodes, scores))]
    parent = absorb_on_graph(list(order), pairs)
    return pa.table({"uid": list(parent), "parent": list(parent.values())}, _PARENTS)


def _final_decisions(*parents: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Decisions and group renames from who absorbed whom (a row follows its absorber).

    A row absorbed within its cluster by a survivor that was itself absorbed
    across clusters joins the final survivor's group.
    """
    absorbed_by: dict[str, str] = {}
    for table in parents:
        absorbed_by.update(zip(table["uid"].to_pylist(), table["parent"].to_pylist()))

    def final(uid: str) -> str:
        while uid in absorbed_by:
            uid = absorbed_by[uid]
        return uid

    survivors = sorted({final(u) for u in absorbed_by})
    uids = list(absorbed_by) + survivors
    groups = [group_id(final(u)) for u in uids]
    decisions = pa.table(
        {
            "uid": uids,
            "dup_group": groups,
            "drop": [True] * len(absorbed_by) + [False] * len(survivors),
        },
        DECISIONS,
    )
    old = [group_id(u) for u in absorbed_by]
    regroup = pa.table({"old": old, "new": groups[: len(absorbed_by)]}, REGROUP)
    return decisions, regroup
