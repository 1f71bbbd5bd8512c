"""Embedding vectors as arrays: read from Arrow columns, scaled to unit length.

One rule for every cosine curate computes (CLIP scores, concept margins, dedup,
decontamination, evaluation): a row of zeros or of non-finite values has no
direction, so it becomes NaN and never matches or passes a threshold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list embedding column as a (rows, D) array of its value type; null rows NaN."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    dense = column if valid.all() else column.filter(pa.array(valid))
    values = dense.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if valid.all():
        return values
    out = np.full((len(column), dim), np.nan, values.dtype)
    out[valid] = values
    return out


def unit_rows(vectors: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows scaled to length 1 in ``dtype``; zero or non-finite rows become NaN."""
    x = np.asarray(vectors, dtype=dtype)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((norms > 0) & np.isfinite(norms), x / norms, np.nan)
