"""Dedup and decontamination on the demo pool, downloaded for real and embedded by the small
CLIP trained on it (tests/clip_fixture.py), judged against the pool's ground-truth manifest.

That model is weak: it sees mostly the background and the big shapes, so distinct scenes
with the same backdrop reach cosine 0.999. The thresholds here are therefore far tighter
than a real CLIP model needs (pipelines/dedup_images.yaml: 0.05 and 0.95), and the
precision floors are what this model allows; the algorithm itself is held to 0.99 on
planted duplicates in tests/test_dedup_stages.py and benchmarks/bench_dedup.py.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_clip_stage import downloaded, run_clip  # noqa: F401  (a module fixture, reused)

from curate.demo import load_manifest

pytestmark = pytest.mark.slow
DEDUP = [{"stage": "dedup_exact"}, {"stage": "dedup_semantic", "epsilon": 0.002}]


def truth(pool_dir: Path) -> dict[str, str]:
    """uid → the uid of the picture it shows (itself, or the row it duplicates)."""
    return {r["uid"]: r["duplicate_of"] or r["uid"] for r in load_manifest(pool_dir)["rows"]}


def test_duplicates_of_the_demo_pool(downloaded, fixture_model, tmp_path, served_pool):  # noqa: F811
    run, result = run_clip(downloaded, tmp_path, served_pool, model=str(fixture_model), then=DEDUP)
    assert all(s.rows_in == s.rows_out for s in result.stages[1:])
    ledger = pq.read_table(run / "ledger").to_pylist()
    picture = truth(served_pool.pool_dir)
    defect = {r["uid"]: r["defect"] for r in load_manifest(served_pool.pool_dir)["rows"]}
    survivor = {r["dup_group"]: r["uid"] for r in ledger if r["keep"] and r["dup_group"]}
    considered = [
        r for r in ledger if r["keep"] or r["dropped_by"] in ("dedup_exact", "dedup_semantic")
    ]
    copies = Counter(picture[r["uid"]] for r in considered)
    should = sum(n - 1 for n in copies.values())  # one survivor per picture
    exact = [r for r in ledger if r["dropped_by"] == "dedup_exact"]
    semantic = [r for r in ledger if r["dropped_by"] == "dedup_semantic"]
    right = [r for r in exact + semantic if picture[r["uid"]] == picture[survivor[r["dup_group"]]]]
    precision, recall = len(right) / len(exact + semantic), len(right) / should
    print(
        f"demo pool: {len(exact)} exact + {len(semantic)} semantic drops, {len(right)} right, "
        f"{should} to find: precision {precision:.3f}, recall {recall:.3f}"
    )
    # Exact duplicates: the same bytes, so all found and none wrong.
    assert exact and all(picture[r["uid"]] == picture[survivor[r["dup_group"]]] for r in exact)
    exact_copies = [r for r in considered if defect[r["uid"]] == "exact_duplicate"]
    assert all(r["dup_group"] is not None for r in exact_copies)
    # Re-encoded, resized and cropped copies, through this weak model.
    assert recall >= 0.85 and precision >= 0.6


def reencoded(path: Path, out: Path) -> None:
    with Image.open(path) as image:
        w, h = image.size
        small = image.convert("RGB").resize((w * 9 // 10, h * 9 // 10))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=70)
    out.write_bytes(buffer.getvalue())


def test_decontamination_drops_pool_copies_of_eval_images(
    downloaded,  # noqa: F811
    fixture_model,
    tmp_path,
    served_pool,
):
    """The evaluation set: 8 pool pictures (resized, re-encoded) + 6 held-out eval images."""
    pool = served_pool.pool_dir
    rows = [r for r in load_manifest(pool)["rows"] if r["defect"] is None][:8]
    eval_dir = tmp_path / "eval_set"
    eval_dir.mkdir()
    for r in rows:
        reencoded(pool / r["path"], eval_dir / f"pool-{Path(r['path']).name}")
    for held_out in sorted((pool / "eval" / "images").glob("*.jpg"))[:6]:
        (eval_dir / f"heldout-{held_out.name}").write_bytes(held_out.read_bytes())
    then = [{"stage": "decontaminate", "eval_set": str(eval_dir), "threshold": 0.99}]
    run, result = run_clip(downloaded, tmp_path, served_pool, model=str(fixture_model), then=then)
    stage = result.stages[-1]
    assert stage.rows_in == stage.rows_out and stage.counters["eval_images"] == 14
    ledger = {r["uid"]: r for r in pq.read_table(run / "ledger").to_pylist()}
    picture = truth(pool)
    planted = {r["uid"] for r in rows}
    dropped = [u for u, r in ledger.items() if r["dropped_by"] == "decontaminate"]
    # The weak fixture model puts one of the eight (a yellow star on a dotted white
    # background) at cosine 0.97 to its re-encoded copy, under the threshold.
    found = sum(ledger[u]["dropped_by"] == "decontaminate" for u in planted)
    assert found >= len(planted) - 1
    right = [u for u in dropped if picture[u] in planted]
    print(f"decontaminate: {len(dropped)} dropped, {len(right)} show a planted picture")
    assert len(right) / len(dropped) >= 0.5
    matches = pq.read_table(
        next((run / "stages").glob("*_decontaminate/_stats/contaminated.parquet"))
    )
    assert sorted(matches["uid"].to_pylist()) == sorted(dropped)
    assert all(c >= 0.99 for c in matches["cosine"].to_pylist())
