"""Where a download's images are: img2dataset's Parquet shards in ``RUN/images/``, and
which of them hold each ledger file's images (``_index.json``).

The download stage writes each ledger file's images to shards of its own, so the
stages that read images (clip, shard) read their own files' shards only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from curate.core.layout import IMAGE_INDEX

#: The image columns img2dataset writes, by encoding (also the file extension).
IMAGE_COLUMNS = ("jpg", "png", "webp")


def write_index(images: Path, names: list[list[str]]) -> None:
    """``images/_index.json``: each ledger file's image shards, by the file's place in the
    ledger, for the stages that read images (clip, shard)."""
    (images / IMAGE_INDEX).write_text(json.dumps({"shards": names}) + "\n")


def images_by_file(images: Path) -> list[list[str]]:
    """Each ledger file's image shard names (without .parquet), by the file's place."""
    try:
        return json.loads((Path(images) / IMAGE_INDEX).read_text())["shards"]
    except (OSError, ValueError, KeyError) as exc:
        raise FileNotFoundError(
            f"{images}: no readable {IMAGE_INDEX} (were the downloaded images deleted or replaced? "
            "Re-run the download stage)"
        ) from exc


def image_shards(images: Path) -> list[Path]:
    """The Parquet files of a download's images folder (uid, image bytes, sizes, sha256)."""
    return sorted(images.glob("*.parquet"))


def image_column(shard: Path) -> str | None:
    """The column of an image shard that holds its images (None: no download in it succeeded)."""
    names = pq.read_schema(shard).names
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def holding_images(images: Path, names: list[str]) -> Iterator[tuple[Path, str]]:
    """The image shards ``names`` of ``images`` that exist and hold images, with the column."""
    for shard in (Path(images) / f"{name}.parquet" for name in names):
        if shard.is_file() and (column := image_column(shard)) is not None:
            yield shard, column
