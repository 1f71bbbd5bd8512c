"""Deduplication stages: exact (same image bytes) and semantic (SemDeDup on image embeddings).

Only alive rows take part. Each group of duplicates keeps one survivor —
highest ``clip_score``, then smallest uid — and every row of the group,
survivor included, records the group in ``dup_group``; the others are
dropped with ``dropped_by`` = the stage's name (``dedup_exact``,
``dedup_semantic`` by default).

The driver plans and the engine's tasks do every row's work: the driver holds
file lists, counts, per-cluster sizes and SemDeDup's centroids, never rows.
The tasks write the decisions under ``_stats/`` (``curate.dedup.decisions``); each
worker loads them once and applies them to the ledger batch by batch.

``dedup_exact``, two rounds of tasks (the partial → partition pattern of
``curate.io.stats``):

1. per ledger file: its alive rows with a sha256 (uid, sha256, score), split by
   a hash of the sha256;
2. per partition: the sha256s more than one row shares, their survivors, the
   decisions.

``dedup_semantic`` reads the image embeddings of the clip stage
(``RUN/embeddings/``) or, for DataComp metadata, the ``.npz`` beside each
metadata parquet (``embeddings: l14`` reads ``l14_img``) without any model.
The pool is never held whole; its rounds of tasks:

1. per ledger file, its alive (uid, score); per vector source, its (uid,
   vector); both split by a hash of the uid, so a row's score and vector meet
   in one partition;
2. per partition: the two joined into a work file (uid, score, vector); its
   k-means candidates set aside (``sample_cut``);
3. one task: k-means on the sample → ``_stats/centroids.npy``;
4. per work file: each row's nearest and second-nearest centroid; the rows go
   to the bucket of their cluster (cluster mod buckets);
5. per bucket: SemDeDup within each of its clusters → who absorbed whom; the
   survivors go on, each to its own cluster and, as a guest, to its
   second-nearest;
6. per bucket: the pairs too close across a cluster boundary → edges, with
   their rows' scores;
7. one task: the rule on the graph of those edges → the survivors absorbed
   across clusters, and the decisions on them and their absorbers;
8. per bucket: the decisions on its rows; a row whose absorber was absorbed
   in 7 follows it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError, Count, Range
from curate.core.runfolder import scratch
from curate.core.stage import StageContext, register_stage
from curate.dedup.decided import ALIVE, DecidedStage, scatter_alive
from curate.dedup.decisions import (
    PARENTS,
    alive_sql,
    final_decisions,
    read_tables,
    survivor_order,
    survivor_rank,
    write_decisions,
)
from curate.dedup.semdedup import absorb_on_graph, absorbers, assign, pairs_between, train_centroids
from curate.io.stats import connect, partition_files, partitions_for, scatter, sql_paths
from curate.io.uids import hashed_sample, sample_keys
from curate.io.vector_sources import read_vector_source, vector_sources
from curate.io.vectors import embedding_matrix, unit_rows

#: Rows of the pool per bucket of clusters deduplicated by one task.
BUCKET_ROWS = 50_000


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
        decided = self._decisions_dir()
        decided.mkdir()
        parts = partitions_for(ctx.input_files)
        with scratch(ctx.out_dir) as work:
            files = enumerate(ctx.input_files)
            jobs = [(f, self.score, work / f"{i:06d}", parts) for i, f in files]
            self._map(ctx, _scatter_hashes, jobs, "hash")
            jobs = [(partition_files(work, p), decided, f"part-{p:05d}") for p in range(parts)]
            done = self._map(ctx, _exact_groups, jobs, "groups")
        for counter in ("groups", "rows_in_groups", "dropped"):
            ctx.counters[counter] = sum(d[counter] for d in done)


def _scatter_hashes(job: tuple[Path, str, Path, int]) -> None:
    """One ledger file's alive rows with a sha256 (uid, sha256, score), split by the sha256."""
    path, score, folder, parts = job
    with connect() as con:
        scatter(con, alive_sql(path, score, ("sha256",), "sha256 <> ''"), "sha256", folder, parts)


