"""Vectorised caption tokenisation shared by annotators, filters and their fits.

Words are Python's ``str.split()`` words: Arrow's ``utf8_split_whitespace``
breaks on exactly the code points for which ``str.isspace()`` is true (checked
over all of Unicode in the tests), but it leaves empty strings at the ends, so
empty tokens are removed here. DataComp's basic filter counts ``len(text.split())``;
counting the same way is what makes uid-for-uid parity possible.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _split(captions: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Non-empty tokens, the row each comes from, and the per-row token count."""
    lists = pc.utf8_split_whitespace(captions)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy()
    nonempty = pc.greater(pc.binary_length(flat), 0)
    tokens = flat.filter(nonempty)
    parents = parents[nonempty.to_numpy(zero_copy_only=False)]
    counts = np.bincount(parents, minlength=len(captions)).astype(np.int32)
    return tokens, parents, counts


def _as_array(captions: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(captions, pa.ChunkedArray):
        return captions.combine_chunks()
    return captions


def word_counts(captions: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``len(caption.split())`` per row (int32); null where the caption is null."""
    captions = _as_array(captions)
    _, _, counts = _split(captions)
    return pa.array(counts, pa.int32(), mask=~pc.is_valid(captions).to_numpy(zero_copy_only=False))


def words(captions: pa.Array | pa.ChunkedArray, lower: bool = False) -> pa.ListArray:
    """``caption.split()`` per row as a list array (empty list for a null caption)."""
    captions = _as_array(captions)
    if lower:
        captions = pc.utf8_lower(captions)
    tokens, _, counts = _split(captions)
    offsets = np.zeros(len(captions) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), tokens)


def bigrams(tokens: pa.ListArray) -> pa.ListArray:
    """Adjacent token pairs per row, joined by one space."""
    flat = tokens.flatten()
    offsets = tokens.offsets.to_numpy()
    counts = np.diff(offsets)
    if len(flat) == 0:
        return pa.ListArray.from_arrays(pa.array(np.zeros(len(tokens) + 1, np.int32)), flat)
    # A pair (i, i+1) is within one row unless i is the last token of its row.
    last = offsets[1:][counts > 0] - 1
    starts = np.ones(len(flat), dtype=bool)
    starts[last] = False
    idx = np.flatnonzero(starts)
    pairs = pc.binary_join_element_wise(flat.take(idx), flat.take(idx + 1), " ")
    pair_counts = np.maximum(counts - 1, 0)
    pair_offsets = np.zeros(len(tokens) + 1, dtype=np.int32)
    np.cumsum(pair_counts, out=pair_offsets[1:])
    return pa.ListArray.from_arrays(pa.array(pair_offsets), pairs)
