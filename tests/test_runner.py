"""The runner on real components: every row accounted for, Ray = in-process, resume."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.core.layout import ledger_files
from curate.core.progress import Progress
from curate.core.recipe import load_recipe
from curate.engine.local import LocalEngine
from curate.engine.ray_cluster import RayEngine
from curate.report.build import write_report
from curate.runner import run_recipe
from curate.stages import MapStage


def read_ledger(run_dir):
    table = pq.ParquetDataset([str(f) for f in ledger_files(run_dir / "ledger")]).read()
    return table.sort_by("uid")


def decisions(run_dir):
    table = read_ledger(run_dir)
    return table.select(["uid", "keep", "dropped_by"]).to_pylist()


def test_every_row_is_kept_or_dropped_with_a_reason(bad_pool, tmp_path):
    recipe = load_recipe("datacomp_basic")
    result = run_recipe(recipe, bad_pool, tmp_path / "run", engine="local")
    report = write_report(recipe, result)
    ledger = read_ledger(tmp_path / "run")
    rows_in = pq.read_metadata(bad_pool).num_rows
    kept = pc.sum(ledger["keep"]).as_py()
    reasons = ledger.filter(pc.invert(ledger["keep"]))["dropped_by"]
    assert ledger.num_rows == rows_in == report["rows_in"]
    assert reasons.null_count == 0
    assert kept + len(reasons) == rows_in
    assert report["rows_out"] == kept == count_shard_rows(tmp_path / "run")
    assert sum(report["dropped"].values()) == rows_in - kept
    by_caption = {r["caption"]: r["dropped_by"] for r in ledger.to_pylist()}
    assert by_caption[None] == "caption_valid"
    assert by_caption["un chien brun qui court sur une plage de sable"] == "language"
    assert by_caption["a dog on a beach"] == "image_size"  # 199 px
    assert by_caption["a dog on a beach at noon"] is None  # exactly 200 px is kept
    assert by_caption["a panorama of a beach with a dog"] is None  # ratio exactly 3
    assert by_caption["a panorama of a beach with a dog again"] == "aspect_ratio"
    assert by_caption["two words"] == "caption_words"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| rows in |" in md and "language" in md


def count_shard_rows(run_dir):
    return sum(pq.read_metadata(f).num_rows for f in (run_dir / "shards").glob("*.parquet"))


def test_ray_and_in_process_ledgers_are_identical(bad_pool, tmp_path, ray_local):
    recipe = load_recipe("align")
    run_recipe(recipe, bad_pool, tmp_path / "local", engine="local")
    run_recipe(recipe, bad_pool, tmp_path / "ray", engine="ray")
    local, on_ray = read_ledger(tmp_path / "local"), read_ledger(tmp_path / "ray")
    assert local.column_names == on_ray.column_names
    assert local.equals(on_ray)
    assert pc.sum(local["keep"]).as_py() > 0


def test_rerun_skips_finished_stages_and_param_change_reruns_downstream(bad_pool, tmp_path):
    run_dir = tmp_path / "run"
    first = run_recipe(load_recipe("datacomp_basic"), bad_pool, run_dir, engine="local")
    assert not any(s.skipped for s in first.stages)
    again = run_recipe(load_recipe("datacomp_basic"), bad_pool, run_dir, engine="local")
    assert all(s.skipped for s in again.stages)
    changed = run_recipe(
        load_recipe("datacomp_basic", ["filter.image_size.min_side=100"]),
        bad_pool,
        run_dir,
        engine="local",
    )
    assert [s.skipped for s in changed.stages] == [True, False, False]
    ledger = read_ledger(run_dir).to_pylist()
    assert {r["caption"]: r["keep"] for r in ledger}[
        "a dog on a beach"
    ] is True  # 199 px now passes
    manifest = json.loads((run_dir / "stages" / "01_filter" / "_SUCCESS").read_text())
    assert manifest["rows_in"] == manifest["rows_out"] == len(ledger)
    assert manifest["params"]["filters"][1]["image_size"]["min_side"] == 100


def test_ledger_is_queryable_with_duckdb(bad_pool, tmp_path):
    run_recipe(load_recipe("datacomp_basic"), bad_pool, tmp_path / "run", engine="local")
    glob = str(tmp_path / "run" / "ledger" / "*.parquet")
    (n, kept) = (
        duckdb.connect()
        .execute("SELECT count(*), count(*) FILTER (WHERE keep) FROM read_parquet(?)", [glob])
        .fetchone()
    )
    assert n == pq.read_metadata(bad_pool).num_rows and 0 < kept < n


@pytest.mark.parametrize("bad", ["filter.image_size.min_side=-"])
def test_bad_override_does_not_touch_the_run_folder(bad_pool, tmp_path, bad):
    from curate.core.config import ConfigError

    with pytest.raises(ConfigError):
        load_recipe("datacomp_basic", [bad])
    assert not (tmp_path / "run").exists()


def test_hostile_csv_rows_are_dropped_with_reasons_not_crashes(tmp_path):
    good = "a brown dog running on a sandy beach"
    rows = [
        b"url,caption,original_width,original_height",
        f"http://127.0.0.1:1/0.jpg,{good},640,480".encode(),
        b"http://127.0.0.1:1/1.jpg,caf\xe9 au lait \xff\xfe on a table,640,480",  # not UTF-8
        b'http://127.0.0.1:1/2.jpg,"a dog\r\non two lines, quoted",640,480',
        b"http://127.0.0.1:1/3.jpg,,640,480",  # null caption
        b"http://127.0.0.1:1/4.jpg,a dog with no size,,",
        b",a caption without a url at all,640,480",
    ]
    pool = tmp_path / "pool.csv"
    pool.write_bytes(b"\r\n".join(rows) + b"\r\n")
    recipe = load_recipe("datacomp_basic")
    result = run_recipe(recipe, pool, tmp_path / "run", engine="local")
    report = write_report(recipe, result)
    by_url = {r["url"]: r for r in read_ledger(tmp_path / "run").to_pylist()}
    assert report["rows_in"] == len(rows) - 1 == len(by_url)
    assert by_url["http://127.0.0.1:1/0.jpg"]["keep"] is True
    invalid = by_url["http://127.0.0.1:1/1.jpg"]
    assert invalid["caption_error"] == "invalid utf-8" and invalid["dropped_by"] == "caption_valid"
    assert "\ufffd" in invalid["caption"]
    assert by_url["http://127.0.0.1:1/2.jpg"]["caption"] == "a dog\r\non two lines, quoted"
    assert by_url["http://127.0.0.1:1/3.jpg"]["dropped_by"] == "caption_valid"
    assert by_url["http://127.0.0.1:1/4.jpg"]["dropped_by"] == "image_size"
    assert report["rows_out"] + sum(report["dropped"].values()) == report["rows_in"]


def test_map_stages_set_up_once_per_worker_and_match_in_process(bad_pool, tmp_path, ray_local):
    # Defined here, not at module level, so Ray workers receive it by value.
    @dataclass
    class CaptionLength(MapStage):
        """A stage that counts its set-ups: each worker sets up once."""

        def setup(self) -> None:
            self.setups = getattr(self, "setups", 0) + 1

        def __call__(self, batch: pa.Table) -> pa.Table:
            lengths = pc.utf8_length(batch["caption"])
            return batch.append_column(
                "setups", pa.array([self.setups] * batch.num_rows)
            ).append_column("chars", lengths)

    result = run_recipe(load_recipe("no_filter"), bad_pool, tmp_path / "run", engine="local")
    (tmp_path / "in").mkdir()
    files = []  # several ledger files, so a worker is called more than once
    for i in range(3):
        files.append(tmp_path / "in" / f"part-{i}.parquet")
        shutil.copy(result.ledger_files[0], files[-1])
    for name, engine in (("local", LocalEngine()), ("ray", RayEngine())):
        (tmp_path / name).mkdir()
        shown = io.StringIO()  # the ray engine counts rows from the files its tasks have written
        with Progress(name, 3 * result.stages[0].rows_out, stream=shown) as progress:
            engine.map_files(CaptionLength(), files, tmp_path / name, progress)
        engine.close()
        assert f"  {name:<16}  {3 * result.stages[0].rows_out:,} rows in" in shown.getvalue()
    local = pq.ParquetDataset(ledger_files(tmp_path / "local")).read()
    on_ray = pq.ParquetDataset(ledger_files(tmp_path / "ray")).read()
    assert on_ray.num_rows == local.num_rows == 3 * result.stages[0].rows_out
    assert set(on_ray["setups"].to_pylist()) == {1}
    assert sorted(on_ray["chars"].to_pylist(), key=str) == sorted(
        local["chars"].to_pylist(), key=str
    )


def test_a_missing_column_fails_before_any_stage_runs(bad_pool, tmp_path):
    """The chain is checked against the columns ingest will write, read from the input's
    headers: not even ingest runs."""
    from curate.core.config import ConfigError
    from curate.core.recipe import recipe_from_data

    recipe = recipe_from_data(
        {"stages": [
            {"stage": "ingest"},
            {"stage": "filter", "name": "cheap", "filters": ["caption_valid"]},
            {"stage": "filter", "name": "scored",
             "filters": [{"score_threshold": {"column": "clip_score", "min": 0.28}}]},
        ]},
        {}, "inline",
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"stage scored: filter score_threshold needs .*clip_score"
    ):
        run_recipe(recipe, bad_pool, tmp_path / "run", engine="local")
    assert not (tmp_path / "run" / "stages").exists()
