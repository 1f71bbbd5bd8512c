"""Ledger uids: normalising input uids, and an exact check that no uid occurs twice.

Both run on every row of a pool and sit on ingest's critical path, so both work
on the raw Arrow buffers with numpy (a uid is 32 ASCII bytes) instead of a
Python loop per row.

Uniqueness is global. Up to ``IN_MEMORY_ROWS`` rows, each uid is reduced to a
64-bit key (a mix of its 32 bytes read as four 64-bit words, bijective in each
word, so uids that share a prefix, like sequential ones, still get distinct
keys) and the keys are sorted;
equal keys are only candidates, confirmed or dismissed by comparing the full
uids, so the check is exact. Past that size (8 bytes a row would be too much
memory) DuckDB does the same GROUP BY over the written ledger, spilling to disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.readers import IngestError, as_string, is_text
from curate.runfolder import scratch

#: Above this many rows the duplicate check runs in DuckDB instead of in memory.
IN_MEMORY_ROWS = 25_000_000
#: (uid, [(ledger part index, row in the part), ...]) for a uid that occurs more than once.
Duplicate = tuple[str, list[tuple[int, int]]]

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd, so multiplying by it is a bijection mod 2^64


def _is_in(data: np.ndarray, first: int, count: int) -> np.ndarray:
    """data in [first, first + count), as one wrapping uint8 comparison."""
    return (data - np.uint8(first)) < count


def fixed_width(values: pa.Array) -> np.ndarray | None:
    """The uid bytes as an (n, 32) uint8 view, or None unless every value is 32 bytes."""
    n = len(values)
    if n == 0 or values.null_count:
        return None
    offsets = np.frombuffer(values.buffers()[1], np.int32, n + 1, values.offset * 4)
    if offsets[-1] - offsets[0] != 32 * n or not (np.diff(offsets) == 32).all():
        return None
    return np.frombuffer(values.buffers()[2], np.uint8, 32 * n, offsets[0]).reshape(n, 32)


def normalise_uids(values: pa.Array, path: Path, row0: int) -> pa.Array:
    """Input uids as 32 lowercase hex digits; IngestError naming the first bad row otherwise."""
    if not is_text(values.type):
        raise IngestError(f"{path}: uid column has type {values.type}; uids are 32 hex digits")
    values = as_string(values)
    data = fixed_width(values)
    if data is None:
        return _slow_uids(values, path, row0)
    # Range checks, not a 256-entry lookup table: numpy's fancy indexing over 32
    # bytes a row was most of ingest's per-row cost.
    lower_hex = _is_in(data, 48, 10) | _is_in(data, 97, 6)
    if lower_hex.all():
        return values
    if not (lower_hex | _is_in(data, 65, 6)).all():
        return _slow_uids(values, path, row0)
    offsets = pa.py_buffer(np.arange(len(values) + 1, dtype=np.int32) * 32)
    lowered = data | np.uint8(0x20)  # A-F -> a-f; digits and a-f already have the bit
    return pa.StringArray.from_buffers(len(values), offsets, pa.py_buffer(lowered))


def _slow_uids(values: pa.Array, path: Path, row0: int) -> pa.Array:
    """Find and name the first bad uid (only runs when the vectorised check failed)."""
    for i, raw in enumerate(values.view(pa.binary()).to_pylist()):
        if raw is None:
            raise IngestError(f"{path}: row {row0 + i}: null uid")
        text = raw.decode("utf-8", "replace")
        if len(raw) != 32 or not all(c in "0123456789abcdefABCDEF" for c in text):
            raise IngestError(f"{path}: row {row0 + i}: malformed uid {text!r} (not 32 hex digits)")
    return pc.ascii_lower(values)  # unreachable for bad input; kept total for odd layouts


def uid_keys(uids: pa.Array) -> np.ndarray:
    """64-bit keys of normalised uids: equal uids give equal keys (the converse is checked).

    The 32 ASCII bytes are read as four 64-bit words and mixed so that each step
    is a bijection in the next word: uids that differ in one word never collide.
    """
    data = fixed_width(uids)
    if data is None:
        return np.empty(0, np.uint64)
    words = np.ascontiguousarray(data).view(np.uint64)  # (n, 4)
    keys = words[:, 0] * _MIX
    for i in (1, 2, 3):
        keys ^= words[:, i]
        if i < 3:
            keys *= _MIX
    return keys


class UidCheck:
    """Collects uid keys batch by batch during ingest; ``duplicates`` answers at the end."""

    def __init__(self, in_memory_rows: int | None = None):
        self.in_memory_rows = IN_MEMORY_ROWS if in_memory_rows is None else in_memory_rows
        self._keys: list[np.ndarray] | None = []
        self._rows = 0

    def add(self, uids: pa.Array) -> None:
        self._rows += len(uids)
        if self._keys is not None and self._rows <= self.in_memory_rows:
            self._keys.append(uid_keys(uids))
        else:
            self._keys = None  # too many: DuckDB over the written ledger instead

    def duplicates(self, parts: list[Path], tmp: Path) -> tuple[int, list[Duplicate]]:
        """How many uids occur more than once, and up to three of them with their places."""
        if self._keys is None:
            return _duckdb_duplicates(parts, tmp)
        keys = np.sort(np.concatenate(self._keys)) if self._keys else np.empty(0, np.uint64)
        same = keys[1:] == keys[:-1]
        if not same.any():
            return 0, []
        return _confirm(parts, np.unique(keys[1:][same]))


def _confirm(parts: list[Path], candidates: np.ndarray) -> tuple[int, list[Duplicate]]:
    """Compare full uids of the rows whose keys collided."""
    found = []
    for i, part in enumerate(parts):
        row = 0
        for batch in pq.ParquetFile(part).iter_batches(columns=["uid"]):
            uids = batch.column(0)
            hits = np.flatnonzero(np.isin(uid_keys(uids), candidates))
            found.append(
                pa.table(
                    {
                        "uid": uids.take(pa.array(hits)),
                        "part": pa.array(np.full(len(hits), i, np.int64)),
                        "row": pa.array(hits + row, pa.int64()),
                    }
                )
            )
            row += len(uids)
    rows = pa.concat_tables(found).sort_by(
        [("uid", "ascending"), ("part", "ascending"), ("row", "ascending")]
    )
    counts = rows.group_by("uid").aggregate([("row", "count")])
    dup = counts.filter(pc.greater(counts["row_count"], 1))["uid"]
    shown = sorted(dup.to_pylist())[:3]
    places = rows.filter(pc.is_in(rows["uid"], pa.array(shown, pa.string()))).to_pylist()
    return len(dup), [(u, [(r["part"], r["row"]) for r in places if r["uid"] == u]) for u in shown]


def _duckdb_duplicates(parts: list[Path], tmp: Path) -> tuple[int, list[Duplicate]]:
    import duckdb  # only pools past IN_MEMORY_ROWS pay for importing it

    files = [str(p) for p in parts]
    repeated = "SELECT uid FROM read_parquet($files) GROUP BY uid HAVING count(*) > 1"
    with scratch(tmp, ".duckdb-") as spill:
        con = duckdb.connect(config={"temp_directory": str(spill)})
        try:
            total = con.execute(f"SELECT count(*) FROM ({repeated})", {"files": files}).fetchone()
            if not total[0]:
                return 0, []
            shown = con.execute(f"{repeated} ORDER BY uid LIMIT 3", {"files": files}).fetchall()
            shown = [u for (u,) in shown]
            places = con.execute(
                "SELECT uid, filename, file_row_number FROM read_parquet($files, filename=true, "
                "file_row_number=true) WHERE uid IN (SELECT unnest($uids)) "
                "ORDER BY uid, filename, file_row_number",
                {"files": files, "uids": shown},
            ).fetchall()
        finally:
            con.close()
    index = {f: i for i, f in enumerate(files)}
    return total[0], [(u, [(index[f], r) for v, f, r in places if v == u]) for u in shown]


def is_member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``keys[i] in sorted_keys``, by binary search: for uid sets too large to hash per batch."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys
