"""What a stage's ``plan`` decides lives in files under its output folder, nothing else.

A stage built afresh from the recipe and never planned, pointed at the folder of one
that was, is the same object a worker gets: it loads what the plan wrote and decides
every row as the planned stage does.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pools import random_hex, run_ingest

from curate.core.recipe import recipe_from_data
from curate.core.stage import StageContext
from curate.engine.local import LocalEngine

CONCEPTS = "photo\ntable\nred\nchair\n"


def recipe(concepts: str) -> dict:
    return {
        "stages": [
            {"stage": "ingest"},
            {
                "stage": "filter",
                "filters": [
                    {"caption_valid": {}},
                    {"alt_text_frequency": {"max_count": 20}},
                    {"rare_tokens": {"vocab_size": 60}},
                    {"score_threshold": {"column": "score", "min": 0.1}},
                    {"clip_score_top_fraction": {"column": "score", "fraction": 0.8}},
                ],
            },
            {"stage": "balance", "concepts": concepts, "t": 40, "lowercase": True},
            {"stage": "dedup_exact", "score": "score"},
        ]
    }


@pytest.fixture
def ledger(tmp_path) -> list:
    rng = np.random.default_rng(7)
    n = 600
    words = ["a", "red", "photo", "of", "the", "chair", "on", "table", "blue", "cat"]
    captions = [" ".join(rng.choice(words, rng.integers(2, 6))) for _ in range(40)]
    table = pa.table(
        {
            "uid": random_hex(rng, n),
            "url": [f"https://example.com/{i}.jpg" for i in range(n)],
            "caption": rng.choice(captions, n).tolist(),
            "sha256": rng.choice(random_hex(rng, 120, 32).to_pylist(), n).tolist(),
            "score": pa.array(rng.random(n, dtype=np.float32)),
        }
    )
    pq.write_table(table, tmp_path / "pool.parquet")
    _, _, ctx = run_ingest(tmp_path / "pool.parquet", tmp_path / "ingest", rows_per_file=250)
    return sorted(ctx.out_dir.glob("part-*.parquet"))


def test_a_fresh_stage_reads_the_plan_from_its_folder(ledger, tmp_path):
    (tmp_path / "concepts.txt").write_text(CONCEPTS)
    data = recipe(str(tmp_path / "concepts.txt"))
    planned_stages = recipe_from_data(data, {}, "test").stages[1:]
    fresh_stages = recipe_from_data(data, {}, "test").stages[1:]
    files = ledger
    for i, (planned, fresh) in enumerate(zip(planned_stages, fresh_stages)):
        out = tmp_path / f"stage-{i}"
        out.mkdir()
        ctx = StageContext(tmp_path, out, files, pq.read_schema(files[0]), engine=LocalEngine())
        planned.output_dir = fresh.output_dir = out
        planned.plan(ctx)
        # The plan left nothing on the objects: no attribute added, no parameter changed.
        assert planned == fresh and vars(planned).keys() == vars(fresh).keys(), planned.name
        for mine, theirs in zip(getattr(planned, "filters", []), getattr(fresh, "filters", [])):
            assert mine == theirs and vars(mine).keys() == vars(theirs).keys(), mine.name
        planned.setup()
        fresh.setup()
        outputs = []
        for path in files:
            batch = pq.read_table(path)
            mine, theirs = planned(batch), fresh(batch)
            assert theirs.equals(mine), planned.name
            pq.write_table(mine, out / path.name)
            outputs.append(out / path.name)
        files = outputs
    final = pa.concat_tables(pq.read_table(f) for f in files)
    reasons = set(final["dropped_by"].drop_null().to_pylist())
    # Every fitted step decided something, so the equality above is not vacuous.
    assert {"alt_text_frequency", "rare_tokens", "clip_score_top_fraction"} <= reasons
    assert {"balance", "dedup_exact"} <= reasons
