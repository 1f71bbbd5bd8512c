"""Zero-shot classification and retrieval of a CLIP model on evaluation tasks, as DataComp's.

DataComp judges a curation choice by what a model trained on its output scores
downstream: zero-shot ImageNet accuracy and the average over its suite of tasks,
computed with ``clip_benchmark``. This module computes the same numbers for any
open_clip model (an architecture and weights, as the clip stage accepts them, or
a checkpoint folder) on tasks in the layouts ``curate.io.eval_tasks`` reads:

* **classification**: each class is the mean of its prompts' unit text vectors,
  re-normalised (prompt ensembling, ``clip_benchmark``'s
  ``zero_shot_classifier``); an image is scored against every class by cosine.
  Top-1 and top-5 accuracy and mean per-class recall (``curate.train.metrics``);
* **retrieval**: every caption against every image; image and text recall@1, 5
  and 10, and their mean at 1.

Each task has a main metric (accuracy, or the one its suite entry names; mean
recall@1 for retrieval), and a suite's ``average`` is the mean of its tasks' main
metrics, as DataComp averages.

Images are read as ``clip_benchmark`` reads them (converted to RGB, then
open_clip's eval transform) and embedded by the clip stage's model code in
float32. ``clip_benchmark`` runs under autocast by default (DataComp's
classifier is built in float16 on a GPU); in float32 the two agree to about 1e-6
(``tests/test_eval_parity.py``). An image that cannot be read is an error naming
it: skipping it would change the metric.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from curate.clip.embed import Embedder, decode_image
from curate.clip.model import CONFIG_FILE, folder_weights, tokenizer_for
from curate.core.config import ConfigError
from curate.core.progress import Progress
from curate.io.eval_tasks import CLASSIFICATION, Sample, Task, read_tasks
from curate.io.image_guard import DEFAULT_MAX_PIXELS
from curate.io.vectors import unit_rows
from curate.train import metrics


def check_checkpoint(checkpoint: Path) -> None:
    """A checkpoint folder holds open_clip's config and weights it reads, checked before the
    tasks are read; open_clip would otherwise build a randomly initialised model from a
    folder without them, with only a warning (``prepare_model`` checks them again)."""
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {checkpoint}: no such folder")
    if not (checkpoint / CONFIG_FILE).is_file():
        raise ConfigError(
            f"checkpoint {checkpoint}: not a checkpoint folder (no {CONFIG_FILE}; "
            "`curate train` writes one)"
        )
    folder_weights(checkpoint)


def _device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected auto, cpu or cuda")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Scorer:
    """One model, loaded once: images and texts of any task → unit vectors."""

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int):
        from curate.clip.pool import prepare_model

        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        resolved, preprocess, dim = prepare_model(model, pretrained)
        self.embedder = Embedder(resolved, preprocess, dim, _device(device), "fp32")
        self.steps = preprocess.pil_steps()
        self.tokenizer = tokenizer_for(resolved)
        self.batch_size = batch_size

    def _crop(self, sample: Sample) -> np.ndarray:
        """The image as ``clip_benchmark`` reads it: RGB first, then the eval transform."""
        crop, error = decode_image(sample.image, self._rgb_steps, DEFAULT_MAX_PIXELS)
        if error:
            raise ConfigError(f"{sample.source}: cannot read the image: {error}")
        side = self.embedder.size
        return np.frombuffer(crop, np.uint8).reshape(side, side, 3)

    def _rgb_steps(self, image):
        return self.steps(image.convert("RGB"))

    def images(self, task: Task, progress: bool) -> tuple[np.ndarray, list]:
        """Every image of ``task`` as a unit vector, and each one's truth.

        A batch's images are decoded on one thread per CPU (Pillow releases the GIL
        while it decodes and resizes). On 2 cores: decoding alone 761 against 456
        images/s on one thread; with curate-tiny's model, 457 against 363 end to end.
        """
        vectors, truths = [], []

        def embed(batch: list[Sample], pool: ThreadPoolExecutor) -> None:
            vectors.append(self.embedder.images(np.stack(list(pool.map(self._crop, batch)))))
            truths.extend(s.truth for s in batch)
            shown.add(len(batch))

        with (
            Progress(f"eval {task.name}", unit="images", enabled=progress) as shown,
            ThreadPoolExecutor(os.cpu_count() or 1) as pool,
        ):
            batch = []
            for sample in task.samples():
                batch.append(sample)
                if len(batch) == self.batch_size:
                    embed(batch, pool)
                    batch = []
            if batch:
                embed(batch, pool)
        if not truths:
            raise ConfigError(f"task {task.name}: {task.path} holds no samples")
        return np.concatenate(vectors), truths

    def texts(self, texts: list[str]) -> np.ndarray:
        """Unit text vectors, ``batch_size`` texts at a time."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size])
            out.append(self.embedder.texts(np.asarray(tokens)))
        return np.concatenate(out)

    def classifier(self, task: Task) -> np.ndarray:
        """One unit vector per class: the mean of its prompts' unit vectors, re-normalised."""
        prompts = [t.format(c=name) for name in task.classnames for t in task.templates]
        vectors = self.texts(prompts).reshape(len(task.classnames), len(task.templates), -1)
        return unit_rows(vectors.mean(axis=1))


