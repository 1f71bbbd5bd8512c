"""The bundled minimal CLIP trainer: same model, same compute, different data.

``train`` fits an open_clip model (open_clip's own classes; curate's small
configs in ``curate/clip/model_configs``) on a run's Parquet shards, streamed by
``curate.train.dataset``, for a fixed budget of samples seen whatever the
dataset size — DataComp's rule: compute is fixed, only the data changes — and
writes an open_clip local-dir folder the clip stage loads (``model: <folder>``).

The recipe is open_clip_train's (``main.py``, ``train.py``, ``scheduler.py``):
AdamW with betas (0.9, 0.98) and eps 1e-6 and no weight decay on gains, biases
and logit parameters; linear warm-up then cosine decay to 0; gradient-norm
clipping; the learned temperature clamped at 100 after every step (as CLIP);
bf16/fp16 autocast on CUDA, float32 on CPU. The losses are ``curate.train.losses``.

On CPU a run is bit-reproducible from the seed: the model is initialised from
it, the data order and augmentations come from it (``ShardDataset``), batches
arrive in worker order, and torch uses a fixed number of threads (floating-point
sums, hence weights, depend on how work is split between threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from curate.clip.model import CONFIG_FILE, no_random_init_warning
from curate.clip.model_configs import CONFIG_DIR, register_model_configs
from curate.core.config import ConfigError
from curate.core.progress import Progress
from curate.core.runfolder import staged
from curate.train.dataset import (
    DeviceCrops,
    ShardDataset,
    collate,
    crop_steps,
    device_crop,
    find_shards,
    normalise,
    row_groups,
)
from curate.train.losses import LOSSES

WEIGHTS_FILE = "open_clip_model.safetensors"  # the name open_clip's local-dir loader reads first
MAX_LOGIT_SCALE = math.log(100)  # CLIP: the temperature never goes below 1/100
CURVE_POINTS = 500  # at most this many (step, mean loss) points in metrics.json
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    model: str = "curate-tiny"  # an open_clip architecture (curate/clip/model_configs: registered)
    samples_seen: int = 20_000  # the fixed budget (DataComp's rule), whatever the dataset size
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50  # steps of linear warm-up, then cosine to 0
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "siglip" (sigmoid, learned bias)
    seed: int = 0
    workers: int = 2  # DataLoader worker processes
    device: str = "auto"  # cuda when available
    precision: str = "bf16"  # autocast on CUDA ("bf16", "fp16", "fp32"); CPU is float32
    jpeg_draft: bool = False  # workers decode JPEGs at a reduced DCT scale (dataset.py): faster
    decode: str = "auto"  # "gpu": JPEGs decoded on the training GPU (dataset.py); auto: on CUDA

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.precision not in (*AUTOCAST, "fp32"):
            raise ConfigError(f"precision {self.precision!r}: expected bf16, fp16 or fp32")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r}: expected auto, cpu or cuda")
        if self.decode not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"decode {self.decode!r}: expected auto, cpu or gpu")
        if self.decode == "gpu" and not torch.cuda.is_available():
            raise ConfigError("decode gpu: no CUDA device is available")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda: no CUDA device is available")
        if not 0 <= self.seed < 2**63:  # numpy's and torch's generators both take these
            raise ConfigError(f"seed {self.seed}: expected an integer from 0 to 2**63 - 1")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ConfigError("lr must be > 0, weight_decay and grad_clip ≥ 0")
        if self.batch_size < 1 or self.workers < 0 or self.warmup < 0:
            raise ConfigError("batch_size must be ≥ 1, workers and warmup ≥ 0")
        if self.samples_seen < self.batch_size:
            raise ConfigError(
                f"samples_seen {self.samples_seen} is less than one batch ({self.batch_size})"
            )
        register_model_configs()
        if self.model not in open_clip.list_models():
            raise ConfigError(
                f"model {self.model!r}: not an open_clip architecture "
                f"(curate's own: {', '.join(bundled_models())})"
            )

    @property
    def steps(self) -> int:
        return self.samples_seen // self.batch_size  # full batches only


def bundled_models() -> list[str]:
    """curate's own architectures (``curate/clip/model_configs``), e.g. ``curate-tiny``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_name(name: str) -> str:
    """``tiny`` → ``curate-tiny`` when curate bundles it; any other name as given."""
    return f"curate-{name}" if f"curate-{name}" in bundled_models() else name