def _exact_groups(job: tuple[list[Path], Path, str]) -> dict[str, int]:
    """One partition's groups of rows that share a sha256: the best of each survives."""
    files, decided, name = job
    dups = _same_sha256(files)
    sha = dups["sha256"].to_numpy(zero_copy_only=False)
    order = np.lexsort((survivor_rank(dups["uid"], dups["score"]), sha))
    sha, uids = sha[order], np.asarray(dups["uid"].to_pylist(), dtype=object)[order]
    starts = np.r_[True, sha[1:] != sha[:-1]] if len(sha) else np.zeros(0, bool)
    survivor = uids[np.maximum.accumulate(np.where(starts, np.arange(len(sha)), 0))]
    parents = pa.table({"uid": uids[~starts], "parent": survivor[~starts]}, PARENTS)
    write_decisions(decided, name, *final_decisions(parents))
    return {"groups": int(starts.sum()), "rows_in_groups": len(uids), "dropped": parents.num_rows}


def _same_sha256(files: list[Path]) -> pa.Table:
    """uid, sha256, score of the rows in ``files`` whose sha256 another of them shares."""
    schema = pa.schema([("uid", pa.string()), ("sha256", pa.string()), ("score", pa.float32())])
    if not files:
        return schema.empty_table()
    rows = f"read_parquet({sql_paths(files)}, hive_partitioning = false)"
    sql = f"""
        SELECT uid, sha256, score FROM {rows}
        WHERE sha256 IN (SELECT sha256 FROM {rows} GROUP BY sha256 HAVING count(*) > 1)
    """
    with connect() as con:
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
        decided = self._decisions_dir()
        decided.mkdir()
        with scratch(ctx.out_dir) as work:
            self._decide(ctx, work, decided)

    def _decide(self, ctx: StageContext, work: Path, decided: Path) -> None:
        clock = _Clock()
        sources, embeddings = self._vector_sources(ctx)
        parts = partitions_for(ctx.input_files)
        alive = self._scatter(ctx, work, sources, parts)
        k = self.clusters or max(1, round(alive / 1000))
        size = min(alive, k * self.sample_per_cluster)
        embedded = self._join(ctx, work, parts, sample_cut(size, alive))
        clock.lap("read")
        job = {"dir": work / "sample", "size": size, "k": k, "iterations": self.iterations,
               "seed": ctx.seed, "out": decided / "centroids.npy"}  # fmt: skip
        ((clusters, sample),) = self._map(ctx, _kmeans_task, [job], "k-means")
        clock.lap("kmeans")
        ctx.counters.update(embeddings=embeddings, clusters=clusters, sample=sample,
                            embedded=embedded, no_embedding=alive - embedded)  # fmt: skip
        if not clusters:  # no alive row has a usable embedding: nothing to compare
            ctx.counters.update(dropped=0)
            return
        buckets = max(1, min(clusters, math.ceil(alive / BUCKET_ROWS)))
        jobs = [{"path": f, "centroids": decided / "centroids.npy", "buckets": buckets,
                 "out": work / "buckets"}
                for f in sorted((work / "joined").glob("*.arrow"))]  # fmt: skip
        self._map(ctx, _assign_task, jobs, "assign")
        clock.lap("assign")
        threshold = 1.0 - self.epsilon
        folders = sorted((work / "buckets").glob("*"))
        jobs = [{"dir": d, "threshold": threshold, "buckets": buckets, "out": work / "survivors",
                 "parents": work / "parents" / f"{d.name}.parquet"} for d in folders]  # fmt: skip
        sizes = pa.concat_tables(self._map(ctx, _bucket_task, jobs, "within clusters"))
        clock.lap("within_clusters")
        across, dropped, groups = self._decide_across(ctx, work, decided, clusters, threshold)
        clock.lap("across_clusters")
        ctx.counters.update(
            groups=groups,
            dropped_across_clusters=across,
            largest_cluster=int(pc.max(sizes["rows"]).as_py() or 0),
            seconds=clock.laps,
            dropped=dropped,
        )
        pq.write_table(sizes.sort_by("cluster"), decided / "clusters.parquet")

    def _scatter(self, ctx: StageContext, work: Path, sources: list[dict], parts: int) -> int:
        """Round 1: alive (uid, score) and (uid, vector) split by uid; returns the alive rows."""
        jobs = [(f, self.score, work / "alive" / f"{i:06d}", parts)
                for i, f in enumerate(ctx.input_files)]  # fmt: skip
        alive = sum(self._map(ctx, scatter_alive, jobs, "alive rows"))
        jobs = [{"source": s, "out": work / "vectors" / f"{i:06d}", "parts": parts}
                for i, s in enumerate(sources)]  # fmt: skip
        self._map(ctx, _scatter_vectors, jobs, "vectors")
        return alive

    def _join(self, ctx: StageContext, work: Path, parts: int, cut: int | None) -> int:
        """Round 2: work files of the alive rows with a vector, and the k-means candidates;
        returns how many rows have a vector."""
        jobs = [
            {"alive": partition_files(work / "alive", p),
             "vectors": sorted((work / "vectors").glob(f"*/part={p}/*.arrow")),
             "seed": ctx.seed, "cut": cut, "out": work / "joined" / f"part-{p:05d}.arrow",
             "sample": work / "sample" / f"part-{p:05d}.arrow"}
            for p in range(parts)
        ]  # fmt: skip
        return sum(self._map(ctx, _join_task, jobs, "join"))

    def _decide_across(
        self, ctx: StageContext, work: Path, decided: Path, clusters: int, threshold: float
    ) -> tuple[int, int, int]:
        """Rounds 6 to 8: pairs across cluster boundaries, the rule on their graph, and every
        bucket's decisions; returns (rows dropped across clusters, rows dropped, groups)."""
        folders = sorted((work / "survivors").glob("*")) if clusters > 1 else []
        jobs = [{"dir": d, "threshold": threshold, "out": work / "edges" / f"{d.name}.parquet"}
                for d in folders]  # fmt: skip
        self._map(ctx, _cross_task, jobs, "across clusters")
        crossed = work / "crossed.parquet"
        job = {"edges": work / "edges", "out": crossed, "decided": decided}
        ((across, heads),) = self._map(ctx, _across_task, [job], "absorb across")
        jobs = [{"parents": f, "crossed": crossed, "decided": decided}
                for f in sorted((work / "parents").glob("*.parquet"))]  # fmt: skip
        done = self._map(ctx, _final_task, jobs, "decisions")
        return across, across + sum(d for d, _ in done), heads + sum(h for _, h in done)

    def _vector_sources(self, ctx: StageContext) -> tuple[list[dict], str]:
        """What each vector-reading task reads (``read_vector_source``), and what the vectors
        are (for the manifest)."""
        has_clip = ctx.input_schema is not None and "clip_score" in ctx.input_schema.names
        who = f"stage {self.name}"
        return vector_sources(self.embeddings, who, ctx.run_dir, ctx.ingest_dir, has_clip)


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
_EDGES = pa.schema(
    [("a", pa.string()), ("a_score", pa.float32()), ("b", pa.string()), ("b_score", pa.float32())]
)


#: The k-means candidates exceed the sample by this many standard deviations, and more.
SAMPLE_MARGIN = 8
SAMPLE_SLACK = 64


def sample_cut(size: int, rows: int) -> int | None:
    """The key below which a row is a k-means candidate (None: every row is one).

    The sample is what it always was: the ``size`` rows of smallest seeded key
    (``hashed_sample``), whatever the engine or file order. Finding them takes
    no gather of keys: each join task sets aside its rows whose key is below
    this cut, and the k-means task keeps the ``size`` smallest of those. Keys of
    distinct uids are spread evenly, so the candidates number about
    ``size + 8·√size + 64`` (binomial: they fall short of ``size`` with odds
    below 10^-15; then k-means trains on them all, still the same rows on every
    engine). An exact cut (a histogram of the keys, then a second pass) would
    cost another round of tasks over the whole pool to save a few hundred rows.
    Rows without a vector are no candidates, so when some alive rows lack one
    the sample is ``size`` rows that have one.
    """
    wanted = size + SAMPLE_MARGIN * math.sqrt(size) + SAMPLE_SLACK
    if wanted >= rows:
        return None
    return min(math.ceil(wanted / rows * 2**64), 2**64 - 1)


def uid_partition(uids: pa.Array | pa.ChunkedArray, parts: int) -> np.ndarray:
    """Each uid's partition: ``hash(uid) % parts`` in DuckDB, as ``stats.scatter`` splits
    the alive rows by uid, so a row's vector lands in its score's partition."""
    with connect() as con:
        con.register("uids", pa.table({"uid": uids}))
        return con.sql(f"SELECT hash(uid) % {parts} AS part FROM uids").fetchnumpy()["part"]


