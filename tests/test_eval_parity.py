"""``curate eval`` gives ``clip_benchmark``'s numbers, computed as DataComp's ``evaluate.py``
computes them, on small tasks of every layout written here.

The reference side is DataComp's code path with ``clip_benchmark`` 1.6.2 (a test-only
dependency): the model from ``open_clip.create_model_and_transforms``, webdataset tasks
read by ``clip_benchmark``'s ``build_dataset``, ImageNet-style folders by torchvision's
``ImageFolder``, ``zero_shot_classifier`` and ``run_classification`` (as
``eval_utils/wds_eval.py``), ``zeroshot_retrieval.evaluate`` with recall@1, 5, 10 (as
``eval_utils/retr_eval.py``). Both sides run in float32 (``amp=False``). The
classification tasks are written with ``clip_benchmark``'s own ``convert_dataset``;
the demo pool's tasks (written by curate) are checked too.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
import webdataset
from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification as zsc
from clip_benchmark.metrics import zeroshot_retrieval as zsr
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, path_to_bytes
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from torchvision.datasets import ImageFolder

from curate.demo.captions import with_article
from curate.demo.tasks import COLOUR_GROUPS, PROMPTS
from curate.demo.vocab import VOCABULARY
from curate.train import metrics
from curate.train.evaluate import evaluate

BATCH = 64


def accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy``, except ``.item()`` where it calls ``float()`` on a
    1-d array, which numpy 2 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


class Labelled(list):
    """(image, label) pairs with the ``classes`` and ``templates`` ``convert_dataset`` saves."""

    def __init__(self, pairs, classes, templates):
        super().__init__(pairs)
        self.classes, self.templates = classes, templates


@pytest.fixture(scope="module")
def tasks(demo_pool: Path, tmp_path_factory) -> Path:
    """A suite of every layout, built from the demo pool's eval images."""
    root = tmp_path_factory.mktemp("tasks")
    labels = pq.read_table(demo_pool / "eval" / "labels.parquet").to_pylist()
    images = [demo_pool / "eval" / row["path"] for row in labels]

    def classes(attribute):
        return [with_article(n) for n in VOCABULARY[attribute]]

    def index(row, attribute):
        return VOCABULARY[attribute].index(row[attribute])

    colour = [(str(p), index(r, "colour")) for p, r in zip(images, labels)]
    convert_dataset(  # jpg files copied as they are, 50 samples a shard: 3 shards
        Labelled(colour, classes("colour"), list(PROMPTS["colour"])),
        "test", str(root / "colour"), transform=path_to_bytes, max_count=50, verbose=False,
    )  # fmt: skip
    shape = [(Image.open(p).convert("RGB"), index(r, "shape")) for p, r in zip(images, labels)]
    convert_dataset(  # re-encoded as lossless WebP
        Labelled(shape, classes("shape"), list(PROMPTS["shape"])),
        "test", str(root / "shape"), transform=PIL_to_bytes("webp"), verbose=False,
    )  # fmt: skip

    folder = root / "background"
    for i, (path, row) in enumerate(zip(images, labels)):
        (folder / row["background"]).mkdir(parents=True, exist_ok=True)
        suffix = ".png" if i % 3 == 0 else ".jpg"  # ImageFolder's walk finds both
        Image.open(path).save(folder / row["background"] / f"{i:04d}{suffix}")
    names = [with_article(n) for n in sorted(VOCABULARY["background"])]
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "\n".join(PROMPTS["background"]) + "\n"
    )

    # Two captions per image: its own, and a shorter one. Each is unique: two images with
    # the same caption tie exactly, and ties are the one place the two may differ.
    captions = [[r["caption"], f"{r['colour']} {r['shape']} {i}"] for i, r in enumerate(labels)]
    retrieval = root / "retrieval"
    (retrieval / "test").mkdir(parents=True)
    (retrieval / "dataset_type.txt").write_text("retrieval\n")
    with webdataset.ShardWriter(str(retrieval / "test" / "%d.tar"), maxcount=70) as sink:
        for i, (path, texts) in enumerate(zip(images, captions)):
            sink.write({"__key__": f"s{i:07d}", "jpg": path.read_bytes(), "txt": "\n".join(texts)})
    (retrieval / "test" / "nshards.txt").write_text("2\n")
    shutil.copytree(demo_pool / "eval" / "images", root / "images")
    with open(root / "captions.csv", "w", newline="") as f:
        rows = [(r["path"], c) for r, texts in zip(labels, captions) for c in texts]
        csv.writer(f).writerows([("image", "caption"), *rows])

    suite = [
        "- colour",
        "- path: shape\n  metric: mean_per_class_recall",
        "- background",
        "- retrieval",
        "- captions.csv",
    ]
    (root / "suite.yaml").write_text("\n".join(suite) + "\n")
    return root


@pytest.fixture(scope="module")
def reference_model(fixture_model):
    """The model, transform and tokenizer as DataComp's ``create_model`` makes them."""
    name = f"local-dir:{fixture_model}"
    model, _, transform = open_clip.create_model_and_transforms(name)
    return model.eval(), transform, open_clip.get_tokenizer(name)


