"""Evaluation tasks on disk, in the layouts DataComp's evaluation suite and ``clip_benchmark`` use.

A task is one of:

* **a webdataset folder** (DataComp's ``download_evalsets.py`` writes these):
  ``test/0.tar …`` (``test/nshards.txt`` says how many), ``classnames.txt``
  (class ``i`` on line ``i``), ``zeroshot_classification_templates.txt`` (one
  prompt per line, ``{c}`` where the class name goes) and, for retrieval,
  ``dataset_type.txt`` holding ``retrieval``. A classification sample is an
  image (``.webp``, ``.png``, ``.jpg`` or ``.jpeg``) and a ``.cls`` label; a
  retrieval sample an image and a ``.txt`` of captions, one per line. Members
  are grouped into samples by webdataset's own rule, as ``clip_benchmark``
  reads them;
* **an ImageNet-style folder**: one subfolder per class, classes in sorted
  order and images found as torchvision's ``ImageFolder`` finds them; class names
  from its ``classnames.txt``, or open_clip's ImageNet-1k names when there are
  1,000 classes; prompts from its templates file, or OpenAI's 80 ImageNet
  prompts;
* **a retrieval table**: a Parquet or CSV file with an ``image`` column (a path
  relative to the file, or Hugging Face's Image feature, whose bytes are read)
  and a ``caption`` or ``captions`` column (a text or a list of texts; rows of one
  image are its captions). DataComp's Flickr30k and MSCOCO tasks, saved with
  ``datasets``' ``to_parquet``, are such tables.

A suite is a YAML list of tasks: each a path (relative to the suite file) or a
mapping with ``path`` and, optionally, ``name`` and ``metric``. A folder that
holds ``suite.yaml`` stands for its suite.

Every problem is a ConfigError naming the file: a missing class list or prompt
file, a label out of range, a sample without an image, an unreadable table. An
image that cannot be decoded is the evaluator's to report, by the name
``Sample.source`` gives it: skipping it would change the metric.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from curate.core.config import ConfigError, load_yaml

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
SPLIT = "test"
NSHARDS = "nshards.txt"
SUITE = "suite.yaml"
#: The image members a webdataset sample may hold, in the order clip_benchmark picks one.
WDS_IMAGES = ("webp", "png", "jpg", "jpeg")
TABLE_SUFFIXES = (".parquet", ".csv")
CLASSIFICATION, RETRIEVAL = "classification", "retrieval"
#: The metrics each kind of task reports, its main one (DataComp's default) first.
METRICS = {
    CLASSIFICATION: ("acc1", "acc5", "mean_per_class_recall"),
    RETRIEVAL: (
        "mean_recall@1",
        *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
    ),
}


@dataclass(frozen=True)
class Sample:
    """One image of a task: where it came from (for errors), its bytes, and its truth —
    a class index, or the captions that describe it."""

    source: str
    image: bytes
    truth: int | list[str]


#: How a task is laid out on disk (``Task.layout``), decided once by ``read_task``.
TABLE, TARS, CLASS_FOLDERS = "table", "tars", "class folders"


@dataclass(frozen=True)
class Task:
    """A task's name, layout, kind, main metric and, for classification, its classes and
    prompts."""

    name: str
    path: Path
    layout: str  # TABLE, TARS or CLASS_FOLDERS
    kind: str
    metric: str
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    def samples(self) -> Iterator[Sample]:
        """The task's samples, checked as they are read."""
        if self.layout == TABLE:
            yield from _table_samples(self.path)
        elif self.layout == TARS:
            yield from _tar_samples(self, _shards(self.path))
        else:
            for label, folder in enumerate(_class_folders(self.path)):
                for file in _folder_images(folder):
                    yield Sample(str(file), file.read_bytes(), label)


def _lines(path: Path) -> list[str]:
    """A text file's lines, stripped; a blank line is an error (it would be a class or
    prompt of nothing)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    blank = next((i for i, line in enumerate(lines, 1) if not line), None)
    if blank is not None or not lines:
        where = f"line {blank} is blank" if blank else "it is empty"
        raise ConfigError(f"{path}: {where}")
    return lines


def _templates(path: Path) -> tuple[str, ...]:
    templates = _lines(path)
    for number, template in enumerate(templates, 1):
        try:
            filled = template.format(c="\0")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"{path}: line {number}: {template!r} is not a prompt template "
                f"({type(exc).__name__}: {exc}); write {{c}} where the class name goes"
            ) from exc
        if "\0" not in filled:
            raise ConfigError(f"{path}: line {number}: {template!r} has no {{c}} for the class")
    return tuple(templates)


def _class_folders(path: Path) -> list[Path]:
    """Class subfolders in ``ImageFolder``'s order (sorted names)."""
    return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)