def _write_arrow(table: pa.Table, path: Path) -> None:
    """Work files are Arrow IPC: vectors go to disk and back as raw buffers (Parquet's nested
    encoding of a fixed_size_list took most of the stage's time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(*paths: Path) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_file(p).read_all() for p in paths)


def _scatter_vectors(job: dict) -> None:
    """One vector source's (uid, vector), split by the uid's hash as the alive rows are."""
    table = read_vector_source(job["source"])
    part = uid_partition(table["uid"], job["parts"])
    for p in np.unique(part):
        _write_arrow(table.filter(pa.array(part == p)), job["out"] / f"part={p}" / "vectors.arrow")


def _join_task(job: dict) -> int:
    """One partition's alive rows with a vector → a work file (uid, score, vector); its rows
    with a key below the cut are set aside for k-means. Returns its rows."""
    if not job["vectors"]:
        return 0
    alive = read_tables(job["alive"], ALIVE)
    vectors = _read_arrow(*job["vectors"])
    index = pc.index_in(vectors["uid"], value_set=alive["uid"])
    found = pc.is_valid(index)
    vectors, index = vectors.filter(found), index.filter(found)
    if not vectors.num_rows:
        return 0
    table = pa.table(
        {"uid": vectors["uid"], "score": alive["score"].take(index), "vector": vectors["vector"]}
    )
    _write_arrow(table, job["out"])
    candidates = table.select(["uid", "vector"])
    if job["cut"] is not None:
        below = sample_keys(table["uid"], job["seed"]) < job["cut"]
        candidates = candidates.filter(pa.array(below))
    _write_arrow(candidates, job["sample"])
    return table.num_rows


def _kmeans_task(job: dict) -> tuple[int, int]:
    """k-means on the sample (of the candidates, the ``size`` of smallest key), in uid order
    so k-means sees the same input every time → ``centroids.npy``; (clusters, sample rows)."""
    files = sorted(job["dir"].glob("*.arrow"))
    if not files:
        return 0, 0
    candidates = _read_arrow(*files)
    chosen = hashed_sample(candidates["uid"], job["size"], job["seed"])
    sample = candidates.filter(pc.is_in(candidates["uid"], value_set=chosen)).sort_by("uid")
    x = unit_rows(embedding_matrix(sample["vector"]))
    x = x[np.isfinite(x).all(axis=1)]
    if not len(x):
        return 0, 0
    centroids = train_centroids(x, job["k"], job["iterations"], job["seed"])
    np.save(job["out"], centroids)
    return len(centroids), len(x)


def _assign_task(item: dict) -> None:
    """Assign one work file's rows to clusters; write them to their bucket's folder."""
    table = _read_arrow(item["path"])
    first, second = assign(unit_rows(embedding_matrix(table["vector"])),
                           np.load(item["centroids"]))  # fmt: skip
    table = table.append_column("cluster", pa.array(first, pa.int32()))
    table = table.append_column("second", pa.array(second, pa.int32()))
    _write_buckets(table, first, item["buckets"], item["out"], item["path"].stem)


def _write_buckets(table: pa.Table, cluster: np.ndarray, buckets: int, out: Path, name: str):
    """Rows into ``out/<cluster % buckets>/name.arrow``: a bucket's clusters, from every file."""
    bucket = cluster % buckets
    for b in np.unique(bucket):
        _write_arrow(table.filter(pa.array(bucket == b)), out / f"{b:05d}" / f"{name}.arrow")


