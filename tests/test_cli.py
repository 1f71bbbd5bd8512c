"""The `curate` command as a user runs it (real subprocess, real local Ray cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def curate(
    *args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "curate.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})},
        timeout=timeout,
    )


@pytest.mark.slow
def test_run_prints_funnel_and_writes_outputs_then_inspect(bad_pool, tmp_path):
    out = tmp_path / "runs" / "basic"
    done = curate(
        "run", "pipelines/datacomp_basic.yaml", "--input", str(bad_pool), "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "| rows in |" in done.stdout and "**rows out**" in done.stdout
    for name in ("ledger", "shards", "report.json", "report.md", "recipe.yaml"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())

    shown = curate("inspect", str(out), "--examples", "2")
    assert shown.returncode == 0, shown.stderr
    assert "dropped by language:" in shown.stdout and "kept:" in shown.stdout


def test_bad_recipe_is_a_clear_error_not_a_traceback(bad_pool, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - stage: ingest\n  - stage: filter\n    filters: [warp]\n")
    done = curate("run", str(recipe), "--input", str(bad_pool), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "unknown filter 'warp'" in done.stderr and "Traceback" not in done.stderr


def test_missing_input_is_a_clear_error(tmp_path):
    done = curate(
        "run",
        "datacomp_basic",
        "--input",
        str(tmp_path / "nope.parquet"),
        "--output",
        str(tmp_path / "o"),
    )
    assert done.returncode == 2 and "no such file" in done.stderr


def test_output_that_is_a_file_is_a_clear_error(bad_pool, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    done = curate(
        "run",
        "datacomp_basic",
        "--input",
        str(bad_pool),
        "--output",
        str(tmp_path / "taken"),
        "--engine",
        "local",
    )
    assert done.returncode == 2 and "is not a folder" in done.stderr
