"""A small CLIP model trained on a demo pool's clean rows, saved as an open_clip local-dir folder.

``train_fixture_model`` gives tests a model that really tells matched from
mismatched pairs, in under a minute on two CPU cores: ``curate-tiny`` (see
``curate/clip/model_configs``) trained with the symmetric InfoNCE loss and a learned
temperature. Every image is decoded and preprocessed once with open_clip's own
eval transform for the model, and the batch order comes from the seed, so the
same pool and seed give the same weights. The saved folder loads with
``open_clip.create_model("local-dir:" + str(out_dir))``.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

from curate.clip.model_configs import register_model_configs
from curate.demo import load_manifest

MODEL = "curate-tiny"
#: One thread: on a small shared machine two OpenMP threads that compete with other
#: processes ran 5x slower than one, and a fixed count keeps the weights bit-reproducible.
THREADS = 1


def clean_rows(pool_dir: Path) -> list[dict]:
    """The manifest rows without a defect: their captions are true alt-text for their images."""
    return [row for row in load_manifest(pool_dir)["rows"] if row["defect"] is None]


def load_images(model: torch.nn.Module, pool_dir: Path, rows: list[dict]) -> torch.Tensor:
    """The rows' images as one batch, through the model's own eval transform."""
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    preprocess = image_transform_v2(cfg, is_train=False)
    images = []
    for row in rows:
        with Image.open(Path(pool_dir) / row["path"]) as image:
            images.append(preprocess(image))
    return torch.stack(images)


def _train(model, images, texts, steps: int, batch_size: int, lr: float, seed: int) -> None:
    # As open_clip's trainer: no weight decay on gains, biases and the (0-d) logit scale.
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    model.train()
    for _ in range(steps):
        if not batches:  # a new epoch: the rows in a fresh seeded order, full batches only
            batches = list(torch.randperm(len(texts), generator=order).split(batch_size))
            batches = [b for b in batches if len(b) == batch_size] or batches
        batch = batches.pop(0)
        image_features, text_features, scale = model(images[batch], texts[batch])
        logits = scale * image_features @ text_features.T
        labels = torch.arange(len(batch))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # as CLIP: the temperature never goes below 1/100
            model.logit_scale.clamp_(0, 4.6052)
    model.eval()


def train_clip(
    pool_dir: Path, seed: int = 0, steps: int = 60, batch_size: int = 64, lr: float = 1e-3
) -> torch.nn.Module:
    """``curate-tiny`` trained on the pool's clean rows (manifest ground truth), in eval mode."""
    register_model_configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(MODEL)
        rows = clean_rows(pool_dir)
        images = load_images(model, pool_dir, rows)
        texts = open_clip.get_tokenizer(MODEL)([row["caption"] for row in rows])
        _train(model, images, texts, steps, batch_size, lr, seed)
    finally:
        torch.set_num_threads(threads)
    return model


def save_local_dir(model: torch.nn.Module, out_dir: Path) -> Path:
    """Write ``model`` as an open_clip local-dir folder: its config and safetensors weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": open_clip.get_model_config(MODEL),
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model),
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Cloned, contiguous tensors: safetensors refuses tensors that share memory.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / "open_clip_model.safetensors")
    return out_dir


def train_fixture_model(
    pool_dir: Path, out_dir: Path, seed: int = 0, steps: int = 60, batch_size: int = 64
) -> Path:
    """Train ``curate-tiny`` on ``pool_dir``'s clean rows and save it to ``out_dir``; returns it."""
    return save_local_dir(train_clip(pool_dir, seed, steps, batch_size), out_dir)