def train(shards: Path, out: Path, config: TrainConfig, progress: bool = False) -> dict:
    """Train on the Parquet shards in ``shards``; write the checkpoint folder ``out``.

    ``out`` gets open_clip_config.json + open_clip_model.safetensors (loadable
    by ``open_clip.create_model("local-dir:" + str(out))`` and by the clip stage
    as ``model: <out>``), metrics.json and loss.png; it is written under a
    temporary name and renamed when complete. Returns the metrics. ``progress`` draws
    a ``curate.core.progress`` line on stderr: samples, samples/s, time left, step, loss.
    """
    config.check()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out {out}: exists and is not an empty folder")
    groups = row_groups(find_shards(shards))
    device = _device(config)
    with _fixed_threads(device, config.workers):
        torch.manual_seed(config.seed)
        with no_random_init_warning():  # from scratch is the point here
            model = open_clip.create_model(config.model, **LOSSES[config.loss].model_kwargs)
        model.to(device)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        dataset = training_dataset(groups, preprocess, config, device)
        losses, seconds = _fit(model, dataset, config, device, progress)
        threads = torch.get_num_threads()
    metrics = _metrics(config, device, threads, dataset, losses, seconds, model)
    _save(model, config, metrics, out)
    return metrics


def training_dataset(
    groups: list, preprocess: dict, config: TrainConfig, device: str
) -> ShardDataset:
    """The samples a run trains on: the model's train transform, decoded where ``config``
    says (``decode``, ``jpeg_draft``) for ``device``."""
    draft = max(_pair(preprocess["size"])) if config.jpeg_draft else 0
    crop = crop_steps(preprocess)
    on_device = _decode_on_device(config, device, crop)
    tokenizer = open_clip.get_tokenizer(config.model)
    return ShardDataset(groups, crop, tokenizer, config.seed, draft, on_device)


def _decode_on_device(config: TrainConfig, device: str, crop) -> bool:
    """Whether JPEGs are decoded on the GPU: asked for (``gpu``), or ``auto`` on CUDA with a
    train transform the device can apply (a random resized crop and nothing else)."""
    able = device == "cuda" and device_crop(crop) is not None
    if config.decode == "gpu" and not able:
        raise ConfigError(
            f"decode gpu: the model trains on {device} with the transform {crop}; "
            "the GPU applies only a random resized crop on CUDA (use decode cpu)"
        )
    return config.decode == "gpu" or (config.decode == "auto" and able)


def _pair(size) -> tuple[int, int]:
    """open_clip's image size: an int, or (height, width)."""
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


@contextlib.contextmanager
def _fixed_threads(device: str, workers: int):
    """On CPU, the cores the DataLoader workers leave free, whatever torch had (then restored)."""
    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- the loop ------------------------------------------------------------------------------


def _fit(model, dataset: ShardDataset, config: TrainConfig, device: str, show: bool):
    """``config.steps`` optimizer steps; the per-step losses and the seconds they took."""
    optimizer = _optimizer(model, config)
    cuda = device == "cuda"
    amp = cuda and config.precision in AUTOCAST
    autocast = torch.autocast(device, AUTOCAST.get(config.precision), enabled=amp)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device, enabled=amp and config.precision == "fp16")
    loss_fn = LOSSES[config.loss].fn
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean, std = (
        torch.tensor(preprocess[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std")
    )
    losses: list[torch.Tensor] = []  # kept on the device: no host sync per step

    def step_and_loss() -> str:  # the only host sync, and only when the line is drawn
        recent = torch.stack(losses[-10:]).float().mean().item() if losses else math.nan
        return f"step {len(losses)}/{config.steps}  loss {recent:.4f}"

    samples = config.steps * config.batch_size
    meter = Progress("train", samples, unit="samples", enabled=show, extra=step_and_loss)
    model.train()
    start = time.perf_counter()
    crops = DeviceCrops(dataset.crop, torch.device(device))
    for step, batch in enumerate(_batches(dataset, config, cuda)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.lr, config.warmup, config.steps)
        images = normalise(crops(batch), mean, std)
        texts = batch["tokens"].to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(*model(images, texts))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.detach())
        meter.add(config.batch_size)
    if cuda:
        torch.cuda.synchronize()  # the last steps' kernels are still queued
    seconds = time.perf_counter() - start
    meter.close()
    model.eval()
    return torch.stack(losses).float().tolist(), seconds


def _batches(dataset: ShardDataset, config: TrainConfig, pin: bool):
    """Exactly ``config.steps`` full batches, epoch after epoch (each a fresh shuffle)."""
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=config.workers,
        drop_last=True,  # a worker's last partial batch of an epoch is skipped
        collate_fn=collate,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(config.seed),
    )
    left = config.steps
    for epoch in itertools.count():
        dataset.epoch = epoch
        got = 0
        for batch in itertools.islice(loader, left):
            got += 1
            yield batch
        left -= got
        if not left:
            return
        if not got:
            raise ConfigError(
                f"{dataset.rows} rows give no full batch of {config.batch_size} per worker "
                f"({config.workers} workers): lower batch_size or workers"
            )


def cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """open_clip_train's ``cosine_lr``: linear warm-up to ``lr``, then half a cosine to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * lr


def _optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on gains, biases and logit parameters (open_clip_train)."""

    def exempt(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale"))

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": config.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


# --- the checkpoint ------------------------------------------------------------------------


def _metrics(config, device, threads, dataset, losses, seconds, model) -> dict:
    window = math.ceil(len(losses) / CURVE_POINTS)
    curve = [
        [min(i + window, len(losses)), sum(losses[i : i + window]) / len(losses[i : i + window])]
        for i in range(0, len(losses), window)
    ]
    samples = len(losses) * config.batch_size
    bias = getattr(model, "logit_bias", None)
    return {
        "config": dataclasses.asdict(config),
        "device": device,
        "precision": config.precision if device == "cuda" else "fp32",
        "torch_threads": threads if device == "cpu" else None,
        "rows": dataset.rows,
        "row_groups": len(dataset.groups),
        "samples_seen": samples,
        "steps": len(losses),
        "epochs": round(samples / dataset.rows, 3),
        "seconds": round(seconds, 3),
        "samples_per_second": round(samples / seconds, 1),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),  # one step's loss is noisy
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": None if bias is None else float(bias.detach()),
        "loss_curve": curve,  # [last step of the window, mean loss over the window]
    }


def _save(model, config: TrainConfig, metrics: dict, out: Path) -> None:
    """The open_clip local-dir layout, written beside ``out`` and renamed into place."""
    with staged(out) as partial:  # out: new or empty, checked before training
        # The model's own config plus the loss's logit initialisers: a SigLIP model must be
        # rebuilt with its logit_bias parameter for its weights to load.
        model_cfg = {**open_clip.get_model_config(config.model), **LOSSES[config.loss].model_kwargs}
        open_clip_config = {
            "model_cfg": model_cfg,
            "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
        }
        (partial / CONFIG_FILE).write_text(json.dumps(open_clip_config, indent=2) + "\n")
        # Cloned, contiguous CPU tensors: safetensors refuses tensors that share memory.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, partial / WEIGHTS_FILE)
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        _plot(metrics, partial / "loss.png")


def _plot(metrics: dict, path: Path) -> None:
    """The loss curve as a PNG (matplotlib's Agg canvas: no display, no global backend)."""
    from matplotlib.figure import Figure

    config = metrics["config"]
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    steps, values = zip(*metrics["loss_curve"])
    axes.plot(steps, values, linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel(f"{config['loss']} loss")
    axes.set_title(
        f"{config['model']}, {metrics['samples_seen']:,} samples seen, seed {config['seed']}"
    )
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
