"""Semantic dedup at 10^6 rows: wall time, peak memory, and recall against brute force.

    python benchmarks/bench_dedup.py [--rows 1000000] [--dim 512] [--engines local ray]

1. Writes DataComp-format metadata: ``--rows`` rows in files of 50,000, each
   with an ``.npz`` of fp16 ``l14_img`` vectors. The vectors are a mixture of
   clusters, as real image embeddings are (each row: a random centre of 5,000
   plus noise, cosine ~0.75 to its centre), and 2 % of the rows are planted
   duplicates: a copy of another row of the same file plus noise (cosine
   0.96–0.995 with it), a quarter of them second copies of the same source.
2. Runs ``curate run pipelines/semdedup.yaml`` (ingest, exact, semantic with
   ε = 0.05 and k = rows / 1,000, shard) as a subprocess per engine, sampling
   the whole process tree's RSS and PSS every 0.2 s (``bench_filters.run_measured``).
3. In this process: FAISS ``IndexFlatIP`` over all vectors (unit length,
   float32) and a range search at cosine 0.95 for ``--queries`` random rows.
   Pair recall: of the pairs brute force finds, the share SemDeDup resolved
   (not both rows kept). Planted recall and precision: a drop is right when
   its group's survivor holds the same planted picture.
4. Prints a table and writes ``benchmarks/results/bench_dedup.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filters import curate_command, curate_version, machine, run_measured  # noqa: E402

FILE_ROWS = 50_000
CENTRES = 5_000
PLANTED = 0.02
EPSILON = 0.05


def write_pool(folder: Path, rows: int, dim: int, seed: int) -> np.ndarray:
    """The pool's files; returns, per row, the row whose picture it shows (itself if none)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    centres = rng.normal(size=(CENTRES, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    picture = np.arange(rows)
    for i, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        x = centres[rng.integers(0, CENTRES, n)] + rng.normal(scale=0.9 / dim**0.5, size=(n, dim))
        copies = rng.choice(n, 2 * int(n * PLANTED), replace=False)
        copies, sources = copies[: len(copies) // 2], copies[len(copies) // 2 :]
        sources[: len(sources) // 4] = sources[len(sources) // 4 : len(sources) // 2]  # triples
        scale = rng.uniform(0.1, 0.28, size=(len(copies), 1)) / dim**0.5
        x[copies] = x[sources] + scale * rng.normal(size=(len(copies), dim))
        picture[start + copies] = start + sources
        uids = [f"{start + j:032x}" for j in range(n)]
        table = pa.table(
            {
                "uid": uids,
                "url": [f"http://127.0.0.1:1/{u}.jpg" for u in uids],
                "text": ["a picture"] * n,
                "sha256": [f"{start + j:064x}" for j in range(n)],
                "clip_l14_similarity_score": rng.random(n, dtype=np.float32),
            }
        )
        pq.write_table(table, folder / f"{i:07d}.parquet")
        np.savez(folder / f"{i:07d}.npz", l14_img=x.astype(np.float16))
    return picture


def all_vectors(folder: Path) -> np.ndarray:
    parts = []
    for npz in sorted(folder.glob("*.npz")):
        with np.load(npz) as arrays:
            x = arrays["l14_img"].astype(np.float32)
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(parts)


def quality(run: Path, picture: np.ndarray) -> dict:
    """Planted recall and precision of the run's semantic drops."""
    ledger = pq.read_table(run / "ledger", columns=["uid", "keep", "dropped_by", "dup_group"])
    row = np.array([int(u, 16) for u in ledger["uid"].to_pylist()])
    keep = ledger["keep"].to_numpy(zero_copy_only=False)
    dropped = pc.fill_null(pc.equal(ledger["dropped_by"], "dedup_semantic"), False).to_numpy(
        zero_copy_only=False
    )
    group = pc.fill_null(ledger["dup_group"], -1).to_numpy()
    survivor_of = dict(zip(group[keep & (group >= 0)], row[keep & (group >= 0)]))
    right = sum(picture[r] == picture[survivor_of[g]] for r, g in zip(row[dropped], group[dropped]))
    to_find = len(picture) - len(np.unique(picture))
    return {
        "dropped": int(dropped.sum()),
        "planted_duplicates": int(to_find),
        "planted_recall": right / to_find,
        "planted_precision": right / max(1, int(dropped.sum())),
        "kept": dict(zip(row, keep)),
    }


def brute_force(x: np.ndarray, queries: int, seed: int) -> dict:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    q = np.sort(np.random.default_rng(seed).choice(len(x), queries, replace=False))
    start = time.perf_counter()
    limits, _, found = index.range_search(x[q], 1 - EPSILON)
    seconds = time.perf_counter() - start
    rows = np.repeat(q, np.diff(limits).astype(np.int64))
    other = found != rows
    return {
        "queries": queries,
        "seconds": seconds,
        "extrapolated_full_seconds": seconds * len(x) / queries,
        "pairs": np.stack([rows[other], found[other]], axis=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--engines", nargs="+", default=["local", "ray"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curate-bench-dedup"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_dedup.json")
    args = parser.parse_args()

    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    pool = args.workdir / "pool"
    start = time.perf_counter()
    picture = write_pool(pool, args.rows, args.dim, seed=0)
    print(f"pool of {args.rows:,} rows written in {time.perf_counter() - start:.0f} s", flush=True)

    results: dict = {"machine": machine(), "curate": curate_version(), "rows": args.rows,
                     "dim": args.dim, "epsilon": EPSILON, "runs": {}}  # fmt: skip
    kept_by_engine = {}
    for engine in args.engines:
        run = args.workdir / f"run-{engine}"
        cmd = [*curate_command(), "run", "pipelines/semdedup.yaml", "--input", str(pool),
               "--output", str(run), "--engine", engine, "--quiet"]  # fmt: skip
        measured = run_measured(cmd, args.workdir / f"{engine}.log")
        if measured["rc"] != 0:
            raise SystemExit(f"curate run failed; see {args.workdir / f'{engine}.log'}")
        stage = json.loads(next((run / "stages").glob("*_dedup_semantic/_SUCCESS")).read_text())
        found = quality(run, picture)
        kept_by_engine[engine] = found.pop("kept")
        results["runs"][engine] = {
            **measured,
            "semantic_stage_seconds": stage["seconds"],
            "counters": stage["counters"],
            **found,
        }
        print(engine, json.dumps(results["runs"][engine]), flush=True)

    x = all_vectors(pool)
    brute = brute_force(x, args.queries, seed=1)
    del x
    pairs = brute.pop("pairs")
    results["brute_force"] = {**brute, "pairs_found": len(pairs)}
    for engine, kept in kept_by_engine.items():
        uid_kept = np.array([kept[r] for r in range(args.rows)])
        resolved = ~(uid_kept[pairs[:, 0]] & uid_kept[pairs[:, 1]])
        results["runs"][engine]["pair_recall_vs_brute_force"] = float(resolved.mean())
    args.out.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
