"""Training throughput of ``curate train``: samples/s end to end, and what bounds it.

    python benchmarks/bench_train.py                                   # CPU: curate-tiny
    python benchmarks/bench_train.py --device cuda --model ViT-B-32 --batch-size 256 \\
        --samples 60000 --workers 15 --image-size 512 \\
        --out benchmarks/results/bench_train_gpu.json

1. Writes ``--rows`` rows of synthetic shards as the shard stage leaves them
   (``shard-NNNNN.parquet``, 10,000 rows a file, 1,000-row row groups, an
   ``image`` struct {bytes, path}): JPEGs of ``--image-size`` on the long side
   (4:3, quality 95; default 128, ample for curate-tiny's 64 px; DataComp
   downloads at 512 for ViT-B-32's 224), smooth gradients with noise, about as
   costly to decode as photos, 64 distinct ones cycled (decoding cost is per
   image, not per distinct one), and templated captions. No download, no
   network: the GPU machine needs nothing but this script.
2. Runs ``curate.train.trainer.train`` for ``--samples`` samples seen and reports its
   own figure: samples/s over the training loop (model creation and checkpoint
   writing excluded; worker start-up and the first row groups included). On
   CUDA, ``nvidia-smi`` is sampled every 0.2 s meanwhile (``bench_clip``'s
   sampler): mean and median GPU utilisation.
3. To say what bounds it, times the two halves alone: the data stream (the
   same DataLoader and workers decoding and augmenting as many batches as the
   run took, start-up included, no model) and the model (forward, backward and
   AdamW step on one fixed random batch, no data).
4. With ``--open-clip-train``, writes the same rows as webdataset tars (one per
   row group, ``KEY.jpg`` + ``KEY.txt``) and trains the same model with the same
   batch, budget, learning rate, warm-up, weight decay, gradient clipping,
   precision, workers and seed with open_clip's own ``open_clip_train.main``,
   in a subprocess. Its speed is read from its log (every step logged): the
   step times summed, start-up of its workers included as in ours, model
   building and checkpoint writing excluded.

``--jpeg-draft`` trains with ``TrainConfig.jpeg_draft`` (open_clip_train has no
such option, so the comparison is then not like for like; say so).

Writes ``benchmarks/results/bench_train_cpu.json`` (or ``--out``) with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clip import GpuSampler  # noqa: E402
from bench_filters import busy_cpu_seconds, curate_version, machine  # noqa: E402

from curate.train.shards import HF_METADATA, IMAGE_TYPE  # noqa: E402
from curate.train.trainer import TrainConfig, model_name, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_train_cpu.json"
ROWS_PER_FILE, ROWS_PER_GROUP, DISTINCT = 10_000, 1_000, 64
SUBJECTS = ["a dog on a beach", "a red car in front of a house", "two cats asleep on a sofa",
            "a bowl of fruit on a table", "a mountain lake at dawn"]  # fmt: skip


def _jpeg(seed: int, long_side: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = long_side * 3 // 4, long_side
    y, x = np.mgrid[0:h, 0:w] * (512 / long_side)
    base = np.stack([x * rng.uniform(0.2, 0.5), y * rng.uniform(0.2, 0.6), (x + y) * 0.2], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def write_shards(folder: Path, rows: int, long_side: int) -> None:
    """Parquet shards in the shard stage's layout (schema, HF metadata, row groups)."""
    folder.mkdir(parents=True)
    jpegs = [_jpeg(i, long_side) for i in range(DISTINCT)]
    schema = pa.schema([("uid", pa.string()), ("caption", pa.string()), ("image", IMAGE_TYPE)])
    schema = schema.with_metadata({b"huggingface": HF_METADATA.encode()})
    for number, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        with pq.ParquetWriter(folder / f"shard-{number:05d}.parquet", schema) as writer:
            for group in range(start, min(start + ROWS_PER_FILE, rows), ROWS_PER_GROUP):
                ids = range(group, min(group + ROWS_PER_GROUP, start + ROWS_PER_FILE, rows))
                uids = [f"{i:032x}" for i in ids]
                images = [{"bytes": jpegs[i % DISTINCT], "path": f"{u}.jpg"}
                          for i, u in zip(ids, uids)]  # fmt: skip
                captions = [f"{SUBJECTS[i % len(SUBJECTS)]}, photo number {i}" for i in ids]
                table = pa.table([uids, captions, images], schema=schema)
                writer.write_table(table, row_group_size=len(uids))


