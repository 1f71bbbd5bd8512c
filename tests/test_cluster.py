"""A real two-node Ray cluster on this machine (benchmarks/local_cluster.py: every node on
127.0.0.1), and a run killed mid-stage then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bad_pool_rows
from pools import write_datacomp_pool

from curate.core.layout import ledger_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from local_cluster import LOOPBACK_ENV, local_cluster  # noqa: E402


def curate(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "curate.cli", *args],
        cwd=ROOT,
        env={**os.environ, **LOOPBACK_ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run_args(pool: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "datacomp_basic", "--input", str(pool), "--output", str(out), *extra]


def run_locally(pool: Path, out: Path) -> None:
    """The reference: the same recipe in-process, to an uninterrupted end."""
    proc = curate(run_args(pool, out, "--engine", "local", "--quiet"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def decisions(run_dir: Path) -> list[tuple]:
    table = pq.ParquetDataset([str(f) for f in ledger_files(run_dir / "ledger")]).read()
    return sorted(zip(*(table[c].to_pylist() for c in ("uid", "keep", "dropped_by"))))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A Ray cluster of two nodes of one CPU each on 127.0.0.1, started apart from any
    driver (as a real cluster is); yields its address."""
    with local_cluster(2, 1, tmp_path_factory.mktemp("cluster")) as address:
        yield address


@pytest.mark.slow
def test_recipe_runs_on_a_two_node_cluster(bad_pool, tmp_path, two_nodes):
    run = curate(run_args(bad_pool, tmp_path / "cluster", "--address", two_nodes))
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    run_locally(bad_pool, tmp_path / "local")
    assert decisions(tmp_path / "cluster") == decisions(tmp_path / "local")


SCALE = """
name: scale
stages:
  - stage: ingest
    rows_per_file: 400
  - stage: filter
    filters:
      - alt_text_frequency: {max_count: 10}
      - rare_tokens: {vocab_size: 1000}
      - clip_score_top_fraction: {fraction: 0.9, column: clip_l14_similarity_score}
  - stage: dedup_exact
    score: clip_l14_similarity_score
  - stage: dedup_semantic
    embeddings: l14
    score: clip_l14_similarity_score
  - stage: balance
    concepts: demo
    t: 50
  - stage: shard
    rows_per_shard: 500
"""


@pytest.mark.slow
def test_every_stage_runs_on_both_nodes(tmp_path, two_nodes):
    """The driver plans; each stage's tasks (ingest, fits, dedup, balance, shards) land on
    both nodes, and the result is the local engine's."""
    write_datacomp_pool(tmp_path / "pool", 4000, 4)
    (tmp_path / "scale.yaml").write_text(SCALE)
    args = ["run", str(tmp_path / "scale.yaml"), "--input", str(tmp_path / "pool")]
    run = curate([*args, "--output", str(tmp_path / "cluster"), "--address", two_nodes])
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    run_dir = tmp_path / "cluster"
    for manifest in [*sorted(run_dir.glob("stages/*/_SUCCESS")), run_dir / "shards" / "_SUCCESS"]:
        placed = json.loads(manifest.read_text())["tasks_per_node"]
        assert len(placed) == 2, (manifest.parent.name, placed)
    local = curate([*args, "--output", str(tmp_path / "local"), "--engine", "local"])
    _, err = local.communicate(timeout=600)
    assert local.returncode == 0, err[-3000:]
    assert decisions(tmp_path / "cluster") == decisions(tmp_path / "local")


@pytest.mark.slow
def test_run_killed_mid_stage_resumes_to_the_same_ledger(tmp_path):
    # A pool large enough that the filter stage takes a few seconds.
    rows = [dict(row) for _ in range(3000) for row in bad_pool_rows()[:-13]]
    for i, row in enumerate(rows):
        row["url"] = f"http://127.0.0.1:1/{i}.jpg"
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pool)

    run_dir = tmp_path / "killed"
    parts = ("--set", "ingest.rows_per_file=5000")  # 35 ledger files: the filter takes a while
    # Killed on the default engine (a local Ray cluster) once the filter stage has written
    # its first file, resumed in-process.
    proc = curate(run_args(pool, run_dir, "--quiet", *parts), start_new_session=True)
    filter_tmp = run_dir / "stages" / "01_filter.tmp"
    deadline = time.time() + 120
    while not list(filter_tmp.glob("*.parquet")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "stages" / "01_filter" / "_SUCCESS").exists()

    resumed = curate(run_args(pool, run_dir, "--engine", "local", *parts))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "ingest" in out and "skipped" in out  # the finished ingest stage was not redone
    run_locally(pool, tmp_path / "clean")
    assert decisions(run_dir) == decisions(tmp_path / "clean")


@pytest.mark.slow
def test_negcliploss_tasks_go_to_the_node_with_a_gpu(tmp_path):
    """A cluster whose second node declares a GPU: the neg_clip_loss tasks ask for one and all
    run there (on its CPU, as no CUDA device is there), with the scores of a local run."""
    pool = tmp_path / "metadata"
    write_datacomp_pool(pool, 600, n_files=3, seed=3)
    args = ["run", "datacomp_negcliploss", "--input", str(pool), "--quiet"]
    with local_cluster(2, 1, tmp_path / "logs", gpus=1) as address:
        run = curate([*args, "--output", str(tmp_path / "cluster"), "--address", address])
        _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    local = curate([*args, "--output", str(tmp_path / "local"), "--engine", "local"])
    _, err = local.communicate(timeout=300)
    assert local.returncode == 0, err[-3000:]
    manifest = json.loads(
        next((tmp_path / "cluster" / "stages").glob("*_neg_clip_loss/_SUCCESS")).read_text()
    )
    assert list(manifest["tasks_per_node"].values()) == [3]  # every file's task on one node
    clip = json.loads(next((tmp_path / "cluster" / "stages").glob("*_clip/_SUCCESS")).read_text())
    assert set(manifest["tasks_per_node"]) < set(clip["tasks_per_node"])  # not the head's

    def scores(run: Path) -> dict:
        table = pq.ParquetDataset([str(f) for f in ledger_files(run / "ledger")]).read()
        return dict(zip(table["uid"].to_pylist(), table["neg_clip_loss"].to_pylist()))

    assert scores(tmp_path / "cluster") == scores(tmp_path / "local")
