"""Write the synthetic web pool to disk, and serve it over loopback HTTP.

``generate_pool`` writes, under one folder:

- ``images/NNNNNN.jpg`` — one file per row, except broken urls (404);
- ``pairs.parquet`` — uid, path, caption (the uid hashes the path, not a url, so
  it does not depend on the port the pool is later served on);
- ``_rules.json`` — the rows the server answers 500 for (see ``curate.demo.serve``);
- ``manifest.json`` — the ground truth: seed, rates, vocabulary and one entry
  per row (see ``_entry``);
- ``eval/images/*.jpg`` + ``eval/labels.parquet`` — a clean, shape-balanced
  held-out set from its own seed stream: path, one column per ``VOCABULARY``
  attribute, and the caption; written again as evaluation tasks (one per
  attribute, and caption retrieval) listed in ``eval/suite.yaml``
  (``curate.demo.tasks``).

The same seed gives byte-identical files: rows are planned in one process
(``plan.py``) and each file is a pure function of its row, so rendering is
spread over processes freely. The folder is built as ``NAME.partial`` and
renamed when complete, so a folder named ``NAME`` always holds a whole pool.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.config import ConfigError
from curate.core.runfolder import staged
from curate.core.schema import stable_uid
from curate.demo import draw
from curate.demo.plan import DEFECTS, DefectRates, Row, plan_eval, plan_pool
from curate.demo.serve import RULES_FILE, LoopbackServer
from curate.demo.tasks import write_tasks
from curate.demo.vocab import HTML_PAGES, VOCABULARY

EVAL_QUALITY = 90
#: Files per task handed to a worker process: enough to amortise the pickling of scenes.
CHUNK = 256
#: Below this many files, starting worker processes costs more than it saves.
PARALLEL_FROM = 2_000

Progress = Callable[[int, int], None]
Size = tuple[int, int] | None


def write_file(path: Path, job: tuple) -> Size:
    """Write one file as ``job`` says; its (width, height) if it is a decodable image."""
    kind, *args = job
    size: Size = None
    if kind == "jpeg":
        scene, quality = args
        data, size = draw.jpeg(draw.render(scene), quality), (scene.width, scene.height)
    elif kind == "thumbnail":
        scene, quality, short = args
        image = draw.thumbnail(draw.render(scene), short)
        data, size = draw.jpeg(image, quality), image.size
    elif kind == "strip":
        scene, quality, top, height = args
        image = draw.render(scene).crop((0, top, scene.width, top + height))
        data, size = draw.jpeg(image, quality), image.size
    elif kind == "near":
        scene, quality, edit, amount, new_quality = args
        source = draw.jpeg(draw.render(scene), quality)
        data, size = draw.near_duplicate(source, edit, amount, new_quality)
    elif kind == "truncated":
        scene, quality, fraction = args
        data = draw.truncated(draw.jpeg(draw.render(scene), quality), fraction)
    elif kind == "noise":
        data = draw.random_bytes(*args)
    elif kind == "html":
        data = HTML_PAGES[args[0]].encode()
    else:
        raise ValueError(f"unknown file job {kind!r}")
    path.write_bytes(data)
    return size


def _write_chunk(root: Path, chunk: list[tuple[str, tuple]]) -> list[Size]:
    return [write_file(root / rel, job) for rel, job in chunk]


def _write_files(
    root: Path, todo: list[tuple[str, tuple]], workers: int, progress: Progress | None
) -> list[Size]:
    """Write every (relative path, job); sizes come back in input order for any worker count."""
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    sizes: list[Size] = []

    def collect(done: list[Size]) -> None:
        sizes.extend(done)
        if progress:
            progress(len(sizes), len(todo))

    if workers <= 1 or len(todo) < PARALLEL_FROM:
        for chunk in chunks:
            collect(_write_chunk(root, chunk))
        return sizes
    # spawn, not fork: the caller may run threads (Ray, an HTTP server) that a fork would copy.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for done in pool.map(_write_chunk, [root] * len(chunks), chunks):
            collect(done)
    return sizes


def _entry(row: Row, uids: list[str], index: int, size: Size) -> dict:
    """The manifest's ground truth for one row (``concepts``: the objects in its image)."""
    scene = row.scene
    return {
        "uid": uids[index],
        "path": row.path,
        "caption": row.caption,
        "defect": row.defect,
        "language": row.language,
        "duplicate_of": None if row.duplicate_of is None else uids[row.duplicate_of],
        "caption_of": None if row.caption_of is None else uids[row.caption_of],
        "width": None if size is None else size[0],
        "height": None if size is None else size[1],
        "concepts": None if scene is None else scene.concepts(),
        "background": None if scene is None else scene.backdrop(),
    }


