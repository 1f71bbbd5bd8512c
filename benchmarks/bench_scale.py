"""Scale-out: the driver's own memory and CPU as the pool grows, and two nodes against one.

    python benchmarks/bench_scale.py [--sizes 100000 2000000] [--workdir /tmp/curate-bench-scale]

1. Writes DataComp-format pools (``benchmarks/pool.py``'s captions and image sizes,
   2 % of rows sharing another row's sha256, 64-d fp16 ``l14_img`` vectors beside
   each file with 2 % planted near duplicates) in files of 100,000 rows.
2. Starts Ray clusters on 127.0.0.1 apart from the driver (``local_cluster.py``):
   two nodes of one CPU each, and, for the largest size, one node of two CPUs.
3. Runs ``curate run benchmarks/scale.yaml --address …`` (ingest; filters with
   global fits: alt-text frequency, rare tokens, CLIP-score top fraction; fastText
   language ID; exact and semantic dedup; balance; shards) as a subprocess that
   records its OWN peak RSS and CPU seconds when it exits (``getrusage(RUSAGE_SELF)``:
   the driver alone, not the cluster), and the wall time.
4. Writes ``benchmarks/results/bench_scale.json`` and prints a table.

Targets (the scale-out issue): from the smallest to the largest pool the driver's
peak RSS grows by at most 25 % and its CPU seconds by at most 50 %; the two-node
cluster runs at 0.9× or more the throughput of one node with the same two CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filters import curate_version, machine  # noqa: E402
from local_cluster import LOOPBACK_ENV, local_cluster  # noqa: E402
from pool import pool_table  # noqa: E402

FILE_ROWS = 100_000
DIM = 64
EXACT, NEAR = 0.02, 0.02
RECIPE = ROOT / "benchmarks" / "scale.yaml"

#: The driver: `curate run`, writing its own rusage to argv[1] when it exits.
DRIVER = """
import atexit, json, resource, sys
from curate.cli import main

def report():
    u = resource.getrusage(resource.RUSAGE_SELF)
    with open(sys.argv[1], "w") as f:
        json.dump({"peak_rss_kib": u.ru_maxrss, "cpu_seconds": u.ru_utime + u.ru_stime}, f)

atexit.register(report)
sys.exit(main(sys.argv[2:]))
"""


def write_pool(folder: Path, rows: int, seed: int = 0) -> None:
    """The pool's parquet + npz files (skipped when an earlier run wrote the same)."""
    if (folder / "_done").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1_000, DIM)).astype(np.float32)
    for i, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        table, _ = pool_table(n, seed * 1_000_003 + i)
        sha = np.asarray(table["sha256"].to_pylist(), dtype=object)
        copies = rng.choice(n, int(n * EXACT), replace=False)
        sha[copies] = sha[rng.integers(0, n, len(copies))]  # the same image bytes twice
        table = table.set_column(table.schema.get_field_index("sha256"), "sha256", [sha.tolist()])
        x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.5, size=(n, DIM))
        near = rng.choice(n, int(n * NEAR), replace=False)
        x[near] = x[rng.integers(0, n, len(near))] + rng.normal(scale=0.01, size=(len(near), DIM))
        pq.write_table(table, folder / f"{i:07d}.parquet")
        np.savez(folder / f"{i:07d}.npz", l14_img=x.astype(np.float16))
    (folder / "_done").write_text("")


def run_driver(pool: Path, out: Path, address: str, logs: Path) -> dict:
    """One `curate run` joining ``address``: the driver's own peak RSS and CPU, wall time."""
    usage = logs / f"{out.name}.usage.json"
    cmd = [sys.executable, "-c", DRIVER, str(usage), "run", str(RECIPE), "--input", str(pool),
           "--output", str(out), "--address", address, "--quiet"]  # fmt: skip
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **LOOPBACK_ENV}
    start = time.perf_counter()
    with open(logs / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    rc = rc.returncode
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"curate run failed ({rc}); see {logs / (out.name + '.log')}")
    found = json.loads(usage.read_text())
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: round(s["seconds"], 1) for s in report["stages"]}
    return {
        "rows": report["rows_in"],
        "kept": report["rows_out"],
        "wall_seconds": round(wall, 1),
        "rows_per_second": round(report["rows_in"] / wall),
        "driver_peak_rss_mib": round(found["peak_rss_kib"] / 1024, 1),
        "driver_cpu_seconds": round(found["cpu_seconds"], 1),
        "stage_seconds": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curate-bench-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_scale.json")
    args = parser.parse_args()
    work = args.workdir
    results = {"machine": machine(), "curate": curate_version(), "runs": []}
    for size in args.sizes:
        write_pool(work / f"pool-{size}", size)
    largest = max(args.sizes)
    for nodes, cpus in ((2, 1), (1, 2)):
        with local_cluster(nodes, cpus, work / f"logs-{nodes}x{cpus}") as address:
            for size in args.sizes if nodes == 2 else [largest]:
                out = work / f"run-{nodes}x{cpus}-{size}"
                shutil.rmtree(out, ignore_errors=True)
                found = run_driver(work / f"pool-{size}", out, address, work)
                found.update(nodes=nodes, cpus_per_node=cpus)
                results["runs"].append(found)
                print(json.dumps(found), flush=True)
    two = {r["rows"]: r for r in results["runs"] if r["nodes"] == 2}
    one = next(r for r in results["runs"] if r["nodes"] == 1)
    small, big = two[min(two)], two[max(two)]
    results["driver_rss_growth"] = round(
        big["driver_peak_rss_mib"] / small["driver_peak_rss_mib"] - 1, 3
    )
    results["driver_cpu_growth"] = round(
        big["driver_cpu_seconds"] / small["driver_cpu_seconds"] - 1, 3
    )
    results["two_nodes_vs_one"] = round(big["rows_per_second"] / one["rows_per_second"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
