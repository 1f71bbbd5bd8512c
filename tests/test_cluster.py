"""A real two-node Ray cluster on this machine, and a run killed mid-stage then resumed.

All Ray traffic stays on 127.0.0.1: the head is started with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's own switch for "use loopback"), and
the second node, which Ray would otherwise re-address to the machine's
external interface, is started with its loopback address kept as given.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bad_pool_rows

from curate.runner import ledger_files

ROOT = Path(__file__).resolve().parent.parent
# Ray enables token authentication for a loopback cluster; every member must use it.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
}

# `ray start` for a worker node, keeping --node-ip-address=127.0.0.1 as given.
WORKER_NODE = (
    "import sys, ray._private.services as s, ray.scripts.scripts as cli; "
    "s.resolve_ip_for_localhost = lambda host: host; sys.exit(cli.main())"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], env: dict, tmp: Path) -> subprocess.Popen:
    log = open(tmp / f"node-{len(list(tmp.glob('node-*')))}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for_log(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.time() < deadline, f"{log.name} never said {text!r}:\n{log.read_text()[-2000:]}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


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


@pytest.mark.slow
def test_recipe_runs_on_a_two_node_cluster(bad_pool, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = [
        "--num-cpus=1",
        "--disable-usage-stats",
        "--block",
        "--object-store-memory=200000000",
        "--node-ip-address=127.0.0.1",
    ]
    head = start(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            *common,
        ],
        LOOPBACK_ENV,
        tmp_path,
    )
    worker = None
    try:
        wait_for_log(tmp_path / "node-0.log", "Ray runtime started")
        worker = start(
            [sys.executable, "-c", WORKER_NODE, "start", f"--address={address}", *common],
            {
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            },
            tmp_path,
        )
        probe = (
            f"import ray, time; ray.init(address='{address}', log_to_driver=False)\n"
            "for _ in range(60):\n"
            "    nodes = [n for n in ray.nodes() if n['Alive']]\n"
            "    if len(nodes) == 2: break\n"
            "    time.sleep(1)\n"
            "print(sorted(n['NodeManagerAddress'] for n in nodes))"
        )
        seen = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            env={**os.environ, **LOOPBACK_ENV},
            timeout=120,
        )
        assert seen.stdout.strip() == "['127.0.0.1', '127.0.0.1']", seen.stderr[-2000:]

        run = curate(run_args(bad_pool, tmp_path / "cluster", "--address", address))
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        run_locally(bad_pool, tmp_path / "local")
        assert decisions(tmp_path / "cluster") == decisions(tmp_path / "local")
    finally:
        if worker is not None:
            stop(worker)
        stop(head)


@pytest.mark.slow
def test_run_killed_mid_stage_resumes_to_the_same_ledger(tmp_path):
    # A pool large enough that the filter stage takes a few seconds.
    rows = [dict(row) for _ in range(3000) for row in bad_pool_rows()[:-13]]
    for i, row in enumerate(rows):
        row["url"] = f"http://127.0.0.1:1/{i}.jpg"
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pool)

    run_dir = tmp_path / "killed"
    # Killed on the default engine (a local Ray cluster), resumed in-process.
    proc = curate(run_args(pool, run_dir, "--quiet"), start_new_session=True)
    filter_tmp = run_dir / "stages" / "01_filter.tmp"
    deadline = time.time() + 120
    while not filter_tmp.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "stages" / "01_filter" / "_SUCCESS").exists()

    resumed = curate(run_args(pool, run_dir, "--engine", "local"))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "ingest" in out and "skipped" in out  # the finished ingest stage was not redone
    run_locally(pool, tmp_path / "clean")
    assert decisions(run_dir) == decisions(tmp_path / "clean")
