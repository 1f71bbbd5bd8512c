"""negCLIPLoss over DataComp-format pairs: rows/s of the ``neg_clip_loss`` stage, and memory.

    python benchmarks/bench_negclip.py [--rows 1000000] [--dim 768] [--repeats 10]

1. Writes DataComp-format metadata: ``--rows`` rows in files of 50,000 (DataComp's
   are larger; 50,000 makes each file a batch of 32,768 and one of 17,232, the paper's
   batch size), each with an ``.npz`` of fp16 ``l14_img`` and ``l14_txt``: unit
   vectors, each caption's near its image (cosine ~0.3, as CLIP's pairs).
2. Runs ``curate run pipelines/datacomp_negcliploss.yaml`` (ingest, ``clip:
   {precomputed: l14}``, ``neg_clip_loss`` with ``--repeats``, the top 30 %, shard)
   as a subprocess, sampling the process tree's RSS (``bench_filters.run_measured``).
3. Reports the stage's rows/s (rows scored / its seconds in the stage manifest) and
   writes ``benchmarks/results/bench_negclip.json``.

The cost per row is one row of ``batch × batch`` similarities per repeat: rows/s falls
as 1 / (batch size × repeats) and does not depend on ``--rows`` once files hold a whole
batch. On a GPU (seen by the process) the stage runs there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filters import curate_command, curate_version, machine, run_measured  # noqa: E402

FILE_ROWS = 50_000


def write_pool(folder: Path, rows: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        image = rng.normal(size=(n, dim)).astype(np.float32)
        text = image + rng.normal(scale=3.0, size=(n, dim)).astype(np.float32)
        unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text)]
        uids = [f"{u:016x}{v:016x}" for u, v in rng.integers(0, 2**63, (n, 2))]
        table = pa.table(
            {
                "uid": uids,
                "url": [f"http://127.0.0.1:9/{start + j}.jpg" for j in range(n)],
                "text": [f"a photo of item {start + j}" for j in range(n)],
            }
        )
        pq.write_table(table, folder / f"{i:08d}.parquet")
        np.savez(
            folder / f"{i:08d}.npz",
            l14_img=unit[0].astype(np.float16),
            l14_txt=unit[1].astype(np.float16),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32_768)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_negclip"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_negclip.json")
    args = parser.parse_args()
    pool, run = args.workdir / f"pool-{args.rows}-{args.dim}", args.workdir / "run"
    if not pool.is_dir():
        start = time.perf_counter()
        write_pool(pool, args.rows, args.dim, seed=0)
        print(f"pool: {args.rows:,} rows in {time.perf_counter() - start:.1f} s", flush=True)
    if run.exists():
        shutil.rmtree(run)
    cmd = [*curate_command(), "run", str(ROOT / "pipelines/datacomp_negcliploss.yaml"),
           "--input", str(pool), "--output", str(run), "--engine", "local", "--quiet",
           "--set", f"neg_clip_loss.repeats={args.repeats}",
           "--set", f"neg_clip_loss.batch_size={args.batch_size}"]  # fmt: skip
    measured = run_measured(cmd, args.workdir / "run.log")
    if measured["rc"] != 0:
        sys.exit(f"curate run failed ({measured['rc']}): see {args.workdir / 'run.log'}")
    manifest = json.loads(next((run / "stages").glob("*_neg_clip_loss/_SUCCESS")).read_text())
    seconds = manifest["seconds"]
    scored = manifest["counters"]["scored"]
    results = {
        "machine": machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "curate": curate_version(),
        "rows": args.rows,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "scored": scored,
        "stage_seconds": round(seconds, 1),
        "rows_per_second": round(scored / seconds, 1),
        "run_seconds": round(measured["seconds"], 1),
        "run_rc": measured["rc"],
        "peak_rss_gib": round(measured["rss"] / 2**30, 2),
        "other_cpu_seconds": round(measured["other_cpu_seconds"], 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