def evaluate_task(scorer: Scorer, task: Task, progress: bool = False) -> dict:
    """One task's metrics, its main metric (``score``) and the chance level of it."""
    images, truths = scorer.images(task, progress)
    out = {"kind": task.kind, "path": str(task.path), "images": len(truths)}
    if task.kind == CLASSIFICATION:
        logits = images @ scorer.classifier(task).T
        found = metrics.classification(logits, np.array(truths))
        out |= {"classes": len(task.classnames), "chance": 1 / len(task.classnames)}
    else:
        captions = [c for texts in truths for c in texts]
        if not captions:
            raise ConfigError(f"task {task.name}: {task.path} holds no captions")
        image_of_text = np.repeat(np.arange(len(truths)), [len(t) for t in truths])
        found = metrics.retrieval(scorer.texts(captions) @ images.T, image_of_text)
        out |= {"captions": len(captions), "chance": 1 / len(truths)}
    return {**out, "metric": task.metric, "score": found[task.metric], **found}


def evaluate(
    model: str,
    tasks: Path,
    pretrained: str | None = None,
    device: str = "auto",
    batch_size: int = 128,
    progress: bool = False,
) -> dict:
    """Every task ``tasks`` names (a suite, a folder holding one, or one task), scored with
    ``model``: ``tasks`` ({name: metrics}) and ``average`` (the mean of their scores).

    The tasks are checked before the model is built, so a typo fails at once.
    """
    chosen = read_tasks(Path(tasks))
    scorer = Scorer(model, pretrained, device, batch_size)
    results = {task.name: evaluate_task(scorer, task, progress) for task in chosen}
    return {
        "model": model,
        "pretrained": pretrained,
        "tasks": results,
        "average": float(np.mean([r["score"] for r in results.values()])),
    }


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def eval_table(result: dict) -> str:
    """One row per task (its main metric beside chance), the average, then retrieval detail."""
    lines = ["| task | kind | images | metric | score | chance |", "| --- | --- |" + " ---: |" * 4]
    for name, r in result["tasks"].items():
        cells = [name, r["kind"], f"{r['images']:,}", r["metric"], _number(r["score"])]
        lines.append("| " + " | ".join([*cells, _number(r["chance"])]) + " |")
    lines.append(f"| **average** | | | | **{result['average']:.3f}** | |")
    retrieval = {n: r for n, r in result["tasks"].items() if r["kind"] != CLASSIFICATION}
    if retrieval:
        at = metrics.RECALL_AT
        head = [f"{d} R@{k}" for d in ("image", "text") for k in at]
        lines += ["", "| task | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
        for name, r in retrieval.items():
            cells = [_number(r[f"{d}_retrieval_recall@{k}"]) for d in ("image", "text") for k in at]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
