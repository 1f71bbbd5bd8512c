"""Where a download's images are: img2dataset's Parquet shards in ``RUN/images/``, and
which of them hold each ledger file's images (``_index.json``).

The download stage writes each ledger file's images to shards of its own, so the
stages that read images (clip, shard) read their own files' shards only.
"""

from __future__ import annotations

import json
from pathlib import Path

from curate.core.layout import IMAGE_INDEX


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
