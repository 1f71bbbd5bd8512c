"""DataComp metadata: parquet shards whose CLIP embeddings sit beside them in ``.npz`` files.

DataComp ships each metadata shard ``X.parquet`` (uid, url, text, sizes, CLIP
scores) with an ``X.npz`` of fp16 arrays ``b32_img``, ``b32_txt``, ``l14_img``,
``l14_txt`` whose rows are aligned with the parquet's rows. Later stages (CLIP
score, dedup) read these vectors instead of running a model, so ingest records
in ``datacomp_npz.json`` which npz belongs to which rows of the ledger, and
``read_npz_embeddings`` pairs each vector with its ledger uid (``read_npz_source``:
one source's, for a task that reads only its own). Ingest checks the row counts
from the npz headers only; the arrays are loaded when a stage asks.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.io.readers import IngestError

MANIFEST = "datacomp_npz.json"
KEYS = ("b32_img", "b32_txt", "l14_img", "l14_txt")


def npz_for(parquet: Path) -> Path:
    """The embeddings file DataComp puts beside a metadata parquet."""
    return parquet.with_suffix(".npz")


def npz_shapes(npz: Path) -> dict[str, list[int]]:
    """Shape of every array in an .npz, read from the .npy headers (no array data is loaded)."""
    shapes = {}
    try:
        with zipfile.ZipFile(npz) as archive:
            for name in archive.namelist():
                if not name.endswith(".npy"):
                    continue
                with archive.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(f)
                shapes[name[: -len(".npy")]] = list(shape)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise IngestError(f"{npz}: not a readable .npz file: {exc}") from exc
    return shapes


def npz_entry(parquet: Path, rows: int) -> dict:
    """The manifest entry for one metadata parquet, after checking its npz matches it."""
    npz = npz_for(parquet)
    if not npz.is_file():
        raise IngestError(
            f"{parquet}: DataComp metadata needs {npz.name} beside it, and it is missing "
            "(set format: parquet to ingest without embeddings)"
        )
    shapes = npz_shapes(npz)
    for key, shape in shapes.items():
        if len(shape) != 2 or shape[0] != rows:
            raise IngestError(
                f"{npz}: array {key!r} has shape {tuple(shape)}, "
                f"but {parquet.name} has {rows} rows (expected ({rows}, D))"
            )
    return {
        "parquet": str(parquet.resolve()),
        "npz": str(npz.resolve()),
        "rows": rows,
        "arrays": shapes,
    }


def write_manifest(out_dir: Path, entries: list[dict], first_rows: list[int]) -> Path:
    """Write ``datacomp_npz.json``: per source parquet, its npz and where its rows start."""
    files = [{**entry, "first_row": first} for entry, first in zip(entries, first_rows)]
    path = out_dir / MANIFEST
    path.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    return path


class _UidStream:
    """Consecutive runs of the ledger's uid column, read part file by part file."""

    def __init__(self, ledger_files: list[Path]):
        self._batches = (
            batch.column(0)
            for path in ledger_files
            for batch in pq.ParquetFile(path).iter_batches(columns=["uid"])
        )
        self._pending: list[pa.Array] = []
        self._pending_rows = 0

    def take(self, n: int) -> pa.Array:
        while self._pending_rows < n:
            batch = next(self._batches, None)
            if batch is None:
                raise IngestError(f"the ledger has fewer rows than {MANIFEST} lists")
            self._pending.append(batch)
            self._pending_rows += len(batch)
        joined = pa.concat_arrays(self._pending) if self._pending else pa.array([], pa.string())
        rest = joined.slice(n)
        self._pending, self._pending_rows = [rest], len(rest)
        return joined.slice(0, n)


def _load(npz: Path, key: str) -> np.ndarray:
    if not npz.is_file():
        raise IngestError(f"{npz}: missing (listed in {MANIFEST})")
    try:
        with np.load(npz, allow_pickle=False) as arrays:
            if key not in arrays.files:
                have = ", ".join(arrays.files) or "none"
                raise IngestError(f"{npz}: no array {key!r} (it has: {have})")
            return arrays[key]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise IngestError(f"{npz}: cannot read array {key!r}: {exc}") from exc


def npz_sources(ingest_dir: Path) -> list[dict]:
    """The manifest's entries, one per source parquet in input order (npz, rows, first_row)."""
    ingest_dir = Path(ingest_dir)
    manifest = ingest_dir / MANIFEST
    if not manifest.is_file():
        raise IngestError(
            f"{ingest_dir}: no {MANIFEST}; the ingest input was not DataComp metadata with .npz "
            "embeddings"
        )
    return json.loads(manifest.read_text(encoding="utf-8"))["files"]


def read_npz_embeddings(ingest_dir: Path, key: str) -> Iterator[pa.Table]:
    """Per source parquet, a table of (uid, embedding fixed_size_list<float16, D>).

    ``ingest_dir`` is the ingest stage's output (ledger parts and the manifest);
    ``key`` is one of ``KEYS`` (or any array the npz files hold). Rows come in
    ledger order, so concatenating the tables lines up with the ledger.
    """
    ingest_dir = Path(ingest_dir)
    files = npz_sources(ingest_dir)
    uids = _UidStream(sorted(ingest_dir.glob("part-*.parquet")))
    for entry in files:
        yield _embeddings(entry, key, uids.take(entry["rows"]))


def read_npz_source(ingest_dir: Path, index: int, key: str) -> pa.Table:
    """Source ``index``'s table of (uid, embedding), as ``read_npz_embeddings`` yields it.

    Its uids come from the ledger parts ingest wrote for that source alone
    (``part-SSSSS-*.parquet``, SSSSS = ``index``), so one task per source can
    read them without the parts of any other.
    """
    ingest_dir = Path(ingest_dir)
    entry = npz_sources(ingest_dir)[index]
    parts = sorted(ingest_dir.glob(f"part-{index:05d}-*.parquet"))
    extra = sum(pq.ParquetFile(p).metadata.num_rows for p in parts) - entry["rows"]
    if extra > 0:  # fewer: the stream says so
        raise IngestError(
            f"{ingest_dir}: the ledger parts of {Path(entry['parquet']).name} hold {extra} rows "
            f"more than {MANIFEST} lists"
        )
    return _embeddings(entry, key, _UidStream(parts).take(entry["rows"]))


def _embeddings(entry: dict, key: str, uids: pa.Array) -> pa.Table:
    """A manifest entry's ``key`` array beside its ledger uids, checked against its row count."""
    npz = Path(entry["npz"])
    vectors = _load(npz, key)
    if vectors.ndim != 2 or vectors.shape[0] != entry["rows"]:
        parquet = Path(entry["parquet"]).name
        raise IngestError(
            f"{npz}: array {key!r} has shape {vectors.shape}, "
            f"but {parquet} has {entry['rows']} rows"
        )
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    flat = pa.array(vectors.reshape(-1), pa.float16())
    embedding = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({"uid": uids, "embedding": embedding})
