"""Zero-shot classification and image↔text retrieval of a checkpoint on a labelled eval set.

DataComp judges a curation choice by what a model trained on its output scores
downstream, at a fixed compute budget. Here the downstream tasks are the demo
pool's held-out set (``POOL/eval``: ``images/*.jpg`` and ``labels.parquet``
with a path, one column per attribute of ``VOCABULARY`` and a caption), whose
labels are exact because the images are drawn from them:

* **zero-shot classification**, per attribute: each class is a text embedding,
  the mean of several prompts' L2-normalised embeddings, re-normalised
  (prompt ensembling, as open_clip's ``build_zero_shot_classifier``); an image
  gets the class with the highest cosine. Top-1 accuracy per attribute, their
  mean, and chance (1 / classes) beside it so a reader can judge;
* **retrieval**: image→text and text→image recall@1 and @5 over the eval
  captions, as open_clip_train's ``get_clip_metrics`` reports them (a hit when
  the true item ranks below k); captions with the same text are one caption,
  the best-ranked counting, as multi-caption benchmarks (COCO) score them.

Images and captions go through the clip stage's own decode and embed code
(``curate.clip.embed``), in float32 on any device, so an eval image gets the
vector the clip stage would give it and two calls give the same numbers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.clip.embed import DecodeSpec, Embedder, decode_chunk
from curate.clip.model import (
    CONFIG_FILE,
    folder_weights,
    tokenizer_for,
)
from curate.core.config import ConfigError
from curate.demo.captions import with_article
from curate.demo.vocab import VOCABULARY
from curate.io.vectors import embedding_matrix, unit_rows

LABELS_FILE = "labels.parquet"
RECALL_AT = (1, 5)

#: Prompts per attribute, worded as the demo's captions word things (see
#: ``curate/demo/captions.py``: "an illustration of a large red circle on a striped
#: blue background"). ``{a}`` is the class name with its article ("an orange"), ``{c}``
#: the bare name. A colour is the object's, so its prompts name a shape, not a background.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": (
        "{a}",
        "a picture of {a}",
        "a drawing of {a}",
        "an illustration of {a}",
        "an image of {a}",
        "{a} shape",
    ),
    "colour": (
        "{a} shape",
        "a picture of {a} shape",
        "a drawing of {a} shape",
        "an illustration of {a} object",
        "something {c}",
    ),
    "background": (
        "{a} background",
        "a shape on {a} background",
        "a picture of a shape on {a} background",
        "a drawing on {a} background",
        "an image with {a} background",
    ),
}


def prompts(attribute: str, name: str) -> list[str]:
    """The ensemble of prompts for one class of one attribute."""
    return [t.format(a=with_article(name), c=name) for t in TEMPLATES[attribute]]


def check_checkpoint(checkpoint: Path) -> None:
    """A checkpoint folder holds open_clip's config and weights it reads, checked before the
    eval set is read; open_clip would otherwise build a randomly initialised model from a
    folder without them, with only a warning (``prepare_model`` checks them again)."""
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {checkpoint}: no such folder")
    if not (checkpoint / CONFIG_FILE).is_file():
        raise ConfigError(
            f"checkpoint {checkpoint}: not a checkpoint folder (no {CONFIG_FILE}; "
            "`curate train` writes one)"
        )
    folder_weights(checkpoint)


def read_labels(eval_set: Path) -> tuple[pa.Table, list[str]]:
    """The eval set's labels and the attributes of ``VOCABULARY`` it labels, checked."""
    path = eval_set / LABELS_FILE
    if not path.is_file():
        inside = eval_set / "eval"
        hint = (
            f"did you mean {inside}?"
            if (inside / LABELS_FILE).is_file()
            else "a demo pool's eval/ holds one"
        )
        raise ConfigError(f"eval set {eval_set}: no {LABELS_FILE} ({hint})")
    try:
        labels = pq.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{path}: not a readable Parquet file ({error})") from error
    missing = {"path", "caption"} - set(labels.column_names)
    if missing:
        raise ConfigError(f"{path}: no column {', '.join(sorted(missing))}")
    for column in ("path", "caption"):
        if not pa.types.is_string(labels[column].type) or labels[column].null_count:
            raise ConfigError(f"{path}: column {column} must hold text in every row")
    attributes = [a for a in VOCABULARY if a in labels.column_names]
    if not attributes:
        raise ConfigError(f"{path}: no attribute column ({', '.join(VOCABULARY)})")
    for attribute in attributes:
        unknown = set(labels[attribute].to_pylist()) - set(VOCABULARY[attribute])
        if unknown:
            raise ConfigError(f"{path}: {attribute} labels outside the vocabulary: {unknown}")
    if labels.num_rows == 0:
        raise ConfigError(f"{path}: no rows")
    return labels, attributes


