"""The ledger schema: one row per candidate pair, in one place.

Every stage reads and writes ledger batches (``pa.Table``). Stages only add
columns or set a decision (``keep`` / ``dropped_by``); no stage deletes a row,
which is how every drop stays explained.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        # Why the caption could not be read as text ("invalid utf-8"); null when it could.
        pa.field("caption_error", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("lang_score", pa.float32()),
        pa.field("n_words", pa.int32()),
        pa.field("text_count", pa.int32()),
        pa.field("clip_score", pa.float32()),
        # Why the clip stage could not embed the downloaded image; null when it could.
        pa.field("clip_error", pa.string()),
        pa.field("dup_group", pa.int64()),
        pa.field("concepts", pa.list_(pa.string())),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("dropped_by", pa.string()),
    ]
)

#: Columns every ledger has from ingest on.
CORE_COLUMNS = ("uid", "url", "caption", "caption_error", "keep", "dropped_by")


def ledger_type(name: str) -> pa.DataType:
    """The Arrow type of a ledger column (KeyError for a column the schema does not define)."""
    return LEDGER_SCHEMA.field(name).type


def set_column(batch: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Add or replace ``name``, cast to its ledger type when the schema defines it."""
    if name in LEDGER_SCHEMA.names:
        values = values.cast(ledger_type(name))
    index = batch.schema.get_field_index(name)
    if index >= 0:
        return batch.set_column(index, name, values)
    return batch.append_column(name, values)


def stable_uid(url: str | None, caption: str | None) -> str:
    """128-bit hex uid of a (url, caption) pair, stable across runs and machines.

    A null and an empty caption hash differently (the 0x00/0x01 tag), so two
    rows that differ only there do not collide.
    """
    h = hashlib.blake2b(digest_size=16)
    for part in (url, caption):
        if part is None:
            h.update(b"\x00")
        else:
            h.update(b"\x01" + part.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()


def uids_for(urls: pa.Array, captions: pa.Array) -> pa.Array:
    """Stable uids for two aligned string arrays."""
    return pa.array(
        [stable_uid(u, c) for u, c in zip(urls.to_pylist(), captions.to_pylist())],
        pa.string(),
    )


def alive_mask(batch: pa.Table) -> np.ndarray:
    """Rows no earlier stage has dropped (as a numpy bool array)."""
    return pc.fill_null(batch["keep"], False).to_numpy(zero_copy_only=False).astype(bool)


def read_alive(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One ledger file's alive rows (those no stage has dropped): ``columns``, or all."""
    wanted = None if columns is None else [*dict.fromkeys([*columns, "keep"])]
    table = pq.read_table(path, columns=wanted)
    alive = table.filter(pc.fill_null(table["keep"], False))
    return alive if columns is None else alive.select(columns)
