"""Shared fixtures: a real local Ray cluster, a pool full of bad rows, the served demo pool."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.demo.serve import LoopbackServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only
# No test may fetch model weights: Hugging Face hub lookups fail at once, offline.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster (2 CPUs) for the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


GOOD = [
    "a brown dog running on a sandy beach",
    "a red car parked in front of a house",
    "two cats sleeping on a wooden table",
    "a bowl of fresh fruit on the kitchen counter",
]


def bad_pool_rows() -> list[dict]:
    """One row per kind of trouble curation exists for, plus good rows around them."""
    rows = []

    def add(text, w=640, h=480, **extra):
        rows.append(
            {
                "url": f"http://127.0.0.1:1/{len(rows)}.jpg",
                "text": text,
                "original_width": w,
                "original_height": h,
                **extra,
            }
        )

    for i in range(40):
        add(f"{GOOD[i % len(GOOD)]} number {i}")
    add(None)  # null caption
    add("")  # empty caption
    add("   \n\t ")  # whitespace only
    add("un chien brun qui court sur une plage de sable")  # French
    add("ein brauner Hund, der an einem Sandstrand läuft")  # German
    add("一只棕色的狗在沙滩上奔跑")  # Chinese
    add("a dog on a beach", w=199, h=480)  # tiny side
    add("a dog on a beach at noon", w=200, h=200)  # exactly 200
    add("a very wide banner of a dog on a beach", w=1500, h=200)  # ratio 7.5
    add("a panorama of a beach with a dog", w=600, h=200)  # ratio exactly 3
    add("a panorama of a beach with a dog again", w=601, h=200)  # ratio > 3
    add("a dog on a beach with no size", w=None, h=None)
    add("a dog on a beach with a zero size", w=0, h=480)
    add("a decompression bomb of a dog", w=2_000_000_000, h=2_000_000_000)
    add("IMG_1234.jpg")
    add("two words")
    add("a dog\non a beach\nwith newlines")
    add("a 🐶 on a 🏖️ with emoji captions")
    add("word " * 200_000)  # a 1 MB caption
    for _ in range(12):
        add("stock photo of a happy family")  # shared alt-text
    return rows


@pytest.fixture
def bad_pool(tmp_path: Path) -> Path:
    """A CSV pool (no uids) with every kind of bad row, including a non-UTF-8 caption."""
    rows = bad_pool_rows()
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("url", pa.string()),
                ("text", pa.string()),
                ("original_width", pa.int64()),
                ("original_height", pa.int64()),
            ]
        ),
    )
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path)
    return path


def accept_as_written(run: Path, stage_dir: str, *beside: str) -> None:
    """Record a finished stage's files as they are now, as if the stage had written them.

    For tests that damage a stage's output on purpose to see what a *later* stage
    does with it; otherwise the run would find the damage and run the stage again.
    """
    from curate.core.layout import SUCCESS
    from curate.runner import file_records

    manifest_path = run / stage_dir / SUCCESS
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = file_records(run, [run / stage_dir, *(run / b for b in beside)])
    manifest_path.write_text(json.dumps(manifest))


class ServedPool(NamedTuple):
    """The demo pool behind a running loopback server, and its url list for that server."""

    pool_dir: Path
    server: LoopbackServer
    urls_path: Path


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory) -> Path:
    """A 500-row synthetic web pool (seed 0, 120 eval images), generated once per session."""
    from curate.demo import generate_pool

    return generate_pool(tmp_path_factory.mktemp("demo") / "pool", size=500, seed=0, eval_size=120)


@pytest.fixture(scope="session")
def served_pool(demo_pool: Path):
    """``demo_pool`` served on 127.0.0.1 (``urls.parquet`` written), stopped at session end."""
    from curate.demo import serve_pool

    server, urls_path = serve_pool(demo_pool)
    yield ServedPool(demo_pool, server, urls_path)
    server.stop()


@pytest.fixture(scope="session")
def fixture_model(demo_pool: Path, tmp_path_factory) -> Path:
    """``curate-tiny`` trained on ``demo_pool``'s clean rows, once per session (~40 s on 2 cores).

    An open_clip local-dir folder: ``open_clip.create_model("local-dir:" + str(path))`` loads it.
    """
    from clip_fixture import train_fixture_model

    return train_fixture_model(demo_pool, tmp_path_factory.mktemp("clip") / "curate-tiny")
