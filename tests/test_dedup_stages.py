"""The dedup stages through the runner, on DataComp-style metadata with planted duplicates.

The pool's image vectors are a mixture of clusters (as real embeddings are),
with planted near duplicates (cosine ≥ 0.97 with their source) and exact
duplicates (the source's sha256). The ground truth says which rows must go.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.config import ConfigError
from curate.core.recipe import load_recipe, recipe_from_data
from curate.core.schema import stable_uid
from curate.dedup.decisions import group_id, survivor_order
from curate.runner import run_recipe

DIM = 24


def write_pool(
    folder: Path, n: int = 3000, n_files: int = 1, seed: int = 0, copy_noise: float = 0.03
) -> dict:
    """DataComp-layout metadata (+ .npz l14_img) with planted duplicates; the ground truth."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, DIM))
    x = centres[rng.integers(0, 25, n)] + rng.normal(scale=0.9, size=(n, DIM))
    near = rng.choice(n, 240, replace=False)
    source_of = {int(c): int(s) for c, s in zip(near[:120], near[120:])}
    for copy, source in source_of.items():
        x[copy] = x[source] + rng.normal(scale=copy_noise, size=DIM)
    sha = [f"{rng.integers(2**62):016x}" * 4 for _ in range(n)]
    pairs = rng.choice(np.setdiff1d(np.arange(n), near), 120, replace=False)
    exact = {int(c): int(s) for c, s in zip(pairs[:60], pairs[60:])}
    for copy, source in exact.items():
        sha[copy] = sha[source]
    scores = rng.random(n, dtype=np.float32)
    scores[rng.choice(n, 40)] = np.nan
    ties = list(exact.items())[:10]
    for copy, source in ties:  # equal scores: the smaller uid must survive
        scores[copy] = scores[source]
    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(n)]
    uids = [stable_uid(u, f"caption {i}") for i, u in enumerate(urls)]
    table = pa.table(
        {
            "uid": uids,
            "url": urls,
            "text": [f"caption {i}" for i in range(n)],
            "sha256": sha,
            "clip_l14_similarity_score": pa.array(scores, pa.float32()),
        }
    )
    folder.mkdir(parents=True)
    bounds = np.linspace(0, n, n_files + 1).astype(int)
    vectors = x.astype(np.float16)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(table.slice(lo, hi - lo), folder / f"{i:07d}.parquet")
        part = vectors[lo:hi]
        np.savez(folder / f"{i:07d}.npz", l14_img=part, l14_txt=part, b32_img=part, b32_txt=part)
    return {"uids": uids, "near": source_of, "exact": exact, "vectors": vectors, "scores": scores}


def semdedup_recipe(**semantic):
    recipe = load_recipe(Path("pipelines/semdedup.yaml"))
    data = recipe.resolved()
    data["stages"] = [s for s in data["stages"] if s["stage"] != "shard"]
    data["stages"][2].update(semantic)
    return recipe_from_data(data, {}, "test")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dedup") / "pool"
    return folder, write_pool(folder)


@pytest.fixture(scope="module")
def deduped(pool, tmp_path_factory) -> tuple[Path, list[dict]]:
    run = tmp_path_factory.mktemp("dedup") / "run"
    run_recipe(semdedup_recipe(), pool[0], run, engine="local")
    return run, pq.read_table(run / "ledger").to_pylist()