def _bucket_task(item: dict) -> pa.Table:
    """Deduplicate every cluster of one bucket: who absorbed whom (to ``parents``), and
    per-cluster counts (returned).

    The survivors go on to the cross-cluster pass, each twice: at home (its
    cluster) and as a guest in its second-nearest cluster (``at``).
    """
    table = _read_arrow(*sorted(item["dir"].glob("*.arrow")))
    cluster = table["cluster"].to_numpy()
    order = np.lexsort((survivor_rank(table["uid"], table["score"]), cluster))
    table, cluster = table.take(pa.array(order)), cluster[order]
    uids = table["uid"].to_pylist()
    ids, starts, sizes = np.unique(cluster, return_index=True, return_counts=True)
    kept = np.ones(len(uids), bool)
    absorbed, absorber, dropped = [], [], []
    for start, size in zip(starts, sizes):
        x = unit_rows(embedding_matrix(table["vector"].slice(start, size)), np.float64)
        parent = absorbers(x, item["threshold"])
        for j in np.flatnonzero(parent >= 0):
            absorbed.append(uids[start + j])
            absorber.append(uids[start + parent[j]])
        kept[start : start + size] = parent < 0
        dropped.append(int((parent >= 0).sum()))
    survivors = table.filter(pa.array(kept))
    second = survivors["second"].to_numpy()
    name = item["dir"].name
    for role, at in (("home", survivors["cluster"].to_numpy()), ("guest", second)):
        rows = survivors.append_column("at", pa.array(at, pa.int32())).filter(pa.array(at >= 0))
        _write_buckets(rows, at[at >= 0], item["buckets"], item["out"], f"{role}-{name}")
    item["parents"].parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"uid": absorbed, "parent": absorber}, PARENTS), item["parents"])
    return pa.table({"cluster": ids, "rows": sizes, "dropped": dropped}, _CLUSTERS)


def _cross_task(item: dict) -> None:
    """Pairs too close across a cluster boundary: in each cluster, guests against the home
    survivors and against each other (guests from different clusters); written with the
    rows' scores, which the rule on their graph ranks by."""
    table = _read_arrow(*sorted(item["dir"].glob("*.arrow"))).combine_chunks()  # fast takes
    at, home = table["at"].to_numpy(), table["cluster"].to_numpy()
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(at):
        here = np.flatnonzero(at == c)
        x = unit_rows(embedding_matrix(table["vector"].take(pa.array(here))), np.float64)
        guests, hosts = np.flatnonzero(home[here] != c), np.flatnonzero(home[here] == c)
        if not len(guests):
            continue
        i, j = pairs_between(x[guests], x[hosts], item["threshold"])
        left.append(here[guests[i]])
        right.append(here[hosts[j]])
        i, j = pairs_between(x[guests], x[guests], item["threshold"])
        apart = (home[here[guests[i]]] != home[here[guests[j]]]) & (i < j)
        left.append(here[guests[i[apart]]])
        right.append(here[guests[j[apart]]])
    a, b = pa.array(np.concatenate(left)), pa.array(np.concatenate(right))
    uid, score = table["uid"], table["score"]
    edges = pa.table([uid.take(a), score.take(a), uid.take(b), score.take(b)], schema=_EDGES)
    item["out"].parent.mkdir(exist_ok=True)
    pq.write_table(edges, item["out"])


def _across_task(job: dict) -> tuple[int, int]:
    """The rule on the graph of every cross-cluster edge: survivors absorbed across clusters
    (``crossed.parquet``, which the bucket tasks follow) and the decisions on them and their
    absorbers; returns (rows absorbed, absorbers)."""
    edges = read_tables(sorted(job["edges"].glob("*.parquet")), _EDGES)
    crossed = _absorb_across(edges)
    pq.write_table(crossed, job["out"])
    decisions, regroup = final_decisions(crossed)
    write_decisions(job["decided"], "across", decisions, regroup)
    return crossed.num_rows, decisions.num_rows - crossed.num_rows


def _absorb_across(edges: pa.Table) -> pa.Table:
    """Survivors absorbed by a survivor of another cluster (the rule, on the pairs found)."""
    a, b = edges["a"].to_pylist(), edges["b"].to_pylist()
    score = dict(zip(a + b, edges["a_score"].to_pylist() + edges["b_score"].to_pylist()))
    nodes = sorted(score)
    scores = np.array([np.nan if score[u] is None else score[u] for u in nodes], np.float64)
    order = [nodes[i] for i in survivor_order(nodes, scores)]
    parent = absorb_on_graph(order, sorted(set(zip(a, b))))
    return pa.table({"uid": list(parent), "parent": list(parent.values())}, PARENTS)


def _final_task(job: dict) -> tuple[int, int]:
    """One bucket's decisions: each absorbed row joins its absorber's group, or the group of
    the survivor that absorbed its absorber across clusters; returns (dropped, groups)."""
    parents = read_tables([job["parents"]], PARENTS)
    decisions, regroup = final_decisions(parents, read_tables([job["crossed"]], PARENTS))
    write_decisions(job["decided"], f"bucket-{job['parents'].stem}", decisions, regroup)
    return parents.num_rows, decisions.num_rows - parents.num_rows
