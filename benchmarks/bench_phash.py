"""dedup_phash on the demo pool: images/s, and precision and recall on its planted duplicates.

    python benchmarks/bench_phash.py [--size 2000] [--distances 0 2 4 6 8]

1. Generates the demo pool (``curate demo``'s rates: 5 % exact and 5 % near duplicates,
   re-encoded, resized or cropped; seed 0), serves it on 127.0.0.1 and downloads it
   once (``pipelines/raw.yaml`` at 128 px, as ``curate demo``).
2. For each ``max_distance``: a run ``--from`` that download with ``dedup_phash`` alone
   (nothing is downloaded again), on the local engine. Precision: of the rows dropped,
   the share whose group survivor shows the same planted picture (the manifest's
   ``duplicate_of``); recall: of the copies to remove (each picture's copies among the
   downloaded rows, less one), the share removed. Speed: rows hashed / seconds of the
   hashing round (decode, resize, DCT), one task per ledger file.
3. Prints a table and writes ``benchmarks/results/bench_phash.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filters import curate_version, machine  # noqa: E402

from curate.core.recipe import load_recipe, recipe_from_data  # noqa: E402
from curate.demo import generate_pool, load_manifest, serve_pool  # noqa: E402
from curate.runner import run_recipe  # noqa: E402
from curate.walkthrough import DEMO_RATES  # noqa: E402

DOWNLOAD = ["download.allow_private_networks=true", "download.image_size=128"]


def quality(run: Path, pool: Path) -> dict:
    """Precision and recall of the run's dedup_phash drops against the pool's manifest."""
    rows = load_manifest(pool)["rows"]
    picture = {r["uid"]: r["duplicate_of"] or r["uid"] for r in rows}
    ledger = pq.read_table(run / "ledger").to_pylist()
    dropped = [r for r in ledger if r["dropped_by"] == "dedup_phash"]
    survivor = {r["dup_group"]: r["uid"] for r in ledger if r["keep"] and r["dup_group"]}
    right = [r for r in dropped if picture[r["uid"]] == picture[survivor[r["dup_group"]]]]
    gone = {r["uid"] for r in dropped}
    copies = Counter(picture[r["uid"]] for r in ledger if r["keep"] or r["uid"] in gone)
    should = sum(n - 1 for n in copies.values())
    return {
        "dropped": len(dropped),
        "right": len(right),
        "to_find": should,
        "precision": round(len(right) / len(dropped), 3) if dropped else None,
        "recall": round(len(right) / should, 3) if should else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2_000)
    parser.add_argument("--distances", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_phash.json")
    args = parser.parse_args()
    results = {"machine": machine(), "curate": curate_version(), "size": args.size, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-phash-") as tmp:
        work = Path(tmp)
        pool = generate_pool(work / "pool", size=args.size, seed=0, eval_size=0, rates=DEMO_RATES)
        server, urls = serve_pool(pool, port=0)
        try:
            raw = load_recipe("raw", DOWNLOAD)
            run_recipe(raw, urls, work / "raw", engine="local")
            for distance in args.distances:
                data = {
                    **raw.resolved(),
                    "name": "phash",
                    "stages": [
                        *raw.resolved()["stages"][:2],
                        {"stage": "dedup_phash", "max_distance": distance},
                    ],
                }
                recipe = recipe_from_data(data, {}, "bench_phash")
                run = work / f"phash-{distance}"
                result = run_recipe(recipe, urls, run, engine="local", base=work / "raw")
                counters = result.stages[2].counters
                results["runs"][distance] = {
                    **quality(run, pool),
                    "hashed": counters["hashed"],
                    "unhashed": counters["unhashed"],
                    "hash_seconds": counters["hash_seconds"],
                    "images_per_second": round(counters["hashed"] / counters["hash_seconds"], 1),
                    "stage_seconds": round(result.stages[2].seconds, 2),
                }
                print(distance, json.dumps(results["runs"][distance]), flush=True)
        finally:
            server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| max_distance | dropped | right | to find | precision | recall | images/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for distance, r in results["runs"].items():
        print(f"| {distance} | {r['dropped']} | {r['right']} | {r['to_find']} | "
              f"{r['precision']} | {r['recall']} | {r['images_per_second']:,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
