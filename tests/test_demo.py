"""`curate demo` as a new user runs it: one command, from any folder, to a comparison table.

The tiny size (300 pairs, 256 samples per model) runs the same code as the default
one: generate, serve on 127.0.0.1, six recipes on a local Ray cluster, reports,
then six trainings and evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli import curate

from curate.cli import main
from curate.demo import load_manifest
from curate.demo.plan import NO_IMAGE
from curate.walkthrough import BOOTSTRAP_KEEP, RECIPES, SIZES

KEYS = ("run", "recipe", "pool", "kept", "samples_seen", "scores", "average")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """The tiny demo, run from an empty folder (not the repository) as a subprocess."""
    cwd = tmp_path_factory.mktemp("newcomer")
    done = curate("demo", "--size", "tiny", "--output", "demo", cwd=cwd, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "demo", done.stdout


@pytest.mark.slow
def test_compare_json_has_a_row_per_recipe(demo):
    out, _ = demo
    rows = json.loads((out / "compare.json").read_text())
    assert [r["recipe"] for r in rows] == [name for name, _, _ in RECIPES]
    for row in rows:
        assert all(row[k] is not None for k in KEYS), row
        assert row["pool"] == SIZES["tiny"].rows
        assert row["samples_seen"] == SIZES["tiny"].samples_seen // 64 * 64  # whole batches
        assert 0 <= row["average"] <= 1 and 0 <= row["scores"]["retrieval"] <= 1
        assert (out.parent / row["per_seed"][0]["checkpoint"]).is_dir()  # relative to the cwd
    assert (out / "compare.md").read_text() == (out / "compare" / "compare.md").read_text()


@pytest.mark.slow
def test_kept_rows_follow_the_pool_and_the_recipes(demo):
    out, _ = demo
    rows = {r["run"]: r for r in json.loads((out / "compare.json").read_text())}
    manifest = load_manifest(out / "pool")
    images = sum(r["defect"] not in (*NO_IMAGE, "server_error") for r in manifest["rows"])
    assert rows["raw"]["kept"] == images  # raw keeps exactly what downloads
    # DataComp's top-fraction rule: index int(N × f) of the descending sort and every tie.
    assert int(images * BOOTSTRAP_KEEP) + 1 <= rows["bootstrap"]["kept"] < images
    assert rows["metaclip_balance"]["kept"] <= rows["datacomp_basic"]["kept"] < images
    copies = sum(r["defect"] in ("exact_duplicate", "near_duplicate") for r in manifest["rows"])
    assert rows["dedup_phash"]["kept"] <= images - copies // 2  # most copies found
    foreign = sum(r["defect"] in ("non_english", "boilerplate") for r in manifest["rows"])
    assert rows["concept_match"]["kept"] <= images - foreign // 2
    for name, row in rows.items():
        run = out / "runs" / name
        assert len(np.load(run / "uids.npy")) == row["kept"]
        report = json.loads((run / "report.json").read_text())
        assert report["rows_in"] == SIZES["tiny"].rows and report["rows_out"] == row["kept"]


@pytest.mark.slow
def test_the_table_and_the_reports_are_where_it_says(demo):
    out, stdout = demo
    for name, _, _ in RECIPES:
        assert f"| {name} | {name} | 300 |" in stdout
        assert f"runs/{name}/report.html" in (out / "report.md").read_text()
        assert (out / "runs" / name / "report.html").is_file()
    assert "| run | recipe | pool | kept |" in (out / "report.md").read_text()
    assert "demo/report.md" in stdout and "demo/compare.json" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "huge"], "--size"),
        (["--output", "{file}"], "exists and is not a folder"),
        (["--seeds", "0", "1", "0"], "each seed once"),
        (["--seeds", "0", "-1"], "seed -1: expected an integer from 0"),
        (["--output", "{file}/d"], "a part of that path is a file where a folder is expected"),
    ],
)
def test_bad_arguments_stop_before_any_work(args, message, tmp_path, capsys):
    """In-process (the subprocess path is the demo fixture's): status 2, nothing generated."""
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(file=tmp_path / "file") for a in args]
    output = [] if "--output" in args else ["--output", str(tmp_path / "d")]
    try:
        status = main(["demo", "--size", "tiny", *output, *args])
    except SystemExit as refused:  # argparse's own refusals exit
        status = refused.code
    err = capsys.readouterr().err
    assert status == 2 and message in err, err[-2000:]
    assert not (tmp_path / "d").exists()