def _embed_pairs(labels: pa.Table, eval_set: Path, prepared, device: str, batch_size: int):
    """Image and caption embeddings of every eval row (float32, L2-normalised) and the embedder.

    The images are staged in a Parquet file so the clip stage's ``decode_chunk``
    reads them as it reads downloaded shards.
    """
    resolved, preprocess, dim = prepared
    paths = labels["path"].to_pylist()
    data = []
    for rel in paths:
        if not (eval_set / rel).is_file():
            raise ConfigError(f"eval set {eval_set}: {LABELS_FILE} names {rel}, which is missing")
        data.append((eval_set / rel).read_bytes())
    n = len(paths)
    embedder = Embedder(resolved, preprocess, dim, device, "fp32")
    spec = DecodeSpec(resolved, preprocess)
    with tempfile.TemporaryDirectory(prefix="curate-eval-") as work:
        source, todo = Path(work) / "images.parquet", Path(work) / "todo.parquet"
        pq.write_table(pa.table({"uid": paths, "image": pa.array(data, pa.binary())}), source)
        pq.write_table(
            pa.table(
                {
                    "uid": paths,
                    "caption": labels["caption"],
                    "shard": [str(source)] * n,
                    "column": ["image"] * n,
                    "row": pa.array(np.arange(n), pa.int64()),
                }
            ),
            todo,
        )
        parts = []
        for k, start in enumerate(range(0, n, batch_size)):
            stop = min(n, start + batch_size)
            item = {"chunk": k, "file": 0, "todo": str(todo), "start": start, "stop": stop}
            parts.append(embedder(decode_chunk(pa.Table.from_pylist([item]), spec)))
    table = pa.concat_tables(parts)
    for rel, error in zip(paths, table["clip_error"].to_pylist()):
        if error:
            raise ConfigError(f"eval set {eval_set}: {rel}: {error}")
    images = embedding_matrix(table["image_embedding"]).astype(np.float32)
    texts = embedding_matrix(table["text_embedding"]).astype(np.float32)
    return images, texts, embedder


def _encode_texts(embedder: Embedder, tokenizer, texts: list[str]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        ids = tokenizer(texts).to(embedder.device)
        out = embedder.model.encode_text(ids).float()
    return unit_rows(out.cpu().numpy())


def zero_shot_classifier(embedder: Embedder, tokenizer, attribute: str) -> np.ndarray:
    """One unit vector per class: the mean of its prompts' unit embeddings, re-normalised."""
    names = VOCABULARY[attribute]
    texts = [p for name in names for p in prompts(attribute, name)]
    vectors = _encode_texts(embedder, tokenizer, texts)
    return unit_rows(vectors.reshape(len(names), len(TEMPLATES[attribute]), -1).mean(axis=1))


def recalls(scores: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Recall@k of each query (row) over the items (columns) that are ``correct`` for it.

    A query's rank is the number of wrong items scoring at least as high as its best
    correct one: a tie is not a hit, so a model that scores everything alike gets chance
    or worse, never a perfect score.
    """
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
    rank = (np.where(correct, -np.inf, scores) >= best).sum(axis=1)
    return {f"recall_at_{k}": float((rank < k).mean()) for k in RECALL_AT}


def _device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected auto, cpu or cuda")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate(checkpoint: Path, eval_set: Path, device: str = "auto", batch_size: int = 128) -> dict:
    """Zero-shot accuracy per attribute and retrieval recalls of ``checkpoint`` on ``eval_set``.

    Returns ``zeroshot`` ({attribute: accuracy, chance, classes}), ``zeroshot_acc``
    (their mean), ``retrieval`` (image_to_text and text_to_image recall_at_1 and
    _5, and their chance), ``recall_at_1`` and ``recall_at_5`` (means of the two
    directions) and ``images``. Captions with the same text count as the same
    caption: retrieving either is right.
    """
    from curate.clip.pool import prepare_model

    checkpoint, eval_set = Path(checkpoint), Path(eval_set)
    check_checkpoint(checkpoint)
    labels, attributes = read_labels(eval_set)
    if batch_size < 1:
        raise ConfigError("batch_size must be at least 1")
    prepared = prepare_model(str(checkpoint), None)
    images, texts, embedder = _embed_pairs(labels, eval_set, prepared, _device(device), batch_size)
    tokenizer = tokenizer_for(prepared[0])

    zeroshot = {}
    for attribute in attributes:
        names = VOCABULARY[attribute]
        truth = np.array([names.index(v) for v in labels[attribute].to_pylist()])
        predicted = (images @ zero_shot_classifier(embedder, tokenizer, attribute).T).argmax(1)
        zeroshot[attribute] = {
            "accuracy": float((predicted == truth).mean()),
            "chance": 1 / len(names),
            "classes": len(names),
        }

    captions = np.array(labels["caption"].to_pylist(), dtype=object)
    same = captions[:, None] == captions[None, :]
    scores = images @ texts.T
    n = labels.num_rows
    retrieval = {
        "image_to_text": recalls(scores, same),
        "text_to_image": recalls(scores.T, same),
        "chance": {f"recall_at_{k}": min(k, n) / n for k in RECALL_AT},
    }
    both = (retrieval["image_to_text"], retrieval["text_to_image"])
    means = {
        f"recall_at_{k}": float(np.mean([r[f"recall_at_{k}"] for r in both])) for k in RECALL_AT
    }
    return {
        "checkpoint": str(checkpoint),
        "eval_set": str(eval_set),
        "images": n,
        "zeroshot": zeroshot,
        "zeroshot_acc": float(np.mean([z["accuracy"] for z in zeroshot.values()])),
        "retrieval": retrieval,
        **means,
    }


def eval_table(result: dict) -> str:
    """Zero-shot accuracy per attribute and the retrieval recalls, as Markdown."""
    lines = ["| attribute | classes | accuracy | chance |", "| --- | ---: | ---: | ---: |"]
    for attribute, z in result["zeroshot"].items():
        lines.append(f"| {attribute} | {z['classes']} | {z['accuracy']:.3f} | {z['chance']:.3f} |")
    lines += [f"| **mean** | | **{result['zeroshot_acc']:.3f}** | |", ""]
    lines += ["| retrieval | R@1 | R@5 |", "| --- | ---: | ---: |"]
    r = result["retrieval"]
    for label, key in (("image → text", "image_to_text"), ("text → image", "text_to_image")):
        lines.append(f"| {label} | {r[key]['recall_at_1']:.3f} | {r[key]['recall_at_5']:.3f} |")
    chance = r["chance"]
    lines.append(f"| chance | {chance['recall_at_1']:.3f} | {chance['recall_at_5']:.3f} |")
    return "\n".join(lines)
