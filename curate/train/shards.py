"""Shards: the kept rows of a ledger as Parquet (or WebDataset) files of a fixed row count.

Shards are what the trainer and users consume: plain Parquet, readable by
pyarrow, DuckDB, Ray Data and HF ``datasets``. Rows keep the ledger's order, so
the same ledger always gives byte-identical shards. The decision columns
(``keep``, ``dropped_by``, ``caption_error``) are dropped: every shard row is kept.

With images, each row also carries its image, joined by uid from the download's
image shards, as a struct column ``image`` {bytes, path} declared an ``Image``
feature in the ``huggingface`` schema metadata: HF ``datasets`` decodes it to
PIL images, every other reader sees plain bytes (``image.bytes``). The caller
only counts kept rows per ledger file (a task each) and cuts them into shards of
``rows_per_shard``; a task per shard reads its range of kept rows, finds their
images in the image shards of its own ledger files (a uid → (image shard, row)
index of a shard's worth of rows), and reads the bytes one row group of output
at a time, only from the source row groups that hold them.

WebDataset shards are ``shard-NNNNN.tar``, one sample per row (``{uid}.jpg``,
``.txt``, ``.json``), and ``sizes.json``: what open_clip's trainer reads.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.clip.embed import read_image_bytes
from curate.core.progress import FinishedRows, Progress
from curate.core.schema import read_alive
from curate.io.images import holding_images, images_by_file

if TYPE_CHECKING:
    from curate.engine import Engine

DECISION_COLUMNS = ("keep", "dropped_by", "caption_error")
#: Rows per Parquet row group of image shards: the images of one group are all that is
#: in memory at a time, and a reader can fetch a few rows without the whole file.
ROWS_PER_GROUP = 1_000
#: HF ``datasets``' own layout of an Image feature (``datasets.Image().pa_type``).
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
#: Only the image column is declared: ``datasets`` derives the others from their Arrow
#: types, so no version-specific feature JSON (``Sequence`` vs ``List``) is written.
HF_METADATA = json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})


def write_shards(
    files: list[Path],
    out: Path,
    images: Path | None,
    rows_per_shard: int,
    tar: bool,
    engine: Engine,
    label: str,
    progress: bool = False,
) -> int:
    """Write the kept rows of ledger ``files`` as shards in ``out``; how many rows.

    ``images`` is the download's image folder whose bytes each row carries (None: no
    images). The caller's engine counts kept rows per file, then writes a shard a task.
    """
    kept = engine.map_items(_count_kept, files, f"{label}: count")
    by_file = images_by_file(images) if images is not None else [[] for _ in files]
    jobs = []
    for number, segments in enumerate(_ranges(kept, rows_per_shard)):
        name = f"shard-{number:05d}.{'tar' if tar else 'parquet'}"
        sources = [(files[i], start, stop) for i, start, stop in segments]
        shards = sorted({n for i, _, _ in segments for n in by_file[i]})
        jobs.append(ShardJob(out / name, sources, images, shards, rows_per_shard, tar))
    shown = Progress(label, sum(kept), enabled=progress)
    with shown, shown.poll(FinishedRows(out, "shard-*.parquet")):
        written = engine.map_items(_write_shard, jobs, label)
    if tar:  # open_clip reads the dataset size from here (no --train-num-samples needed)
        sizes = {job.out.name: rows for job, rows in zip(jobs, written)}
        (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sum(written)


# --- kept rows -----------------------------------------------------------------------------


def _count_kept(path: Path) -> int:
    return read_alive(path, ["keep"]).num_rows


def _ranges(kept: list[int], size: int) -> list[list[tuple[int, int, int]]]:
    """Shards of ``size`` kept rows (the last: what is left), in ledger order, each as
    (ledger file, first, stop) ranges of that file's kept rows."""
    shards: list[list[tuple[int, int, int]]] = []
    room = 0
    for i, n in enumerate(kept):
        start = 0
        while start < n:
            if room == 0:
                shards.append([])
                room = size
            take = min(room, n - start)
            shards[-1].append((i, start, start + take))
            start, room = start + take, room - take
    return shards


@dataclass
class ShardJob:
    """One shard: its file, the ranges of kept rows it holds, where their images are."""

    out: Path
    sources: list[tuple[Path, int, int]]  # (ledger file, first kept row, stop)
    images: Path | None  # the download's images/ (None: no images to join)
    image_shards: list[str]  # the image shards of those ledger files
    rows_per_shard: int
    tar: bool


def _write_shard(job: ShardJob) -> int:
    """Write one shard; how many rows."""
    parts = []
    for path, start, stop in job.sources:
        table = read_alive(path).slice(start, stop - start)
        parts.append(table.drop_columns([c for c in DECISION_COLUMNS if c in table.column_names]))
    shard = pa.concat_tables(parts, promote_options="permissive")
    index = None
    if job.images is not None:
        index = ImageIndex.build(job.images, job.image_shards, shard["uid"])
    group = ROWS_PER_GROUP if index is not None else job.rows_per_shard
    schema = _shard_schema(shard.schema, index is not None)
    pieces = _with_images(shard, schema, group, index)
    if job.tar:
        _write_tar(job.out, pieces)
    else:
        _write_parquet(job.out, schema, pieces)
    return shard.num_rows