def _write_manifest(path: Path, meta: dict, entries: list[dict]) -> None:
    """JSON with one line per row, so the file can be read and diffed by eye."""
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in meta.items()]
    lines.append('  "rows": [')
    lines.append(",\n".join("    " + json.dumps(e, ensure_ascii=False) for e in entries))
    lines += ["  ]", "}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def generate_pool(
    out_dir: Path,
    size: int = 20_000,
    seed: int = 0,
    rates: DefectRates | None = None,
    eval_size: int = 480,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write a synthetic web pool of ``size`` pairs to ``out_dir`` (which must not exist).

    ``workers`` processes render the images (default: one per CPU); ``progress``
    is called with (files written, files to write) as they finish.
    """
    if size < 1 or eval_size < 0 or seed < 0:
        raise ConfigError(
            f"a pool needs size ≥ 1, eval_size ≥ 0 and seed ≥ 0 "
            f"(got {size}, {eval_size} and {seed})"
        )
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: choose a new folder for the pool")
    rates = rates or DefectRates()
    pool_seq, eval_seq = np.random.SeedSequence(seed).spawn(2)
    rows = plan_pool(size, rates, np.random.default_rng(pool_seq))
    evals = plan_eval(eval_size, np.random.default_rng(eval_seq))

    with staged(out_dir) as work:
        for sub in ("images", "eval/images"):
            (work / sub).mkdir(parents=True)
        todo = [(row.path, row.job) for row in rows if row.job is not None]
        eval_paths = [f"images/{i:06d}.jpg" for i in range(len(evals))]
        todo += [
            (f"eval/{p}", ("jpeg", scene, EVAL_QUALITY)) for p, (scene, _) in zip(eval_paths, evals)
        ]
        written = iter(_write_files(work, todo, workers or os.cpu_count() or 1, progress))
        sizes = [None if row.job is None else next(written) for row in rows]

        uids = [stable_uid(row.path, row.caption) for row in rows]
        pairs = {"uid": uids, "path": [r.path for r in rows], "caption": [r.caption for r in rows]}
        pq.write_table(pa.table(pairs), work / "pairs.parquet")
        labels = {
            "path": eval_paths,
            "shape": [scene.objects[0].shape for scene, _ in evals],
            "colour": [scene.objects[0].colour for scene, _ in evals],
            "background": [scene.pattern for scene, _ in evals],
            "caption": [caption for _, caption in evals],
        }
        pq.write_table(pa.table(labels), work / "eval" / "labels.parquet")
        write_tasks(work / "eval", labels)
        text = {"Content-Type": "text/plain"}
        failing = {"status": 500, "body": "Internal Server Error", "headers": text}
        rules = {f"/{r.path}": failing for r in rows if r.defect == "server_error"}
        (work / RULES_FILE).write_text(json.dumps(rules, indent=1, sort_keys=True) + "\n")

        meta = {
            "seed": seed,
            "size": size,
            "rates": rates.as_dict(),
            "defects": list(DEFECTS),
            "vocabulary": {k: list(v) for k, v in VOCABULARY.items()},
            "eval_size": eval_size,
        }
        entries = [_entry(row, uids, i, s) for i, (row, s) in enumerate(zip(rows, sizes))]
        _write_manifest(work / "manifest.json", meta, entries)
    return out_dir


#: The port the pool was last served on (``serve_pool`` serves it there again).
PORT_FILE = "port.json"


def load_manifest(pool_dir: Path) -> dict:
    return json.loads((Path(pool_dir) / "manifest.json").read_text(encoding="utf-8"))


def defect_counts(manifest: dict) -> dict[str, int]:
    """Rows per defect, in ``DEFECTS`` order, with "clean" first."""
    seen = Counter(row["defect"] or "clean" for row in manifest["rows"])
    return {name: seen[name] for name in ("clean", *DEFECTS)}


def write_url_list(pool_dir: Path, base_url: str) -> Path:
    """``pool_dir/urls.parquet`` (uid, url, caption) for the pool served at ``base_url``.

    An unchanged list is left as it is: a run's input is known by its files' sizes and
    times, so the runs on it resume, or share stages, rather than download again.
    """
    pool_dir = Path(pool_dir)
    pairs = pq.read_table(pool_dir / "pairs.parquet")
    base = base_url.rstrip("/") + "/"
    urls = pa.array([base + p for p in pairs["path"].to_pylist()], pa.string())
    table = pa.table({"uid": pairs["uid"], "url": urls, "caption": pairs["caption"]})
    path = pool_dir / "urls.parquet"
    try:
        if pq.read_table(path).equals(table):
            return path
    except (OSError, pa.ArrowException):
        pass  # none yet, or unreadable: written below
    pq.write_table(table, path)
    return path


def serve_pool(pool_dir: Path, port: int | None = None) -> tuple[LoopbackServer, Path]:
    """Start serving ``pool_dir`` on 127.0.0.1 and write its url list; stop the server when done.

    ``port``: None serves on the port the pool was last served on, when it is free, so
    its urls stay the same from one serve to the next; 0 any free port.
    """
    pool_dir = Path(pool_dir)
    if not (pool_dir / "pairs.parquet").is_file():
        raise FileNotFoundError(f"{pool_dir} is not a demo pool (no pairs.parquet)")
    server = None
    if port is None:
        try:
            last = json.loads((pool_dir / PORT_FILE).read_text())["port"]
            server = LoopbackServer(pool_dir, port=last)
        except (OSError, ValueError, KeyError, TypeError, OverflowError):
            pass  # never served, or the port is taken now: a free one, and new urls
    server = (server or LoopbackServer(pool_dir, port=port or 0)).start()
    try:
        (pool_dir / PORT_FILE).write_text(json.dumps({"port": server.port}) + "\n")
        return server, write_url_list(pool_dir, server.base_url)
    except BaseException:
        server.stop()
        raise