# --- the two halves alone ------------------------------------------------------------------


def data_rate(shards: Path, ckpt: Path, config: TrainConfig, batches: int, device: str) -> float:
    """Samples/s of the trainer's data stream alone: the same dataset, loader and workers,
    and the batch's crops made on the device as the trainer makes them (no model)."""
    import torch
    from torch.utils.data import DataLoader

    from curate.train.dataset import DeviceCrops, collate, find_shards, row_groups
    from curate.train.trainer import training_dataset

    preprocess = json.loads((ckpt / "open_clip_config.json").read_text())["preprocess_cfg"]
    groups = row_groups(find_shards(shards))
    dataset = training_dataset(groups, preprocess, config, device)
    crops = DeviceCrops(dataset.crop, torch.device(device))
    loader = DataLoader(dataset, config.batch_size, num_workers=config.workers, drop_last=True,
                        collate_fn=collate, pin_memory=device == "cuda")  # fmt: skip
    start, got = time.perf_counter(), 0
    for epoch in itertools.count():  # as the trainer: workers restart each epoch
        dataset.epoch = epoch
        for batch in itertools.islice(loader, batches - got):
            crops(batch)
            got += 1
        if got >= batches:
            if device == "cuda":
                torch.cuda.synchronize()
            return got * config.batch_size / (time.perf_counter() - start)


