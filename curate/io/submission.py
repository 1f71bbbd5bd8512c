"""DataComp's subset format: ``uids.npy``, the kept uids as sorted pairs of uint64.

A DataComp submission names its subset of the pool as a 1-d numpy array of
dtype ``np.dtype("u8,u8")``: each 128-bit hex uid as (high 64 bits, low 64
bits), sorted, saved with ``np.save`` (mlfoundations/datacomp
``baselines/apply_filter.py`` builds it as ``(int(uid[:16], 16),
int(uid[16:32], 16))``; its resharder reads it back). ``write_uids`` writes a
run's kept uids that way; ``read_uids`` reads any such file back to hex uids,
and ``UidSet`` tells which ledger rows a subset holds (``--input-uids``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.core.config import ConfigError
from curate.core.schema import read_alive
from curate.io.uids import fixed_width, is_member

UID_DTYPE = np.dtype("u8,u8")
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def to_pairs(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """32-hex-digit uids (the ledger's form) as ``u8,u8`` pairs, in the same order."""
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    pairs = np.zeros(len(uids), UID_DTYPE)
    if not len(uids):
        return pairs
    digits = fixed_width(uids.cast(pa.string()))
    if digits is None:
        raise ValueError("uids must be 32 hex digits each")
    nibbles = np.where(digits <= ord("9"), digits - ord("0"), (digits | 0x20) - ord("a") + 10)
    weights = np.uint64(16) ** np.arange(15, -1, -1, dtype=np.uint64)
    pairs["f0"] = nibbles[:, :16].astype(np.uint64) @ weights
    pairs["f1"] = nibbles[:, 16:].astype(np.uint64) @ weights
    return pairs


def to_hex(pairs: np.ndarray) -> pa.Array:
    """``u8,u8`` pairs back to 32-digit lowercase hex uids."""
    high, low = pairs["f0"].astype(np.uint64), pairs["f1"].astype(np.uint64)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    nibbles = [(half[:, None] >> shifts) & np.uint64(15) for half in (high, low)]
    digits = _HEX[np.concatenate(nibbles, axis=1)]
    offsets = np.arange(len(pairs) + 1, dtype=np.int32) * 32
    return pa.StringArray.from_buffers(
        len(pairs), pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(digits).tobytes())
    )


def kept_uids(ledger_files: list[Path]) -> pa.Array:
    """The uids of a ledger's kept rows."""
    parts = [read_alive(path, ["uid"])["uid"] for path in ledger_files]
    return pa.chunked_array(parts, pa.string()).combine_chunks()


def write_uids(uids: pa.Array, path: Path) -> int:
    """Save ``uids`` in DataComp's format (sorted ``u8,u8``); returns how many."""
    pairs = to_pairs(uids)
    pairs = pairs[np.argsort(_keys(pairs), kind="stable")]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as f:  # np.save on a name would append ".npy" to any other suffix
            np.save(f, pairs)
    except OSError as exc:  # a failed write names no file: name it for the user
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    return len(pairs)


def open_pairs(path: Path) -> np.ndarray:
    """A DataComp uid file, mapped (not read) once its header is checked: cheap to open."""
    try:
        pairs = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable .npy file: {exc}") from exc
    if pairs.ndim != 1 or pairs.dtype.names is None or len(pairs.dtype.names) != 2:
        raise ConfigError(
            f"{path}: expected a 1-d array of dtype ('u8,u8') as DataComp writes, "
            f"got shape {pairs.shape} and dtype {pairs.dtype}"
        )
    return pairs


def load_pairs(path: Path) -> np.ndarray:
    """A DataComp uid file, checked and sorted: the subset a run is restricted to."""
    pairs = np.asarray(open_pairs(path)).astype(UID_DTYPE)
    keys = _keys(pairs)
    if len(keys) > 1 and not (keys[1:] >= keys[:-1]).all():
        pairs = pairs[np.argsort(keys, kind="stable")]
    return pairs


def read_uids(path: Path) -> pa.Array:
    """The hex uids of a DataComp uid file, sorted."""
    return to_hex(load_pairs(path))


def _keys(pairs: np.ndarray) -> np.ndarray:
    """Pairs as 16 big-endian bytes: byte order is numeric order, and numpy searches
    fixed-width bytes faster than a structured dtype."""
    big_endian = np.empty(len(pairs), np.dtype([("f0", ">u8"), ("f1", ">u8")]))
    big_endian["f0"], big_endian["f1"] = pairs["f0"], pairs["f1"]
    return big_endian.view("S16")


class UidSet:
    """A set of uids as sorted 16-byte keys (the uid's 128 bits, big-endian).

    The one way curate asks whether rows' uids are in a set that outlives a batch: a
    DataComp uid file (``--input-uids``), the uids a fitted filter keeps. A worker holds
    16 bytes a uid, and a batch's membership is a binary search per row.
    """

    def __init__(self, sorted_keys: np.ndarray):
        self.keys = sorted_keys

    @staticmethod
    def keys_of(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ledger uids as keys: their byte order is the uids' text order."""
        return _keys(to_pairs(uids))

    @classmethod
    def of(cls, uids: pa.Array | pa.ChunkedArray) -> UidSet:
        return cls(np.sort(cls.keys_of(uids)))

    @classmethod
    def load(cls, path: Path) -> UidSet:
        """The uids of a DataComp uid file."""
        return cls(_keys(load_pairs(path)))

    def contains(self, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Which of ``uids`` are in the set, as a bool array."""
        return is_member(self.keys_of(uids), self.keys)