def _classification(reference_model, dataset, classes, templates, loader) -> dict:
    model, _, tokenizer = reference_model
    classifier = zsc.zero_shot_classifier(model, tokenizer, classes, templates, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    if len(classes) >= 5:  # as DataComp's wds_eval: top-5 only with 5 classes or more
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,), acc5 = accuracy(logits, target), None
    pred = logits.argmax(axis=1)
    recall = balanced_accuracy_score(target, pred)
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def _wds_classification(reference_model, folder: Path) -> dict:
    transform = reference_model[1]
    dataset = build_dataset(
        f"wds/{folder.name}", root=str(folder), transform=transform, split="test", download=False
    )
    loader = torch.utils.data.DataLoader(dataset.batched(BATCH), batch_size=None)
    return _classification(reference_model, dataset, dataset.classes, dataset.templates, loader)


def _folder_classification(reference_model, folder: Path) -> dict:
    dataset = ImageFolder(str(folder), transform=reference_model[1])
    classes = (folder / "classnames.txt").read_text().splitlines()
    templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
    return _classification(reference_model, dataset, classes, templates, loader)


def _retrieval(reference_model, samples: list) -> dict:
    model, _, tokenizer = reference_model
    loader = torch.utils.data.DataLoader(
        samples, batch_size=BATCH, collate_fn=image_captions_collate_fn
    )
    found = zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    found["mean_recall@1"] = 0.5 * (
        found["text_retrieval_recall@1"] + found["image_retrieval_recall@1"]
    )
    return found


def _wds_retrieval(reference_model, folder: Path) -> dict:
    dataset = build_dataset(
        f"wds/{folder.name}", root=str(folder), transform=reference_model[1], split="test",
        download=False, task="zeroshot_retrieval",
    )  # fmt: skip
    return _retrieval(reference_model, list(dataset))


def _table_retrieval(reference_model, table: Path) -> dict:
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(row["image"], []).append(row["caption"])
    transform = reference_model[1]
    samples = [
        (transform(Image.open(table.parent / image).convert("RGB")), texts)
        for image, texts in grouped.items()
    ]
    return _retrieval(reference_model, samples)


def _assert_same(ours: dict, theirs: dict) -> None:
    for key, value in theirs.items():
        assert ours[key] == (value if value is None else pytest.approx(value, abs=1e-6)), key


def test_every_layout_scores_as_clip_benchmark_scores_it(fixture_model, tasks, reference_model):
    result = evaluate(str(fixture_model), tasks / "suite.yaml", batch_size=50)
    found = result["tasks"]
    assert list(found) == ["colour", "shape", "background", "retrieval", "captions"]
    assert [found[t]["images"] for t in found] == [120] * 5
    _assert_same(found["colour"], _wds_classification(reference_model, tasks / "colour"))
    _assert_same(found["shape"], _wds_classification(reference_model, tasks / "shape"))
    assert found["shape"]["score"] == found["shape"]["mean_per_class_recall"]
    _assert_same(found["background"], _folder_classification(reference_model, tasks / "background"))
    wds = _wds_retrieval(reference_model, tasks / "retrieval")
    _assert_same(found["retrieval"], wds)
    _assert_same(found["captions"], _table_retrieval(reference_model, tasks / "captions.csv"))
    assert found["captions"]["captions"] == 240 and found["retrieval"]["score"] == pytest.approx(
        wds["mean_recall@1"]
    )
    # The model has learned colours: a parity at chance would prove little.
    assert found["colour"]["acc1"] > 2 * found["colour"]["chance"]
    assert wds["image_retrieval_recall@1"] > 5 * found["retrieval"]["chance"]
    scores = [found[t]["score"] for t in found]
    assert result["average"] == pytest.approx(np.mean(scores))


def test_the_demo_tasks_read_by_clip_benchmark_score_the_same(
    fixture_model, demo_pool, reference_model
):
    result = evaluate(str(fixture_model), demo_pool / "eval")["tasks"]
    assert list(result) == [*VOCABULARY, *COLOUR_GROUPS, "retrieval"]
    for name in (*VOCABULARY, *COLOUR_GROUPS):
        theirs = _wds_classification(reference_model, demo_pool / "eval" / name)
        _assert_same(result[name], theirs)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_equal_sklearn_and_clip_benchmark_on_random_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 7)).astype(np.float32)
    target = rng.integers(0, 6, 300)  # class 6 never the truth: sklearn leaves it out
    ours = metrics.classification(logits, target)
    acc1, acc5 = accuracy(torch.from_numpy(logits), torch.from_numpy(target), topk=(1, 5))
    assert ours["acc1"] == pytest.approx(acc1) and ours["acc5"] == pytest.approx(acc5)
    balanced = balanced_accuracy_score(target, logits.argmax(axis=1))
    assert ours["mean_per_class_recall"] == pytest.approx(balanced)
    assert metrics.classification(logits[:, :4], target % 4)["acc5"] is None

    image_of_text = np.repeat(np.arange(40), rng.integers(1, 6, 40))
    scores = rng.normal(size=(len(image_of_text), 40)).astype(np.float32)
    positive = torch.from_numpy(image_of_text[:, None] == np.arange(40))
    ours = metrics.retrieval(scores, image_of_text)
    for k in (1, 5, 10):
        texts = zsr.recall_at_k(torch.from_numpy(scores), positive, k)
        images = zsr.recall_at_k(torch.from_numpy(scores.T.copy()), positive.T, k)
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx((texts > 0).float().mean())
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx((images > 0).float().mean())