def model_rate(config: TrainConfig, device: str, threads: int | None, steps: int) -> float:
    """Samples/s of forward + backward + AdamW on one fixed batch (the model alone).

    On CPU with the trainer's thread count: ``threads`` from its metrics.
    """
    import open_clip
    import torch

    if threads:
        torch.set_num_threads(threads)
    from curate.train.losses import LOSSES
    from curate.train.trainer import AUTOCAST

    model = open_clip.create_model(config.model, **LOSSES[config.loss].model_kwargs).to(device)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    context = open_clip.get_tokenizer(config.model).context_length
    images = torch.randn(config.batch_size, 3, size, size, device=device)
    texts = torch.randint(1, 49_000, (config.batch_size, context), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = device == "cuda" and config.precision in AUTOCAST
    autocast = torch.autocast(device, AUTOCAST.get(config.precision), enabled=amp)

    def step() -> None:
        with autocast:
            loss = LOSSES[config.loss].fn(*model(images, texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocator, cuBLAS/cuDNN autotuning
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * config.batch_size / (time.perf_counter() - start)


# --- open_clip's own trainer on the same rows ----------------------------------------------

#: ``python -c`` program: open_clip_train.main with curate's model configs registered. Its
#: webdataset reader chokes on the end-of-shard marker webdataset ≥ 0.2.96 yields
#: (open_clip issue #935); the fix its maintainers point to is ``eof_value=None``.
OPEN_CLIP_TRAIN = (
    "import functools, sys\n"
    "import open_clip_train.data as data\n"
    "from curate.clip.model_configs import register_model_configs\n"
    "register_model_configs()\n"
    "data.tar_file_expander = functools.partial(data.tar_file_expander, eof_value=None)\n"
    "from open_clip_train.main import main\n"
    "main(sys.argv[1:])\n"
)
STEP_LOG = re.compile(r"Batch \(t\): [\d.]+, ([\d.e+]+)/s,")


def write_tars(shards: Path, folder: Path) -> str:
    """Every row group of the shards as a webdataset tar; the brace pattern naming them."""
    import webdataset

    from curate.train.dataset import find_shards, row_groups

    folder.mkdir(parents=True)
    groups = row_groups(find_shards(shards))
    for n, group in enumerate(groups):
        table = pq.ParquetFile(group.path).read_row_group(group.index)
        with webdataset.TarWriter(str(folder / f"{n:05d}.tar")) as tar:
            for uid, caption, image in zip(table["uid"].to_pylist(), table["caption"].to_pylist(),
                                           table["image"].to_pylist()):  # fmt: skip
                tar.write({"__key__": uid, "jpg": image["bytes"], "txt": caption or ""})
    return str(folder / f"{{00000..{len(groups) - 1:05d}}}.tar")


def open_clip_train_rate(tars: str, config: TrainConfig, device: str, work: Path) -> dict:
    """open_clip_train.main on ``tars`` with ``config``'s settings: samples/s from its log."""
    precision = (
        ("amp_bf16" if config.precision == "bf16" else "amp") if device == "cuda" else "fp32"
    )
    if device == "cuda" and config.precision == "fp32":
        precision = "fp32"
    argv = ["--train-data", tars, "--dataset-type", "webdataset",
            "--train-num-samples", str(config.steps * config.batch_size), "--epochs", "1",
            "--model", config.model, "--batch-size", str(config.batch_size),
            "--workers", str(config.workers), "--lr", str(config.lr),
            "--warmup", str(config.warmup), "--wd", str(config.weight_decay),
            "--grad-clip-norm", str(config.grad_clip), "--precision", precision,
            "--device", device, "--seed", str(config.seed), "--log-every-n-steps", "1",
            "--logs", str(work), "--name", "open_clip_train", "--report-to", "",
            "--save-frequency", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", OPEN_CLIP_TRAIN, *argv], env=env,
                          capture_output=True, text=True)  # fmt: skip
    log = (work / "open_clip_train" / "out.log").read_text() if done.returncode == 0 else ""
    rates = [float(m) for m in STEP_LOG.findall(log)]
    if not rates:
        raise RuntimeError(f"open_clip_train failed:\n{done.stderr[-3000:]}")
    seconds = sum(config.batch_size / r for r in rates)
    return {"steps": len(rates), "seconds": round(seconds, 3),
            "samples_per_s": round(len(rates) * config.batch_size / seconds, 1),
            "precision": precision}  # fmt: skip


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (curate-tiny) or an open_clip name")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64 * 40, help="samples seen (budget)")
    parser.add_argument("--rows", type=int, default=None, help="shard rows (default: --samples)")
    parser.add_argument("--image-size", type=int, default=128, help="JPEG long side (4:3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jpeg-draft", action="store_true", help="TrainConfig.jpeg_draft")
    parser.add_argument("--decode", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--open-clip-train", action="store_true",
                        help="also train with open_clip_train.main on the same rows")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_train")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    args = parser.parse_args()

    config = TrainConfig(model=model_name(args.model), samples_seen=args.samples,
                         batch_size=args.batch_size, workers=args.workers, device=args.device,
                         precision=args.precision, jpeg_draft=args.jpeg_draft,
                         decode=args.decode)  # fmt: skip
    config.check()
    shutil.rmtree(args.work, ignore_errors=True)
    shards = args.work / "shards"
    write_shards(shards, args.rows or args.samples, args.image_size)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and _cuda()) else "cpu"

    busy, own = busy_cpu_seconds(), _own_cpu_seconds()
    with GpuSampler() if device == "cuda" else contextlib.nullcontext() as sampler:
        metrics = train(shards, args.work / "ckpt", config)
    other = busy_cpu_seconds() - busy - (_own_cpu_seconds() - own)
    data = data_rate(shards, args.work / "ckpt", config, metrics["steps"], device)
    model = model_rate(config, device, metrics["torch_threads"], 20 if device == "cuda" else 5)
    reference = None
    if args.open_clip_train:
        tars = write_tars(shards, args.work / "tars")
        reference = open_clip_train_rate(tars, config, device, args.work / "open_clip_logs")
        reference["ours_over_theirs"] = round(
            metrics["samples_per_second"] / reference["samples_per_s"], 3
        )
    result = {
        "machine": {**machine(), "gpu": _gpu_name(), "python": platform.python_version()},
        "curate": curate_version(),
        "config": asdict(config),
        "device": metrics["device"],
        "precision": metrics["precision"],
        "torch_threads": metrics["torch_threads"],
        "image_size": [args.image_size, args.image_size * 3 // 4],
        "rows": metrics["rows"],
        "samples_seen": metrics["samples_seen"],
        "seconds": metrics["seconds"],
        "samples_per_s": metrics["samples_per_second"],
        "data_only_samples_per_s": round(data, 1),
        "model_only_samples_per_s": round(model, 1),
        "final_loss": round(metrics["final_loss"], 4),
        "open_clip_train": reference,
        # CPU seconds other processes used while this one trained: a shared machine skews it.
        "other_cpu_seconds": round(other, 1),
        **(sampler.summary() if device == "cuda" else {}),
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def _own_cpu_seconds() -> float:
    """This process and its reaped children (the DataLoader workers, joined at each epoch's end)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
