"""CLIP embedding + scoring throughput: the clip stage end to end, decode included.

Writes a run folder as the download stage leaves it (img2dataset-style image
shards of JPEGs, 100-row row groups, and a ledger), then times the clip stage
on it, and, to say what bounds the stage, its two halves alone: decoding (one
process per CPU, as the decode tasks run) and the model's forward pass on
already-decoded crops. On a GPU, ``nvidia-smi`` is sampled every 0.2 s while
the stage runs.

    python benchmarks/bench_clip.py --images 2048 --engine local          # CPU
    python benchmarks/bench_clip.py --images 50000 --engine ray --device cuda

The images are synthetic 512 × 384 JPEGs (quality 95, DataComp's download
size): smooth gradients with noise, about as costly to decode as photos.
Weights are random (``pretrained: random``): speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.runfolder import claim
from curate.core.stage import StageContext
from curate.engine import open_engine
from curate.io.images import write_index
from curate.stages.clip import ClipStage

CAPTIONS = ["a photo of a dog on a beach", "a red car in front of a house", "two cats asleep"]


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:384, 0:512]
    base = np.stack([x * rng.uniform(0.2, 0.5), y * rng.uniform(0.2, 0.6), (x + y) * 0.2], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def write_run(run: Path, n: int, per_shard: int = 10_000) -> None:
    """images/NNNNN.parquet (uid, jpg) and a one-file ledger, as after the download stage."""
    distinct = [_jpeg(i) for i in range(64)]  # decoding cost is per image, not per distinct one
    with claim(run, "run"):  # a run folder: the clip stage replaces its embeddings/ only there
        pass
    (run / "images").mkdir(parents=True)
    (run / "ledger_in").mkdir()
    uids = [f"{i:032x}" for i in range(n)]
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        part = uids[start : start + per_shard]
        jpg = pa.array([distinct[i % 64] for i in range(start, start + len(part))], pa.binary())
        pq.write_table(pa.table({"uid": part, "jpg": jpg}), run / "images" / f"{s:05d}.parquet",
                       row_group_size=100)  # fmt: skip
        shards.append(f"{s:05d}")
    write_index(run / "images", [shards])  # the one ledger file's image shards
    ledger = pa.table(
        {
            "uid": uids,
            "caption": [CAPTIONS[i % 3] + f" number {i}" for i in range(n)],
            "status": ["success"] * n,
            "sha256": ["0" * 64] * n,
            "keep": [True] * n,
            "dropped_by": pa.nulls(n, pa.string()),
        }
    )
    pq.write_table(ledger, run / "ledger_in" / "part-00000.parquet")


class GpuSampler:
    """Mean and median GPU utilisation from nvidia-smi, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"gpu_util_mean": round(float(np.mean(self.samples)), 1),
                "gpu_util_median": float(np.median(self.samples))}  # fmt: skip


def _decode_rate(stage: ClipStage, prepared, run: Path, processes: int, chunks: int) -> float:
    """Images/s of decode_chunk alone, ``processes`` at a time."""
    from curate.clip.embed import DecodeSpec
    from curate.stages.clip import _chunks

    ctx = StageContext(run, run / "tmp", [run / "ledger_in" / "part-00000.parquet"], None,
                       engine=open_engine("local"))  # fmt: skip
    work = _chunks(ctx, run / "decode_work", stage.batch_size)[:chunks]
    resolved, preprocess, _ = prepared
    spec = DecodeSpec(resolved, preprocess)
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_decode_one, [(w, spec) for w in work[:processes]]))  # warm: imports
        start = time.perf_counter()
        rows = sum(pool.map(_decode_one, [(w, spec) for w in work]))
    shutil.rmtree(run / "decode_work")
    return rows / (time.perf_counter() - start)


def _decode_one(args) -> int:
    from curate.clip.embed import decode_chunk

    work, spec = args
    return len(decode_chunk(pa.Table.from_pylist([work]), spec)["errors"][0])


def _model_rate(stage: ClipStage, prepared, device: str, batches: int) -> float:
    """Images/s of the model alone (image and text towers) on decoded crops."""
    from curate.clip.embed import Embedder
    from curate.clip.model import tokenizer_for

    resolved, preprocess, dim = prepared
    size, n = preprocess.size, stage.batch_size
    context = tokenizer_for(resolved).context_length
    embedder = Embedder(resolved, preprocess, dim, device, stage.precision)
    rng = np.random.default_rng(0)
    batch = pa.table(
        {
            "chunk": [0],
            "file": [0],
            "uids": [[f"{i:032x}" for i in range(n)]],
            "errors": pa.array([[None] * n], pa.list_(pa.string())),
            "has_text": [[True] * n],
            "pixels": pa.array(
                [rng.integers(0, 255, (n, size, size, 3), np.uint8).tobytes()], pa.large_binary()
            ),
            "tokens": pa.array(
                [rng.integers(1, 400, (n, context)).astype(np.int32).tobytes()], pa.large_binary()
            ),
            "context": [context],
        }
    )
    embedder(batch)  # warm-up (cuDNN/cuBLAS autotuning)
    start = time.perf_counter()
    for _ in range(batches):
        embedder(batch)
    return n * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_clip"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    write_run(args.work, args.images)
    stage = ClipStage(model=args.model, pretrained="random", device=args.device,
                      batch_size=args.batch_size)  # fmt: skip
    stage.name = "clip"
    engine = open_engine(args.engine)
    out_dir = args.work / "stage_out"
    out_dir.mkdir()
    ctx = StageContext(args.work, out_dir, [args.work / "ledger_in" / "part-00000.parquet"], None,
                       engine=engine)  # fmt: skip
    ctx.plan = stage.plan(ctx)
    device = stage._device(engine)
    with GpuSampler() if device == "cuda" else contextlib.nullcontext() as sampler:
        start = time.perf_counter()
        stage.run(ctx)
        seconds = time.perf_counter() - start
    engine.close()
    cpus = os.cpu_count() or 1
    decode_processes = max(1, cpus - 1) if device == "cuda" else cpus
    result = {
        "model": args.model,
        "engine": args.engine,
        "device": device,
        "precision": stage.precision if device == "cuda" else "fp32",
        "images": args.images,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 2),
        "images_per_s": round(args.images / seconds, 1),
        "decode_only_images_per_s": round(
            _decode_rate(
                stage, ctx.plan, args.work, decode_processes, chunks=max(decode_processes * 4, 8)
            ),
            1,
        ),
        "decode_processes": decode_processes,
        "model_only_images_per_s": round(
            _model_rate(stage, ctx.plan, device, 20 if device == "cuda" else 2), 1
        ),
        **(sampler.summary() if device == "cuda" else {}),
        "machine": f"{platform.machine()}, {cpus} CPUs, {_gpu_name() or 'no GPU'}",
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


if __name__ == "__main__":
    main()
