"""MetaCLIP balancing: p = t / max(count, t), keep if any draw passes, reproducible anywhere."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.core.layout import CONCEPT_COUNTS, ledger_files
from curate.core.recipe import recipe_from_data
from curate.core.stage import StageContext
from curate.demo import load_manifest
from curate.demo.vocab import SHAPES
from curate.engine.local import LocalEngine
from curate.runner import run_recipe

CONCEPTS = ["alpha", "beta", "gamma", "delta"]
T = 400
#: caption -> rows. Counts: alpha 4,050, beta 2,000, gamma 200, delta 400 (= t).
MIXED = {
    "an alpha": 3000,
    "a beta": 1000,
    "alpha and beta": 1000,
    "a gamma": 150,
    "alpha, gamma.": 50,
    "delta": 400,
    "nothing to see": 100,
}


def write_pool(folder: Path, groups: dict[str, int]) -> Path:
    captions = [caption for caption, n in groups.items() for _ in range(n)]
    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(len(captions))]
    path = folder / "pool.parquet"
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)
    return path


@pytest.fixture
def concept_list(tmp_path: Path) -> Path:
    path = tmp_path / "concepts.txt"
    path.write_text("\n".join(CONCEPTS) + "\n")
    return path


def balance_recipe(concepts, t: int = T, seed: int = 0, before: tuple = ()):
    stages = [{"stage": "ingest"}, *before, {"stage": "balance", "concepts": str(concepts), "t": t}]
    return recipe_from_data({"name": "balance_test", "seed": seed, "stages": stages}, {}, "inline")


def run(recipe, pool: Path, run_dir: Path, engine: str = "local"):
    """The run's ledger (by uid), its concept_counts.csv (by concept) and the stage's counters."""
    result = run_recipe(recipe, pool, run_dir, engine=engine)
    ledger = pq.read_table(run_dir / "ledger").sort_by("uid")
    counts = pyarrow.csv.read_csv(next(run_dir.glob(f"stages/*_balance/{CONCEPT_COUNTS}")))
    by_concept = {r["concept"]: r for r in counts.to_pylist()}
    return ledger, by_concept, result.stages[-1].counters


def within(observed: float, mean: float, variance: float) -> bool:
    """Four standard deviations (and one row) of slack: decisions are fixed by the seed, but
    the expectations are what the test can state."""
    return abs(observed - mean) <= 4 * math.sqrt(variance) + 1


# --- the rule ------------------------------------------------------------------------------


def test_keep_probability_is_one_minus_the_product_of_misses(tmp_path, concept_list):
    ledger, counts, counters = run(balance_recipe(concept_list), write_pool(tmp_path, MIXED),
                                   tmp_path / "run")  # fmt: skip
    rows = ledger.to_pylist()
    # Matches counted directly: each row once per concept it names.
    matches = Counter(c for r in rows for c in CONCEPTS if c in r["caption"].replace(",", " "))
    assert {c: counts[c]["matches"] for c in CONCEPTS} == dict(matches)
    p = {c: T / max(matches[c], T) for c in CONCEPTS}
    assert {c: counts[c]["p"] for c in CONCEPTS} == pytest.approx(p, rel=1e-12)
    assert p["gamma"] == p["delta"] == 1.0  # 200 and 400 rows: at or under t
    for caption, n in MIXED.items():
        group = [r for r in rows if r["caption"] == caption]
        named = group[0]["concepts"]
        keep_p = 1 - math.prod(1 - p[c] for c in named) if named else 0.0
        kept = sum(r["keep"] for r in group)
        assert within(kept, n * keep_p, n * keep_p * (1 - keep_p)), (caption, kept, n * keep_p)
        assert all(r["dropped_by"] == (None if r["keep"] else "balance") for r in group)
    assert {r["caption"]: r["concepts"] for r in rows}["alpha and beta"] == ["alpha", "beta"]
    # The csv's "kept" is what the ledger kept, per concept.
    kept = Counter(c for r in rows if r["keep"] for c in r["concepts"])
    assert {c: counts[c]["kept"] for c in CONCEPTS} == {c: kept[c] for c in CONCEPTS}
    assert counters["rows_without_concept"] == 100 and counters["concepts_capped"] == 2
    assert counters["rows_alive"] == len(rows) == sum(MIXED.values())
    kept_rows = sum(r["keep"] for r in rows)
    assert kept_rows + sum(r["dropped_by"] is not None for r in rows) == len(rows)


def test_a_concept_alone_in_its_captions_is_capped_at_t(tmp_path, concept_list):
    groups = {"alpha": 3000, "beta": 1000, "gamma": 150, "delta": 400}
    _, counts, _ = run(balance_recipe(concept_list), write_pool(tmp_path, groups), tmp_path / "r")
    for concept, n in zip(CONCEPTS, groups.values()):
        p = T / max(n, T)
        assert within(counts[concept]["kept"], n * p, n * p * (1 - p)), counts[concept]
    assert counts["gamma"]["kept"] == 150 and counts["delta"]["kept"] == 400  # the tail: all


def splitmix64(x: int) -> int:
    mask = 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_each_draw_is_the_documented_hash_of_seed_uid_and_concept(tmp_path, concept_list):
    seed = 7
    ledger, counts, _ = run(
        balance_recipe(concept_list, seed=seed),
        write_pool(tmp_path, {"an alpha": 500, "a beta": 100}),
        tmp_path / "r",
    )
    p = {c: r["p"] for c, r in counts.items()}
    assert p["alpha"] < 1

    def digest(data: str, key: bytes = b"") -> int:
        return int.from_bytes(
            hashlib.blake2b(data.encode(), digest_size=8, key=key).digest(), "little"
        )

    for row in ledger.to_pylist():
        (concept,) = row["concepts"]
        bits = splitmix64(digest(row["uid"], seed.to_bytes(8, "little")) ^ digest(concept))
        assert row["keep"] == ((bits >> 11) / 2**53 < p[concept])


def test_decisions_follow_the_seed_not_the_run(tmp_path, concept_list):
    pool = write_pool(tmp_path, MIXED)
    first, counts, _ = run(balance_recipe(concept_list), pool, tmp_path / "a")
    again, counts_again, _ = run(balance_recipe(concept_list), pool, tmp_path / "b")
    other, _, _ = run(balance_recipe(concept_list, seed=1), pool, tmp_path / "c")
    assert first.equals(again) and counts == counts_again
    changed = pc.sum(pc.not_equal(first["keep"], other["keep"])).as_py()
    assert changed > 500  # a new seed redraws every head row


def test_decisions_do_not_depend_on_batch_boundaries(tmp_path, concept_list):
    recipe = balance_recipe(concept_list)
    run_recipe(recipe, write_pool(tmp_path, MIXED), tmp_path / "run", engine="local")
    ingested = ledger_files(next((tmp_path / "run" / "stages").glob("00_*")))
    stage = recipe.stages[1]
    out = tmp_path / "plan"
    out.mkdir()
    stage.output_dir = out
    stage.plan(
        StageContext(tmp_path, out, ingested, pq.read_schema(ingested[0]), engine=LocalEngine())
    )
    stage.setup()  # as each worker does
    whole = pq.read_table(ingested[0])
    in_one = stage(whole)
    sliced = pa.concat_tables(stage(whole.slice(i, 777)) for i in range(0, whole.num_rows, 777))
    shuffled = stage(whole.take(np.random.default_rng(0).permutation(whole.num_rows)))
    assert sliced.equals(in_one)
    assert shuffled.sort_by("uid").equals(in_one.sort_by("uid"))
    assert in_one.equals(pq.read_table(tmp_path / "run" / "ledger"))


def test_rows_dropped_earlier_keep_their_decision_and_are_not_counted(tmp_path, concept_list):
    groups = {"alpha": 30, "alpha beta": 10, "gamma": 5, "alpha, and nothing else": 5}
    recipe = balance_recipe(concept_list, t=10, before=[
        {"stage": "filter", "filters": [{"caption_words": {"min_words": 2, "min_chars": 1}}]}
    ])  # fmt: skip
    ledger, counts, counters = run(recipe, write_pool(tmp_path, groups), tmp_path / "run")
    rows = ledger.to_pylist()
    early = [r for r in rows if r["dropped_by"] == "caption_words"]
    assert len(early) == 35 and all(r["concepts"] is None and not r["keep"] for r in early)
    assert counts["alpha"]["matches"] == 15 and counts["gamma"]["matches"] == 0
    assert counters["rows_alive"] == 15
    alive = [r for r in rows if r["dropped_by"] != "caption_words"]
    assert all(r["concepts"] for r in alive)
    assert sum(r["keep"] for r in rows) + sum(r["dropped_by"] is not None for r in rows) == 50


# --- the demo pool -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(served_pool, tmp_path_factory):
    """pipelines/metaclip_balance.yaml on the served 500-row demo pool, in-process engine."""
    run_dir = tmp_path_factory.mktemp("metaclip") / "run"
    code = main(["run", "pipelines/metaclip_balance.yaml", "--input", str(served_pool.urls_path),
                 "--output", str(run_dir), "--set", "download.allow_private_networks=true",
                 "--engine", "local", "--quiet"])  # fmt: skip
    assert code == 0
    return run_dir, load_manifest(served_pool.pool_dir)


def test_demo_recipe_flattens_the_concept_histogram(demo_run):
    run_dir, manifest = demo_run
    t = 20  # the recipe's
    ledger = pq.read_table(run_dir / "ledger").to_pylist()
    counts = pyarrow.csv.read_csv(next(run_dir.glob(f"stages/*_balance/{CONCEPT_COUNTS}")))
    counts = {r["concept"]: r for r in counts.to_pylist()}
    entering = [r for r in ledger if r["concepts"] is not None]  # alive when balance began
    assert len(entering) == sum(r["keep"] or r["dropped_by"] == "balance" for r in ledger)
    assert Counter(c for r in entering for c in r["concepts"]) == {
        c: r["matches"] for c, r in counts.items() if r["matches"]
    }
    # Expected rows kept per concept: the sum of its rows' keep probabilities.
    p = {c: r["p"] for c, r in counts.items()}
    mean, variance = Counter(), Counter()
    for row in entering:
        keep_p = 1 - math.prod(1 - p[c] for c in row["concepts"])
        for c in row["concepts"]:
            mean[c] += keep_p
            variance[c] += keep_p * (1 - keep_p)
    for concept, r in counts.items():
        if r["matches"] <= t:
            assert r["kept"] == r["matches"], concept  # the tail is untouched
        else:
            assert within(r["kept"], mean[concept], variance[concept]), (concept, r)
    # Not capped at t: a head shape's rows also name colours and rarer shapes, whose
    # draws keep them too (MetaCLIP's rule). Still, the head-to-tail ratio shrinks.
    head, tail = counts[SHAPES[0]], counts[SHAPES[-1]]
    assert head["matches"] > 10 * t >= tail["matches"] == tail["kept"]
    assert head["kept"] < 0.8 * head["matches"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rows_in"] == len(manifest["rows"]) == len(ledger)
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())
    assert report["dropped"]["balance"] == sum(r["dropped_by"] == "balance" for r in ledger) > 0
    shards = pq.read_table(run_dir / "shards")
    assert sorted(shards["uid"].to_pylist()) == sorted(r["uid"] for r in ledger if r["keep"])


@pytest.mark.slow
def test_ray_decides_what_the_local_engine_decides(demo_pool, tmp_path, ray_local):
    pairs = pq.read_table(demo_pool / "pairs.parquet")
    pool = tmp_path / "pool.parquet"
    pq.write_table(pairs.rename_columns(["uid", "url", "caption"]), pool)
    recipe = balance_recipe(
        "demo", t=20, before=[{"stage": "filter", "filters": [{"caption_words": {}}]}]
    )
    local, local_counts, _ = run(recipe, pool, tmp_path / "local")
    on_ray, ray_counts, _ = run(recipe, pool, tmp_path / "ray", engine="ray")
    assert local.equals(on_ray)
    assert local_counts == ray_counts
    assert 0 < pc.sum(local["keep"]).as_py() < local.num_rows
