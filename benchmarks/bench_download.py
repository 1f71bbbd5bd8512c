"""Images/s of curate's download stage against img2dataset run directly, same pool, same settings.

    python benchmarks/bench_download.py [--size 5000] [--repeat 3] [--workdir /tmp/curate-bench-dl]

1. Generates the bundled demo pool (``curate.demo``) of ``--size`` pairs once,
   and serves it on 127.0.0.1 from this process (``curate.demo.serve``).
2. Runs, as subprocesses timed from start to exit, interleaved ``--repeat`` times:
   * ``img2dataset`` (its command line) on the pool's url list, multiprocessing
     distributor, Parquet output;
   * ``curate run`` with ingest → download, ``--engine local`` (the same
     img2dataset multiprocessing distributor, plus curate's crawl policy,
     robots.txt, the ledger join and the report);
   * the same on the Ray engine (a fresh local cluster: start-up included).
   Every run uses the settings below; the fastest of each kind is reported.
3. images/s = images downloaded / wall seconds. Prints a Markdown table and writes
   ``benchmarks/results/bench_download.json``.

Nothing leaves this machine: every url is on 127.0.0.1.
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

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_filters import curate_version, machine  # noqa: E402

from curate.demo.pool import generate_pool, serve_pool  # noqa: E402

SETTINGS = {
    "processes_count": 2,
    "thread_count": 32,
    "image_size": 512,
    "resize_mode": "keep_ratio_largest",
    "resize_only_if_bigger": True,
    "encode_format": "jpg",
    "encode_quality": 95,
    "timeout": 10,
    "retries": 0,
    "user_agent_token": "curate",
}


def img2dataset_command(urls: Path, out: Path, per_shard: int) -> list[str]:
    args = {
        **SETTINGS,
        "url_list": str(urls),
        "output_folder": str(out),
        "input_format": "parquet",
        "url_col": "url",
        "output_format": "parquet",
        "save_additional_columns": '["uid"]',
        "number_sample_per_shard": per_shard,
        "extract_exif": False,
        "compute_hash": "sha256",
        "distributor": "multiprocessing",
    }
    return ["img2dataset", *(f"--{k}={v}" for k, v in args.items())]


def curate_command(urls: Path, out: Path, per_shard: int, engine: str) -> list[str]:
    sets = {**SETTINGS, "number_sample_per_shard": per_shard, "allow_private_networks": True}
    command = [
        sys.executable,
        "-m",
        "curate.cli",
        "run",
        str(ROOT / "benchmarks" / "download.yaml"),
    ]
    command += ["--input", str(urls), "--output", str(out), "--engine", engine, "--quiet"]
    for key, value in sets.items():
        command += ["--set", f"download.{key}={json.dumps(value)}"]
    return command


def timed(command: list[str]) -> float:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def img2dataset_successes(out: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def curate_successes(out: Path) -> int:
    status = pq.read_table(out / "ledger", columns=["status"])["status"].to_pylist()
    return status.count("success")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curate-bench-dl"))
    args = parser.parse_args()

    pool = args.workdir / f"pool-{args.size}"
    if not pool.exists():
        print(f"generating a {args.size:,}-pair demo pool in {pool}", flush=True)
        generate_pool(pool, size=args.size, seed=0)
    per_shard = max(1, args.size // 8)  # four shards per process: both sides load-balance alike
    runs: dict[str, list[dict]] = {"img2dataset": [], "curate local": [], "curate ray": []}
    server, urls = serve_pool(pool)
    try:
        for i in range(args.repeat):
            for kind in runs:
                out = args.workdir / f"out-{kind.replace(' ', '-')}"
                shutil.rmtree(out, ignore_errors=True)
                if kind == "img2dataset":
                    seconds = timed(img2dataset_command(urls, out, per_shard))
                    images = img2dataset_successes(out)
                else:
                    seconds = timed(curate_command(urls, out, per_shard, kind.split()[1]))
                    images = curate_successes(out)
                runs[kind].append({"seconds": round(seconds, 2), "images": images})
                print(
                    f"  round {i + 1}: {kind:<12} {images:,} images in {seconds:.1f} s", flush=True
                )
    finally:
        server.stop()

    best = {kind: min(r, key=lambda x: x["seconds"]) for kind, r in runs.items()}
    rate = {kind: b["images"] / b["seconds"] for kind, b in best.items()}
    results = {
        "machine": machine(),
        "curate": curate_version(),
        "pool": {"size": args.size, "urls": str(urls)},
        "settings": {**SETTINGS, "number_sample_per_shard": per_shard},
        "runs": runs,
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_local": round(rate["curate local"] / rate["img2dataset"], 3),
        "ratio_ray": round(rate["curate ray"] / rate["img2dataset"], 3),
    }
    lines = [
        "| run | images | seconds (best) | images/s | vs img2dataset |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, b in best.items():
        lines.append(
            f"| {kind} | {b['images']:,} | {b['seconds']:.1f} | {rate[kind]:.0f} | "
            f"{rate[kind] / rate['img2dataset']:.2f} |"
        )
    print("\n".join(lines))
    out = ROOT / "benchmarks" / "results" / "bench_download.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