def test_planted_duplicates_are_found_and_nothing_else(pool, deduped):
    _, truth = pool
    run, ledger = deduped
    by_uid = {r["uid"]: r for r in ledger}
    uids = truth["uids"]
    exact_copies = {uids[c] for c in truth["exact"]}
    exact_dropped = {r["uid"] for r in ledger if r["dropped_by"] == "dedup_exact"}
    # Each exact pair loses exactly one row: the worse one by (score, uid).
    expected_exact = set()
    for copy, source in truth["exact"].items():
        pair = [copy, source]
        best = pair[survivor_order([uids[i] for i in pair], truth["scores"][pair])[0]]
        expected_exact.add(uids[copy if best == source else source])
    assert exact_dropped == expected_exact and len(exact_copies) == 60

    semantic = {r["uid"] for r in ledger if r["dropped_by"] == "dedup_semantic"}
    related = defaultdict(set)
    for copy, source in truth["near"].items():
        related[uids[copy]].add(uids[source])
        related[uids[source]].add(uids[copy])
    correct = [u for u in semantic if by_uid[u]["dup_group"] in {group_id(v) for v in related[u]}]
    precision = len(correct) / len(semantic)
    recall = len(correct) / len(truth["near"])
    print(f"semantic dedup on planted pairs: precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.99 and recall >= 0.97

    counters = json.loads(next((run / "stages").glob("*_dedup_semantic/_SUCCESS")).read_text())
    assert counters["rows_in"] == counters["rows_out"] == len(uids)
    assert counters["counters"]["embeddings"] == "l14_img"
    assert counters["counters"]["clusters"] == 3  # one per 1,000 rows


def test_every_group_has_exactly_one_survivor_and_it_is_the_best(pool, deduped):
    _, truth = pool
    _, ledger = deduped
    score = dict(zip(truth["uids"], truth["scores"]))
    groups = defaultdict(list)
    for r in ledger:
        if r["dup_group"] is not None:
            groups[r["dup_group"]].append(r)
    assert groups
    for gid, rows in groups.items():
        kept = [r for r in rows if r["keep"]]
        assert len(kept) == 1, rows
        assert gid == group_id(kept[0]["uid"])
        best = survivor_order([r["uid"] for r in rows], [score[r["uid"]] for r in rows])[0]
        assert rows[best]["keep"] or rows[best]["dropped_by"] == "dedup_exact"
    assert sum(r["keep"] for r in ledger) + sum(not r["keep"] for r in ledger) == len(ledger)


@pytest.mark.slow
def test_identical_on_ray_and_across_file_boundaries(pool, deduped, tmp_path, ray_local):
    folder = tmp_path / "pool3"
    write_pool(folder, n_files=3)
    run = tmp_path / "ray"
    run_recipe(semdedup_recipe(), folder, run, engine="ray")
    columns = ["uid", "keep", "dropped_by", "dup_group"]
    ray_rows = pq.read_table(run / "ledger", columns=columns).sort_by("uid")
    local_rows = pa.Table.from_pylist(deduped[1]).select(columns).sort_by("uid")
    assert ray_rows.equals(local_rows.cast(ray_rows.schema))


def test_the_same_ledger_from_one_partition_and_one_bucket_or_many(tmp_path, monkeypatch):
    """The tasks split the work by hash partition and by bucket of clusters; how finely
    must not change a decision (a loose epsilon: many groups span clusters and buckets)."""
    import curate.stages.dedup as stages

    write_pool(tmp_path / "pool", n_files=3)
    ledgers, counters = [], []
    for partitions, bucket_rows in ((1, 50_000), (7, 100)):
        monkeypatch.setattr(stages, "partitions_for", lambda files, n=partitions: n)
        monkeypatch.setattr(stages, "BUCKET_ROWS", bucket_rows)
        run = tmp_path / f"run-{partitions}"
        run_recipe(semdedup_recipe(clusters=7, epsilon=0.5), tmp_path / "pool", run, "local")
        columns = ["uid", "keep", "dropped_by", "dup_group"]
        ledgers.append(pq.read_table(run / "ledger", columns=columns).sort_by("uid"))
        stage = next((run / "stages").glob("*_dedup_semantic"))
        counters.append(json.loads((stage / "_SUCCESS").read_text())["counters"])
        decided = sorted(p.name for p in (stage / "_stats" / "decisions").iterdir())
        assert len(decided) == (2 if partitions == 1 else 8)  # a file per bucket, and across
    assert ledgers[0].equals(ledgers[1])
    assert counters[0]["dropped_across_clusters"] == counters[1]["dropped_across_clusters"] > 0


def test_vectors_of_one_datacomp_source_are_those_of_the_whole_stream(tmp_path):
    """A task reads one source's vectors and uids (its own ledger parts only)."""
    from curate.io.datacomp import read_npz_embeddings, read_npz_source

    write_pool(tmp_path / "pool", n=900, n_files=3)
    data = {"name": "t", "stages": [{"stage": "ingest", "rows_per_file": 128}]}
    run_recipe(recipe_from_data(data, {}, "t"), tmp_path / "pool", tmp_path / "run", "local")
    ingest = next((tmp_path / "run" / "stages").glob("*_ingest"))
    assert len(list(ingest.glob("part-00001-*.parquet"))) > 1
    whole = list(read_npz_embeddings(ingest, "l14_img"))
    assert [read_npz_source(ingest, i, "l14_img") for i in range(3)] == whole


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_bad_vectors_fail_in_a_task_with_the_usual_error(tmp_path, engine, request):
    """An .npz changed after ingest: the task that reads it raises, the driver reports it."""
    from curate.core.stage import StageContext
    from curate.engine import open_engine
    from curate.io.readers import IngestError
    from curate.stages.dedup import SemanticDedupStage

    if engine == "ray":
        request.getfixturevalue("ray_local")
    write_pool(tmp_path / "pool", n=600, n_files=2)
    data = {"name": "t", "stages": [{"stage": "ingest"}]}
    run_recipe(recipe_from_data(data, {}, "t"), tmp_path / "pool", tmp_path / "run", "local")
    np.savez(tmp_path / "pool" / "0000001.npz", l14_img=np.zeros((5, DIM), np.float16))
    ingest = next((tmp_path / "run" / "stages").glob("*_ingest"))
    files = sorted(ingest.glob("part-*.parquet"))
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(tmp_path / "run", out, files, pq.read_schema(files[0]),
                       ingest_dir=ingest, engine=open_engine(engine))  # fmt: skip
    stage = SemanticDedupStage(embeddings="l14")
    stage.name = "dedup_semantic"
    stage.output_dir = out
    try:
        with pytest.raises(IngestError, match=r"has shape \(5, 24\), but 0000001\.parquet"):
            stage.plan(ctx)
    finally:
        ctx.engine.close()


def test_pairs_split_by_cluster_boundaries_are_still_found(tmp_path):
    """Loose copies (cosine ~0.98) and many small clusters cut planted pairs apart; the
    cross-cluster pass still resolves them."""
    truth = write_pool(tmp_path / "pool", copy_noise=0.25, seed=3)
    run = tmp_path / "run"
    run_recipe(semdedup_recipe(clusters=300), tmp_path / "pool", run, engine="local")
    manifest = json.loads(next((run / "stages").glob("*_dedup_semantic/_SUCCESS")).read_text())
    assert manifest["counters"]["dropped_across_clusters"] > 0
    ledger = {r["uid"]: r for r in pq.read_table(run / "ledger").to_pylist()}
    uids = truth["uids"]
    pairs = [(ledger[uids[c]], ledger[uids[s]]) for c, s in truth["near"].items()]
    resolved = [not (a["keep"] and b["keep"]) for a, b in pairs]
    assert np.mean(resolved) >= 0.99


def test_clusters_and_epsilon_come_from_the_recipe(pool, tmp_path):
    run = tmp_path / "run"
    run_recipe(semdedup_recipe(clusters=7, epsilon=0.5), pool[0], run, engine="local")
    manifest = json.loads(next((run / "stages").glob("*_dedup_semantic/_SUCCESS")).read_text())
    assert manifest["counters"]["clusters"] == 7
    stats = next((run / "stages").glob("*_dedup_semantic/_stats"))
    assert pq.read_table(stats / "clusters.parquet").num_rows <= 7
    # A loose threshold drops far more than the planted pairs.
    assert manifest["counters"]["dropped"] > 500


def ledger_stage(tmp_path: Path, rows: list[dict]):
    """A hand-made ledger file and a StageContext over it."""
    from curate.core.stage import StageContext
    from curate.engine.local import LocalEngine

    path = tmp_path / "in" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "out"
    out.mkdir()
    return path, StageContext(tmp_path, out, [path], pq.read_schema(path), engine=LocalEngine())


def test_exact_dedup_ties_nan_and_earlier_drops(tmp_path):
    from curate.stages.dedup import ExactDedupStage

    u = [f"{i:032x}" for i in range(8)]
    rows = [
        {"uid": u[0], "sha256": "x", "clip_score": 0.3, "keep": True, "dropped_by": None},
        {"uid": u[1], "sha256": "x", "clip_score": 0.3, "keep": True, "dropped_by": None},
        {"uid": u[2], "sha256": "x", "clip_score": 0.9, "keep": False, "dropped_by": "lang"},
        {"uid": u[3], "sha256": "y", "clip_score": float("nan"), "keep": True, "dropped_by": None},
        {"uid": u[4], "sha256": "y", "clip_score": -1.0, "keep": True, "dropped_by": None},
        {"uid": u[5], "sha256": None, "clip_score": 0.1, "keep": True, "dropped_by": None},
        {"uid": u[6], "sha256": None, "clip_score": 0.1, "keep": True, "dropped_by": None},
        {"uid": u[7], "sha256": "z", "clip_score": None, "keep": True, "dropped_by": None},
    ]
    path, ctx = ledger_stage(tmp_path, rows)
    stage = ExactDedupStage()
    stage.name = "dedup_exact"
    stage.output_dir = ctx.out_dir
    stage.plan(ctx)
    stage.setup()
    out = stage(pq.read_table(path)).to_pydict()
    assert out["keep"] == [True, False, False, False, True, True, True, True]
    assert out["dropped_by"] == [None, "dedup_exact", "lang", "dedup_exact", None, None, None, None]
    g0, g4 = group_id(u[0]), group_id(u[4])
    assert out["dup_group"] == [g0, g0, None, g4, g4, None, None, None]
    assert ctx.counters == {"groups": 2, "rows_in_groups": 4, "dropped": 2}


def test_missing_inputs_fail_before_the_work(tmp_path, pool):
    data = {
        "name": "t",
        "stages": [{"stage": "ingest", "format": "parquet"}, {"stage": "dedup_exact"}],
    }
    no_sha = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a"], "text": ["a"]}), no_sha)
    with pytest.raises(ConfigError, match="sha256"):
        run_recipe(recipe_from_data(data, {}, "t"), no_sha, tmp_path / "a", engine="local")
    data["stages"][1] = {"stage": "dedup_semantic", "embeddings": "clip"}
    with pytest.raises(ConfigError, match="clip stage"):
        run_recipe(recipe_from_data(data, {}, "t"), no_sha, tmp_path / "b", engine="local")
    data["stages"][1] = {"stage": "dedup_semantic"}
    with pytest.raises(ConfigError, match="needs the pool's image embeddings"):
        run_recipe(recipe_from_data(data, {}, "t"), no_sha, tmp_path / "c", engine="local")
    with pytest.raises(ValueError, match="epsilon"):
        semdedup_recipe(epsilon=0)


@pytest.mark.slow
def test_decontamination_on_datacomp_vectors_local_and_ray(pool, tmp_path, ray_local):
    """Eval vectors: 30 pool vectors (10 exact, 20 slightly moved) and 20 unrelated ones."""
    folder, truth = pool
    rng = np.random.default_rng(4)
    vectors = truth["vectors"].astype(np.float64)
    picked = rng.choice(len(vectors), 30, replace=False)
    moved = vectors[picked] + np.r_[np.zeros((10, DIM)), 0.02 * rng.normal(size=(20, DIM))]
    unrelated = 3 * rng.normal(size=(20, DIM))
    eval_set = tmp_path / "eval.parquet"
    rows = np.concatenate([moved, unrelated])
    pq.write_table(pa.table({"image_embedding": rows.tolist()}), eval_set)
    stages = [
        {"stage": "ingest"},
        {"stage": "clip", "precomputed": "l14"},
        {"stage": "decontaminate", "eval_set": str(eval_set), "threshold": 0.99},
    ]
    ledgers = {}
    for engine in ("local", "ray"):
        run = tmp_path / engine
        run_recipe(
            recipe_from_data({"name": "t", "stages": stages}, {}, "t"), folder, run, engine=engine
        )
        ledgers[engine] = pq.read_table(run / "ledger", columns=["uid", "keep", "dropped_by"])
    assert ledgers["local"].equals(ledgers["ray"])
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    e = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    expected = {truth["uids"][i] for i in np.flatnonzero((x @ e.T).max(axis=1) >= 0.99)}
    dropped = {r["uid"] for r in ledgers["local"].to_pylist() if r["dropped_by"] == "decontaminate"}
    assert dropped == expected and {truth["uids"][i] for i in picked} <= dropped
