"""Ledger uids: normalising input uids, 64-bit keys, membership in a sorted key set.

All run on every row of a pool and sit on ingest's critical path, so they work
on the raw Arrow buffers with numpy (a uid is 32 ASCII bytes) instead of a
Python loop per row. A key mixes a uid's 32 bytes read as four 64-bit words,
bijectively in each word, so uids that share a prefix (sequential ones) still
get distinct keys: ingest partitions uids by key for its duplicate check, and
samples are drawn by a seeded key hash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.readers import IngestError, as_string, is_text

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


def is_member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``keys[i] in sorted_keys``, by binary search: for uid sets too large to hash per batch."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def sample_keys(uids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """Each uid's seeded 64-bit key: samples take the smallest, the same in every process."""
    keys = uid_keys(uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids)
    return (keys ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) * np.uint64(0xBF58476D1CE4E5B9)


def hashed_sample(uids: pa.Array, size: int, seed: int) -> pa.Array:
    """``size`` uids chosen by a seeded hash of each uid: the same rows whatever the file order."""
    if size >= len(uids):
        return uids
    return uids.take(pa.array(np.argpartition(sample_keys(uids, seed), size - 1)[:size]))