def _folder_images(folder: Path) -> list[Path]:
    """A class folder's images, walked and filtered as torchvision's ``ImageFolder`` does."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    walked, seen = [], set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree: its images count once
            folders.clear()
            continue
        seen.add(real)
        walked.append((root, names))
    return [
        Path(root, n)
        for root, names in sorted(walked)
        for n in sorted(names)
        if n.lower().endswith(IMG_EXTENSIONS)
    ]


def _shards(path: Path) -> list[Path]:
    """``test/0.tar …``: as many as ``nshards.txt`` says, or every tar of ``test/``."""
    split = path / SPLIT
    count_file = split / NSHARDS
    if count_file.is_file():
        text = count_file.read_text(encoding="utf-8").strip()
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{count_file}: {text!r} is not a number of shards")
        shards = [split / f"{i}.tar" for i in range(int(text))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ConfigError(f"{split}: {NSHARDS} says {text} shards; missing {missing[:3]}")
        return shards
    shards = sorted(split.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not shards:
        raise ConfigError(f"{split}: no .tar shards")
    return shards


def _tar_samples(task: Task, shards: list[Path]) -> Iterator[Sample]:
    from webdataset.tariterators import tarfile_samples

    want = "cls" if task.kind == CLASSIFICATION else "txt"
    for shard in shards:
        samples = tarfile_samples([{"url": str(shard)}])
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as exc:  # tarfile's and webdataset's errors alike
                raise ConfigError(f"{shard}: not a readable tar shard: {exc}") from exc
            where = f"{shard}: sample {sample['__key__']}"
            image = next((sample[e] for e in WDS_IMAGES if e in sample), None)
            if image is None or want not in sample:
                missing = "image (.webp, .png, .jpg or .jpeg)" if image is None else f".{want}"
                raise ConfigError(f"{where}: no {missing}")
            text = sample[want].decode("utf-8", errors="replace")
            if want == "txt":
                yield Sample(where, image, text.splitlines())
                continue
            if not text.strip().isdigit() or int(text) >= len(task.classnames):
                raise ConfigError(
                    f"{where}: label {text.strip()!r} is not a class index "
                    f"(0–{len(task.classnames) - 1}, as {CLASSNAMES} has {len(task.classnames)})"
                )
            yield Sample(where, image, int(text))


def _read_table(path: Path) -> pa.Table:
    try:
        if path.suffix == ".csv":
            return pcsv.read_csv(path)
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"{path}: not a readable {path.suffix[1:]} file: {exc}") from exc


def _table_samples(path: Path) -> Iterator[Sample]:
    """A retrieval table's images, each with its captions (rows of one image grouped)."""
    table = _read_table(path)
    column = next((c for c in ("captions", "caption") if c in table.column_names), None)
    if "image" not in table.column_names or column is None:
        raise ConfigError(f"{path}: needs an image column and a caption or captions column")
    images = table["image"].to_pylist()
    if pa.types.is_struct(table["image"].type):  # Hugging Face's Image feature: {bytes, path}
        images = [(i or {}).get("bytes") or (i or {}).get("path") for i in images]
    captions: dict[str | bytes, list[str]] = {}
    for row, (image, text) in enumerate(zip(images, table[column].to_pylist()), 1):
        texts = text if isinstance(text, list) else [text]
        if (
            not isinstance(image, (str, bytes))
            or not texts
            or not all(isinstance(t, str) for t in texts)
        ):
            raise ConfigError(f"{path}: row {row}: needs an image and caption text")
        captions.setdefault(image, []).extend(texts)
    if not captions:
        raise ConfigError(f"{path}: no rows")
    for number, (image, texts) in enumerate(captions.items(), 1):
        if isinstance(image, bytes):
            yield Sample(f"{path}: image {number}", image, texts)
            continue
        file = path.parent / image
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: image {image}: cannot read {file}: {exc}") from exc
        yield Sample(str(file), data, texts)


