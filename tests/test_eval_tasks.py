"""Evaluation tasks on disk: every layout is read, and every bad input is an error naming
the file (no model here; ``test_eval_parity.py`` scores the layouts)."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.core.config import ConfigError
from curate.io.eval_tasks import (
    CLASSIFICATION,
    RETRIEVAL,
    Sample,
    read_task,
    read_tasks,
    write_webdataset_task,
)


def _jpeg(colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(out, "JPEG")
    return out.getvalue()


def _classification(folder: Path, labels=(0, 1, 2, 1)) -> Path:
    samples = [Sample(f"{i}.jpg", _jpeg(), label) for i, label in enumerate(labels)]
    write_webdataset_task(folder, samples, ["a cat", "a dog", "a fish"], ["a photo of {c}."])
    return folder


def test_a_webdataset_classification_task_is_read_whole(tmp_path):
    task = read_task(_classification(tmp_path / "pets"))
    assert (task.name, task.kind, task.metric) == ("pets", CLASSIFICATION, "acc1")
    assert task.classnames == ("a cat", "a dog", "a fish")
    assert task.templates == ("a photo of {c}.",)
    samples = list(task.samples())
    assert [s.truth for s in samples] == [0, 1, 2, 1]
    assert samples[0].image == _jpeg() and "0.tar: sample 000000" in samples[0].source


def test_a_webdataset_retrieval_task_has_captions_per_image(tmp_path):
    samples = [Sample("a.png", _jpeg(), ["one", "two"]), Sample("b.jpg", _jpeg(), ["three"])]
    write_webdataset_task(tmp_path / "flickr", samples)
    task = read_task(tmp_path / "flickr")
    assert (task.kind, task.metric) == (RETRIEVAL, "mean_recall@1")
    assert [s.truth for s in task.samples()] == [["one", "two"], ["three"]]


def test_an_imagenet_folder_takes_open_clips_names_and_prompts(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    root = tmp_path / "val"
    for i in range(1000):
        (root / f"n{i:08d}").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "n00000001" / "x.JPEG")
    (root / "n00000001" / "notes.txt").write_text("not an image")
    task = read_task(root)
    assert task.classnames == tuple(IMAGENET_CLASSNAMES) and len(task.templates) == 80
    assert task.templates[0] == "a bad photo of a {c}."
    assert [(Path(s.source).name, s.truth) for s in task.samples()] == [("x.JPEG", 1)]

    (root / "n00000001" / "loop").symlink_to(root / "n00000001")  # read once, not forever
    assert [(Path(s.source).name, s.truth) for s in task.samples()] == [("x.JPEG", 1)]

    (root / "n00000999").rmdir()
    with pytest.raises(ConfigError, match=r"task val: no .*classnames\.txt \(ImageNet-1k's"):
        read_task(root)
    (root / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match=r"999 class folders in .* but 2 names"):
        read_task(root)


def test_retrieval_tables_group_captions_by_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    (tmp_path / "coco.csv").write_text("image,caption\na.jpg,one\nb.jpg,two\na.jpg,three\n")
    task = read_task(tmp_path / "coco.csv")
    assert (task.name, task.kind) == ("coco", RETRIEVAL)
    assert [s.truth for s in task.samples()] == [["one", "three"], ["two"]]
    table = pa.table({"image": ["b.jpg"], "captions": [["x", "y"]]})
    pq.write_table(table, tmp_path / "lists.parquet")
    assert [s.truth for s in read_task(tmp_path / "lists.parquet").samples()] == [["x", "y"]]


def test_a_hugging_face_export_is_a_retrieval_table(tmp_path):
    """DataComp's Flickr30k and MSCOCO come from Hugging Face (nlphuji/...): an Image
    column and a list of captions, as ``to_parquet`` saves them."""
    import datasets

    files = []
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    rows = {"image": files, "caption": [["red one", "a red"], ["blue one"]], "img_id": [0, 1]}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Sequence(datasets.Value("string")),
            "img_id": datasets.Value("int64"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "flickr.parquet")
    samples = list(read_task(tmp_path / "flickr.parquet").samples())
    assert [s.truth for s in samples] == [["red one", "a red"], ["blue one"]]
    assert samples[1].image == (tmp_path / "1.png").read_bytes()


def test_a_suite_lists_tasks_relative_to_itself(tmp_path):
    _classification(tmp_path / "tasks" / "pets")
    (tmp_path / "tasks" / "suite.yaml").write_text(
        "- pets\n- path: pets\n  name: pets-recall\n  metric: mean_per_class_recall\n"
    )
    tasks = read_tasks(tmp_path / "tasks")  # the folder stands for its suite.yaml
    assert [(t.name, t.metric) for t in tasks] == [
        ("pets", "acc1"),
        ("pets-recall", "mean_per_class_recall"),
    ]
    with pytest.raises(ConfigError, match=r"did you mean .*tasks"):
        read_tasks(tmp_path)


@pytest.mark.parametrize(
    "suite, message",
    [
        ("pets: 1\n", "a suite is a YAML list of tasks"),
        ("[]\n", "a suite is a YAML list of tasks"),
        ("- 3\n", "entry 1: a path, or a mapping with a path"),
        ("- path: pets\n  split: val\n", r"entry 1: unknown keys \['split'\]"),
        ("- pets\n- pets\n", "tasks named pets twice"),
        ("- path: pets\n  metric: recall@1\n", "metric 'recall@1'; a classification task reports"),
        ("- path: pets\n  metric: acc5\n", "acc5 needs at least 5 classes; it has 3"),
        ("- missing\n", "task missing: .*missing: no such file or folder"),
        ("- pets\n- !!python/object:os.system x\n", "tag"),
    ],
)
def test_bad_suites_are_named(tmp_path, suite, message):
    _classification(tmp_path / "pets")
    (tmp_path / "suite.yaml").write_text(suite)
    with pytest.raises(ConfigError, match=message):
        read_tasks(tmp_path / "suite.yaml")


def _rewrite_tar(tar_path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_webdataset_tasks_are_named(tmp_path):
    pets = _classification(tmp_path / "pets")
    tar = pets / "test" / "0.tar"

    _rewrite_tar(tar, {"k1.jpg": _jpeg(), "k1.cls": b"3"})
    with pytest.raises(ConfigError, match=r"0\.tar: sample k1: label '3' is not a class index"):
        list(read_task(pets).samples())
    _rewrite_tar(tar, {"k1.jpg": _jpeg(), "k1.cls": b"-1"})
    with pytest.raises(ConfigError, match="label '-1' is not a class index"):
        list(read_task(pets).samples())
    _rewrite_tar(tar, {"k1.cls": b"0"})
    with pytest.raises(ConfigError, match=r"sample k1: no image \(\.webp"):
        list(read_task(pets).samples())
    _rewrite_tar(tar, {"k1.jpg": _jpeg()})
    with pytest.raises(ConfigError, match=r"sample k1: no \.cls"):
        list(read_task(pets).samples())
    tar.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ConfigError, match=r"0\.tar: not a readable tar shard"):
        list(read_task(pets).samples())

    (pets / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(ConfigError, match=r"nshards\.txt says 2 shards; missing \['1\.tar'\]"):
        list(read_task(pets).samples())
    (pets / "test" / "nshards.txt").write_text("two\n")
    with pytest.raises(ConfigError, match="'two' is not a number of shards"):
        list(read_task(pets).samples())


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("classnames.txt", None, r"task pets: no .*classnames\.txt$"),
        ("zeroshot_classification_templates.txt", None, "task pets: no .*templates.txt"),
        ("classnames.txt", "a cat\n\na dog\n", "line 2 is blank"),
        ("classnames.txt", "", "it is empty"),
        ("zeroshot_classification_templates.txt", "a photo.\n", r"line 1: 'a photo\.' has no"),
        ("zeroshot_classification_templates.txt", "{c} of {x}\n", r"line 1: .* not a prompt"),
        ("zeroshot_classification_templates.txt", "{{c}}\n", r"line 1: '\{\{c\}\}' has no"),
        ("dataset_type.txt", "multilabel\n", "'multilabel'; curate evaluates classification"),
    ],
)
def test_bad_task_files_are_named(tmp_path, file, text, message):
    pets = _classification(tmp_path / "pets")
    if text is None:
        (pets / file).unlink()
    else:
        (pets / file).write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_task(pets)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"image": ["a.jpg"]}, "needs an image column and a caption or captions column"),
        ({"image": ["a.jpg"], "caption": [None]}, "row 1: needs an image and caption text"),
        ({"image": ["gone.jpg"], "caption": ["x"]}, r"image gone\.jpg: cannot read"),
        ({"image": [], "caption": []}, "no rows"),
    ],
)
def test_bad_retrieval_tables_are_named(tmp_path, table, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    schema = {"image": pa.string(), "caption": pa.string()}
    columns = {k: pa.array(v, schema[k]) for k, v in table.items()}
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "t.parquet")) + ".*" + message):
        list(read_task(tmp_path / "t.parquet").samples())
    (tmp_path / "u.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match=r"u\.parquet: not a readable parquet file"):
        list(read_task(tmp_path / "u.parquet").samples())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"a task is a folder, or a \.parquet or \.csv"):
        read_task(tmp_path / "notes.txt")


def test_the_bundled_datacomp_suite_reads_once_its_tasks_are_there(tmp_path):
    """``suites/datacomp.yaml`` beside folders shaped as DataComp's downloads: 31 webdataset
    tasks, Flickr30k and MSCOCO as tables; each with DataComp's main metric."""
    suite = Path(__file__).parent.parent / "suites" / "datacomp.yaml"
    shutil.copy(suite, tmp_path / "datacomp.yaml")
    for line in suite.read_text().splitlines():
        if line.startswith("- path: wds_"):
            _classification(tmp_path / line.removeprefix("- path: "), labels=[0])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    for table in ("flickr_1k.parquet", "mscoco_5k.parquet"):
        pq.write_table(pa.table({"image": ["a.jpg"], "caption": ["x"]}), tmp_path / table)
    tasks = {t.name: t for t in read_tasks(tmp_path / "datacomp.yaml")}
    assert len(tasks) == 33 and tasks["imagenet1k"].metric == "acc1"
    assert tasks["flickr30k"].metric == tasks["mscoco"].metric == "mean_recall@1"
    recall = {n for n, t in tasks.items() if t.metric == "mean_per_class_recall"}
    assert recall == {"caltech101", "fgvc_aircraft", "flowers", "pets"}
