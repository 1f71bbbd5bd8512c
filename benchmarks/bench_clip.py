"""CLIP embedding + scoring throughput: the clip stage end to end, decode included.

Writes a run folder as the download stage leaves it (img2dataset-style image
shards of JPEGs, 100-row row groups, and a ledger), then times the clip stage
on it, and, to say what bounds the stage, its two halves alone: decoding (one
process per CPU, as the decode tasks run; with ``--decode gpu``, also the GPU's
decoder alone) and the model's forward pass on already-decoded crops. On a GPU,
``nvidia-smi`` is sampled every 0.2 s while the stage runs.

    python benchmarks/bench_clip.py --images 2048 --engine local               # CPU
    python benchmarks/bench_clip.py --images 2048 --engine local --jpeg-draft  # fast CPU
    python benchmarks/bench_clip.py --images 50000 --engine ray --device cuda  # GPU decode

With ``--decode gpu`` or ``--jpeg-draft``, the first ``--reference`` images are
also scored with exact CPU decoding, and the score differences reported.

The images are synthetic JPEGs (quality 95) of ``--short-side`` pixels on the
short side and 4:3 (default 683 × 512: the download stage's default,
``keep_ratio`` at 512): smooth gradients with noise, about as costly to decode
as photos. Weights are random (``pretrained: random``): speed does not depend
on them.
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


def _jpeg(seed: int, short_side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:short_side, 0 : round(short_side * 4 / 3)]
    base = np.stack([x * rng.uniform(0.2, 0.5), y * rng.uniform(0.2, 0.6), (x + y) * 0.2], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def write_run(run: Path, n: int, per_shard: int = 10_000, short_side: int = 512) -> None:
    """images/NNNNN.parquet (uid, jpg) and a one-file ledger, as after the download stage."""
    # decoding cost is per image, not per distinct one
    distinct = [_jpeg(i, short_side) for i in range(64)]
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


def _decode_rate(
    stage: ClipStage, prepared, run: Path, processes: int, chunks: int, on_device: bool
) -> float:
    """Images/s of decode_chunk alone, ``processes`` at a time (``on_device``: what is
    left to the CPUs when the GPU decodes: reading, checking and tokenizing)."""
    from curate.clip.embed import DecodeSpec
    from curate.stages.clip import _chunks

    ctx = StageContext(run, run / "tmp", [run / "ledger_in" / "part-00000.parquet"], None,
                       engine=open_engine("local"))  # fmt: skip
    work = _chunks(ctx, run / "decode_work", stage.batch_size)[:chunks]
    resolved, preprocess, _ = prepared
    spec = DecodeSpec(resolved, preprocess, jpeg_draft=stage.jpeg_draft, on_device=on_device)
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


def _device_decode_rate(prepared, run: Path, device: str, batch: int, batches: int) -> float:
    """Images/s of the model worker's own decoder (nvJPEG, resize, crop) on ``device``."""
    import torch

    from curate.clip.embed import DeviceDecoder

    blobs = pq.read_table(run / "images" / "00000.parquet", columns=["jpg"])["jpg"].to_pylist()
    blobs = (blobs * (batch // len(blobs) + 1))[:batch]
    decoder = DeviceDecoder(prepared[1], torch.device(device))
    decoder(blobs)  # warm-up: nvJPEG handles, kernels
    start = time.perf_counter()
    for _ in range(batches):
        torch.stack(decoder(blobs))
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * batches / (time.perf_counter() - start)


def _score_difference(args, run: Path, scores: dict, engine) -> dict:
    """The stage's scores against exact CPU decoding's on the first ``--reference`` images."""
    reference = run.with_name(run.name + "_reference")
    shutil.rmtree(reference, ignore_errors=True)
    n = min(args.reference, args.images)
    write_run(reference, n, short_side=args.short_side)
    exact = _run_stage(args, reference, engine, decode="cpu", jpeg_draft=False)[0]
    shutil.rmtree(reference)
    diff = np.array([abs(scores[u] - exact[u]) for u in exact])
    return {"images": n, "max": float(diff.max()), "mean": float(diff.mean())}


def _run_stage(args, run: Path, engine, **decode) -> tuple[dict, float, ClipStage, tuple]:
    """The clip stage on ``run``: scores by uid, seconds, the stage, its plan."""
    stage = ClipStage(model=args.model, pretrained="random", device=args.device,
                      batch_size=args.batch_size, **decode)  # fmt: skip
    stage.name = "clip"
    out_dir = run / "stage_out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    ctx = StageContext(run, out_dir, [run / "ledger_in" / "part-00000.parquet"], None,
                       engine=engine)  # fmt: skip
    ctx.plan = stage.plan(ctx)
    start = time.perf_counter()
    stage.run(ctx)
    seconds = time.perf_counter() - start
    table = pq.read_table(run / "embeddings", columns=["uid", "clip_score"])
    scores = dict(zip(table["uid"].to_pylist(), table["clip_score"].to_pylist()))
    return scores, seconds, stage, ctx.plan


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
            "encoded": pa.array([[None] * n], pa.list_(pa.large_binary())),
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
    parser.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--jpeg-draft", action="store_true", help="Pillow's reduced-scale decode")
    parser.add_argument("--short-side", type=int, default=512, help="the JPEGs' short side")
    parser.add_argument("--reference", type=int, default=2048,
                        help="images scored again with exact CPU decoding (0: none)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_clip"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    write_run(args.work, args.images, short_side=args.short_side)
    engine = open_engine(args.engine)
    decode = {"decode": args.decode, "jpeg_draft": args.jpeg_draft}
    device = ClipStage(device=args.device)._device(engine)
    with GpuSampler() if device == "cuda" else contextlib.nullcontext() as sampler:
        scores, seconds, stage, plan = _run_stage(args, args.work, engine, **decode)
    decoded_on = stage._decode(device, plan[1])
    exact = decoded_on == "cpu" and not args.jpeg_draft
    compare = not exact and args.reference > 0
    difference = _score_difference(args, args.work, scores, engine) if compare else None
    engine.close()
    cpus = os.cpu_count() or 1
    decode_processes = max(1, cpus - 1) if device == "cuda" else cpus
    chunks = max(decode_processes * 4, 8)
    cpu_decode = _decode_rate(stage, plan, args.work, decode_processes, chunks, decoded_on == "gpu")
    device_decode = None
    if decoded_on == "gpu":
        rate = _device_decode_rate(plan, args.work, device, args.batch_size, 20)
        device_decode = round(rate, 1)
    result = {
        "model": args.model,
        "engine": args.engine,
        "device": device,
        "precision": stage.precision if device == "cuda" else "fp32",
        "decode": decoded_on,
        "jpeg_draft": args.jpeg_draft,
        "image_size": f"{round(args.short_side * 4 / 3)}x{args.short_side}",
        "images": args.images,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 2),
        "images_per_s": round(args.images / seconds, 1),
        "decode_only_images_per_s": round(cpu_decode, 1),
        "decode_processes": decode_processes,
        "device_decode_only_images_per_s": device_decode,
        "model_only_images_per_s": round(
            _model_rate(stage, plan, device, 20 if device == "cuda" else 2), 1
        ),
        "score_vs_exact_cpu_decode": difference,
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