# --- image bytes ---------------------------------------------------------------------------


@dataclass
class ImageIndex:
    """Where each row of a shard has its image: an image shard and a row in it (-1: nowhere).

    Built by the shard's task from the uid columns of its ledger files' image shards
    alone (the download writes each ledger file's images to shards of its own): a
    shard's worth of uids, no image bytes.
    """

    folder: Path
    shards: list[str]
    columns: list[str]  # each shard's image column (jpg, png or webp): also the extension
    shard_of: np.ndarray  # int32 per kept row
    row_of: np.ndarray  # int64 per kept row

    @classmethod
    def build(cls, folder: Path, names: list[str], kept: pa.ChunkedArray) -> ImageIndex:
        """The index of the ``kept`` uids in the image shards ``names`` of ``folder``."""
        shards, columns, uids, shard_ids, rows = [], [], [], [], []
        for path, column in holding_images(folder, names):
            found = pq.read_table(path, columns=["uid"])["uid"]
            shard_ids.append(np.full(len(found), len(shards), np.int32))
            rows.append(np.arange(len(found), dtype=np.int64))
            uids.append(found)
            shards.append(str(path))
            columns.append(column)
        where = pc.index_in(kept, value_set=pa.chunked_array(uids, pa.string()))
        where = pc.fill_null(where, -1).to_numpy()
        found = where >= 0
        shard_of = np.full(len(where), -1, np.int32)
        row_of = np.full(len(where), -1, np.int64)
        if found.any():
            shard_of[found] = np.concatenate(shard_ids)[where[found]]
            row_of[found] = np.concatenate(rows)[where[found]]
        return cls(Path(folder), shards, columns, shard_of, row_of)

    def column(self, uids: list[str], start: int) -> pa.ChunkedArray:
        """The ``image`` structs of kept rows ``start …`` (whose uids are ``uids``)."""
        stop = start + len(uids)
        shard_of, row_of = self.shard_of[start:stop], self.row_of[start:stop]
        for uid, shard in zip(uids, shard_of):
            if shard < 0:
                raise self._missing(uid, "no image shard holds it")
        todo = pa.table(
            {
                "uid": uids,
                "shard": [self.shards[s] for s in shard_of],
                "column": [self.columns[s] for s in shard_of],
                "row": row_of,
            }
        )
        data = read_image_bytes(todo)
        for uid, blob in zip(uids, data):
            if blob is None or isinstance(blob, Exception):
                raise self._missing(uid, str(blob or "its image bytes are null"))
        paths = [f"{uid}.{self.columns[s]}" for uid, s in zip(uids, shard_of)]
        # Through a table: past 2 GiB of bytes, Arrow splits the binary column into chunks.
        table = pa.table({"bytes": data, "path": paths}, schema=pa.schema(list(IMAGE_TYPE)))
        return table.to_struct_array()

    def _missing(self, uid: str, why: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"shard: kept row {uid} has no image in {self.folder} ({why}); were the "
            "downloaded images deleted or replaced? Re-run the download stage."
        )


def _shard_schema(ledger: pa.Schema, with_images: bool) -> pa.Schema:
    """The ledger's columns, then ``image`` declared to HF ``datasets`` as an Image feature."""
    if not with_images:
        return ledger
    metadata = {**(ledger.metadata or {}), b"huggingface": HF_METADATA.encode()}
    return ledger.append(pa.field("image", IMAGE_TYPE)).with_metadata(metadata)


def _with_images(
    shard: pa.Table, schema: pa.Schema, group: int, images: ImageIndex | None
) -> Iterator[pa.Table]:
    """A shard's rows in pieces of ``group`` rows, each with its ``image`` column joined."""
    for start in range(0, shard.num_rows, group):
        piece = shard.slice(start, group)
        if images is not None:
            column = images.column(piece["uid"].to_pylist(), start)
            piece = pa.Table.from_arrays([*piece.columns, column], schema=schema)
        yield piece


# --- writers -------------------------------------------------------------------------------


def _write_parquet(path: Path, schema: pa.Schema, pieces: Iterator[pa.Table]) -> None:
    """One row group per piece, so only one piece's images are in memory."""
    with pq.ParquetWriter(path, schema) as writer:
        for piece in pieces:
            writer.write_table(piece, row_group_size=piece.num_rows)


def _write_tar(path: Path, pieces: Iterator[pa.Table]) -> None:
    """WebDataset samples ``{uid}.{ext}``, ``{uid}.json``, ``{uid}.txt``, adjacent per sample.

    Members of a sample are sorted by name and samples keep the ledger's order
    (WebDataset groups consecutive members by key). Fixed mtime, owner and mode
    make the bytes depend on the data only.
    """
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for piece in pieces:
            for row in piece.to_pylist():
                image = row.pop("image")
                caption = row["caption"] or ""
                members = {
                    image["path"]: image["bytes"],
                    f"{row['uid']}.json": json.dumps(row, sort_keys=True, default=str).encode(),
                    f"{row['uid']}.txt": caption.encode(),
                }
                for name in sorted(members):
                    _add_member(tar, name, members[name])


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