def _folder_task(path: Path, name: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """A task folder's layout, kind, class names and prompts, checked."""
    kind = CLASSIFICATION
    if (path / DATASET_TYPE).is_file():
        kind = (path / DATASET_TYPE).read_text(encoding="utf-8").strip().lower()
        if kind not in (CLASSIFICATION, RETRIEVAL):
            raise ConfigError(
                f"{path / DATASET_TYPE}: {kind!r}; curate evaluates classification and retrieval"
            )
    if kind == RETRIEVAL:
        if not (path / SPLIT).is_dir():
            raise ConfigError(f"task {name}: {path} holds no {SPLIT}/ folder of tar shards")
        return TARS, kind, (), ()
    webdataset = (path / SPLIT).is_dir()
    if webdataset:
        classes = None
    else:
        classes = _class_folders(path)
        if not classes:
            raise ConfigError(
                f"task {name}: {path} holds neither a {SPLIT}/ folder of tar shards nor "
                "one subfolder of images per class"
            )
    names_file, templates_file = path / CLASSNAMES, path / TEMPLATES
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    if names_file.is_file():
        classnames = _lines(names_file)
    elif classes is not None and len(classes) == len(IMAGENET_CLASSNAMES):
        classnames = list(IMAGENET_CLASSNAMES)
    else:
        bundled = "" if webdataset else " (ImageNet-1k's names are used for 1,000 classes)"
        raise ConfigError(f"task {name}: no {names_file}{bundled}")
    if classes is not None and len(classnames) != len(classes):
        raise ConfigError(
            f"task {name}: {len(classes)} class folders in {path} but "
            f"{len(classnames)} names in {names_file if names_file.is_file() else 'ImageNet-1k'}"
        )
    if templates_file.is_file():
        templates = _templates(templates_file)
    elif not webdataset:
        templates = tuple(t("{c}") for t in OPENAI_IMAGENET_TEMPLATES)
    else:
        raise ConfigError(f"task {name}: no {templates_file}")
    return (TARS if webdataset else CLASS_FOLDERS), kind, tuple(classnames), templates


def read_task(path: Path, name: str | None = None, metric: str | None = None) -> Task:
    """The task at ``path`` (a folder or a retrieval table), checked before any image is read."""
    path = Path(path)
    name = name or path.stem
    if not path.exists():
        raise ConfigError(f"task {name}: {path}: no such file or folder")
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise ConfigError(
                f"task {name}: {path}: a task is a folder, or a .parquet or .csv retrieval table"
            )
        layout, kind, classnames, templates = TABLE, RETRIEVAL, (), ()
    else:
        layout, kind, classnames, templates = _folder_task(path, name)
    metric = metric or METRICS[kind][0]
    if metric not in METRICS[kind]:
        raise ConfigError(
            f"task {name}: metric {metric!r}; a {kind} task reports {', '.join(METRICS[kind])}"
        )
    if metric == "acc5" and len(classnames) < 5:
        raise ConfigError(f"task {name}: acc5 needs at least 5 classes; it has {len(classnames)}")
    return Task(name, path, layout, kind, metric, classnames, templates)


def _suite_entry(entry, suite: Path, number: int) -> Task:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ConfigError(f"{suite}: entry {number}: a path, or a mapping with a path")
    unknown = set(entry) - {"path", "name", "metric"}
    if unknown:
        raise ConfigError(f"{suite}: entry {number}: unknown keys {sorted(unknown)}")
    for key in ("name", "metric"):
        if key in entry and not isinstance(entry[key], str):
            raise ConfigError(f"{suite}: entry {number}: {key} must be text")
    path = Path(entry["path"]).expanduser()
    return read_task(suite.parent / path, entry.get("name"), entry.get("metric"))


def read_tasks(path: Path) -> list[Task]:
    """The tasks ``path`` names: a suite file, a folder holding ``suite.yaml``, or one task."""
    path = Path(path)
    if path.is_dir() and (path / SUITE).is_file():
        path = path / SUITE
    elif path.is_dir() and not any((path / f).exists() for f in (SPLIT, CLASSNAMES)):
        inner = sorted(p.parent for p in path.glob(f"*/{SUITE}"))
        if inner:
            raise ConfigError(f"{path}: not a task and no {SUITE}; did you mean {inner[0]}?")
    if path.suffix not in (".yaml", ".yml"):
        return [read_task(path)]
    if not path.is_file():
        raise ConfigError(f"suite {path}: no such file")
    entries, _ = load_yaml(path)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: a suite is a YAML list of tasks")
    tasks = [_suite_entry(entry, path, i) for i, entry in enumerate(entries, 1)]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: tasks named {', '.join(twice)} twice; give each a name")
    return tasks


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644  # mtime 0: the same samples give the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_task(
    folder: Path,
    samples: list[Sample],
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
) -> None:
    """Write ``samples`` as a one-shard webdataset task: a classification task when
    ``classnames`` and ``templates`` are given, else a retrieval task."""
    split = Path(folder) / SPLIT
    split.mkdir(parents=True)
    with tarfile.open(split / "0.tar", "w") as tar:
        for i, sample in enumerate(samples):
            key = f"{i:06d}"
            suffix = Path(sample.source).suffix.lower().lstrip(".")
            _tar_member(tar, f"{key}.{suffix}", sample.image)
            if isinstance(sample.truth, int):
                _tar_member(tar, f"{key}.cls", str(sample.truth).encode())
            else:
                _tar_member(tar, f"{key}.txt", "\n".join(sample.truth).encode())
    (split / NSHARDS).write_text("1\n")
    if classnames is None:
        (folder / DATASET_TYPE).write_text(RETRIEVAL + "\n")
        return
    (folder / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
    (folder / TEMPLATES).write_text("".join(f"{t}\n" for t in templates), encoding="utf-8")
