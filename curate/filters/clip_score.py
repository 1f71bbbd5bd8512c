"""CLIP-score filters: a fixed threshold (LAION) and a top fraction of the pool (DataComp).

Both reproduce mlfoundations/datacomp ``baselines/apply_filter.py`` uid for uid.
``load_uids_with_clip_score_helper`` reads one metadata parquet with pandas and keeps::

    df[df[key] >= threshold]["uid"]

``clip_score`` is that rule with a fixed ``min`` (``score_threshold`` on
``clip_score`` by default, the bound a cosine): DataComp's
``--name clip_score --arch b32 --threshold 0.25``, and its ``laion2b`` baseline,
``load_uids_with_clip_score(metadata_dir, "b32", 0.28, None, ...,
gcld3_en_filter=True)`` (B/32 score >= 0.28 among gcld3-English captions).

``clip_score_top_fraction`` is ``--fraction``: when ``threshold is None``,
``get_threshold`` loads the key column of every parquet and converts the
fraction into a threshold, which is then applied file by file as above::

    n = int(len(df) * fraction)
    threshold = -np.sort(-df[key].values)[n]

``fit`` computes the same number on the cluster (``top_fraction``: an exact
radix select, file by file), and ``keep`` applies it per batch. What that code
does, and therefore what this module does:

* ``len(df)`` counts every row of the pool, including rows whose score is
  null or NaN (pandas reads a null float as NaN). Here the pool is the rows
  alive (``keep`` true) in the filter stage's input: filters earlier in the same
  set do not shrink it, as DataComp's pool is the whole metadata; put the filter
  in a later stage to take a fraction of what they kept.
* ``n`` is ``int(len * fraction)`` in float64, truncated: ``int(100 * 0.29)``
  is 28, not 29.
* ``-np.sort(-x)`` is a descending sort with NaN last (``fit`` leaves NaN and
  null out and counts them). When index
  ``n`` lands on a NaN, the threshold is NaN, ``x >= NaN`` is False everywhere,
  and DataComp keeps NOTHING; this filter then keeps nothing too, on purpose.
* Every row tied with the threshold is kept, so ``n + 1`` rows or more survive.
* ``fraction: 1.0`` makes ``n == len`` and DataComp raises ``IndexError``;
  here it keeps every row that has a (non-NaN) score. An empty pool keeps nothing.
* Comparisons happen in the column's own dtype, by ``score_threshold``'s rule.
  DataComp's scores are float32 (pandas reads a float32 parquet column as
  float32); the threshold taken from them is a float32, which ``fit`` stores
  exactly (``float.hex``).

A null or NaN score always drops. A column the ledger lacks fails the run
before the filter stage starts (through ``needs``), so nothing is fitted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import Cosine, Range
from curate.core.operators import Filter, FitContext, Fitted, register_filter
from curate.core.schema import read_alive
from curate.filters.score_threshold import ScoreThreshold, at_least, score_values, scored

if TYPE_CHECKING:
    from curate.engine import Engine

ARTIFACT = "threshold.json"
#: The artifact's ``decision``: compare with ``threshold``, keep no row, keep every scored row.
THRESHOLD, KEEP_NONE, KEEP_ALL = "threshold", "keep_none", "keep_all"


def top_fraction(files: list[Path], column: str, fraction: float, engine: Engine) -> dict:
    """DataComp's ``get_threshold`` over the alive rows of ``files``, as the artifact's fields.

    The n-th largest score is found exactly, without sorting the pool in one place: a
    radix select over the scores' bits in their total order (``order_keys``), 8 bits a
    round, each round one task per ledger file counting its scores under the prefix
    found so far in 256 bins (``_histogram``). The driver adds up 256 counts per file
    and round (4 rounds for 32-bit scores, 8 for 64-bit), never a score.
    """
    kind = pq.read_schema(files[0]).field(column).type if files else pa.float32()
    if not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
        raise TypeError(f"column {column!r} holds {kind}, not numeric scores")
    bits = 64 if kind.bit_width > 32 else 32
    label = f"{column}: top {fraction:g}"

    def histograms(shift: int, prefix: int) -> list[dict]:
        jobs = [(str(f), column, bits, shift, prefix) for f in files]
        return engine.map_items(_histogram, jobs, label)

    counts = histograms(bits - RADIX_BITS, -1)
    alive = sum(c["alive"] for c in counts)
    scored = sum(c["scored"] for c in counts)
    n = int(alive * fraction)  # DataComp: n = int(len(df) * fraction)
    threshold = None
    if n < scored:  # the n-th largest, 0-based, NaN and null left out: the k-th smallest
        k, prefix = scored - 1 - n, 0
        for shift in range(bits - RADIX_BITS, -1, -RADIX_BITS):
            if shift < bits - RADIX_BITS:
                counts = histograms(shift, prefix)
            below = np.cumsum(np.sum([c["bins"] for c in counts], axis=0))
            digit = int(np.searchsorted(below, k, side="right"))  # the bin holding the k-th
            k -= int(below[digit - 1]) if digit else 0
            prefix = (prefix << RADIX_BITS) | digit
        threshold = from_order_key(prefix, kind)
    if n >= alive:
        decision = KEEP_ALL  # fraction 1.0 (DataComp: IndexError), or an empty pool
    elif threshold is None:
        decision = KEEP_NONE  # sorted[n] is NaN: DataComp keeps nothing
    else:
        decision = THRESHOLD
    value = None if threshold is None else float(threshold)
    return {
        "column": column,
        "fraction": fraction,
        "alive_rows": int(alive),
        "scored_rows": int(scored),
        "n": n,
        "decision": decision,
        "threshold": None if value is None else value.hex(),  # exact
        "threshold_decimal": None if value is None else repr(value),  # for people
    }


#: Bits of the score's order key decided per round of the top-fraction select.
RADIX_BITS = 8


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned keys whose order is the values' order (floats without NaN, or integers)."""
    width = values.dtype.itemsize * 8
    unsigned = np.dtype(f"u{values.dtype.itemsize}")
    raw = values.view(unsigned)
    sign = unsigned.type(1 << (width - 1))
    if values.dtype.kind == "f":  # negative floats: all bits flipped; others: the sign bit set
        return np.where(raw & sign, ~raw, raw | sign)
    return raw ^ sign if values.dtype.kind == "i" else raw


def from_order_key(key: int, kind: pa.DataType) -> float | int:
    """The score whose order key is ``key`` (``order_keys`` inverted), as a Python number."""
    dtype = np.dtype(kind.to_pandas_dtype())
    width = dtype.itemsize * 8
    unsigned = np.dtype(f"u{dtype.itemsize}")
    sign = 1 << (width - 1)
    if dtype.kind == "f":
        raw = key ^ sign if key & sign else ~key & ((1 << width) - 1)
    else:
        raw = key ^ sign if dtype.kind == "i" else key
    return np.array([raw], unsigned).view(dtype)[0].item()


def _histogram(job: tuple[str, str, int, int, int]) -> dict:
    """One ledger file's alive and scored rows, and its scores' order keys whose bits above
    ``shift + RADIX_BITS`` are ``prefix`` (-1: all), counted in 256 bins of the next 8 bits."""
    path, column, bits, shift, prefix = job
    scores = read_alive(path, [column])[column].combine_chunks()
    values = pc.drop_null(scores).to_numpy(zero_copy_only=False)
    if values.dtype.kind == "f":
        values = values[~np.isnan(values)]
    keys = order_keys(values).astype(np.uint64 if bits == 64 else np.uint32)
    if prefix >= 0:
        keys = keys[(keys >> np.uint64(shift + RADIX_BITS)) == prefix]
    digits = (keys >> np.uint64(shift)) & 0xFF
    bins = np.bincount(digits.astype(np.int64), minlength=256)
    return {"alive": len(scores), "scored": len(values), "bins": bins}


@register_filter("clip_score")
@dataclass(kw_only=True)
class ClipScore(ScoreThreshold):
    """Keep ``column >= min`` (DataComp ``--threshold``, LAION-2B's 0.28); null/NaN drops."""

    column: str = "clip_score"
    # A CLIP score is a cosine: -1 keeps every scored row (score_threshold: any bound).
    min: Cosine = field()  # required (the base's bound is optional)


@register_filter("clip_score_top_fraction")
@dataclass
class ClipScoreTopFraction(Fitted, Filter):
    """Keep the top ``fraction`` of the pool by ``column``, ties included (DataComp --fraction)."""

    fraction: Annotated[float, Range(0, 1, low_open=True, why="the share of the pool to keep")]
    column: str = "clip_score"

    _rule: tuple[str, float | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not self.column:
            raise ValueError("column must name a numeric ledger column")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise ValueError(f"fraction must be a number in (0, 1], got {self.fraction!r}")
        self.fraction = float(self.fraction)

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.column,)

    def fit(self, ctx: FitContext) -> None:
        stats = Path(ctx.stats_dir)
        fitted = top_fraction(
            [Path(f) for f in ctx.ledger_files], self.column, self.fraction, ctx.engine
        )
        out = stats / ARTIFACT
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(fitted, indent=2) + "\n")
        os.replace(tmp, out)

    def load(self, stats_dir: Path) -> None:
        artifact = stats_dir / ARTIFACT
        fitted = json.loads(artifact.read_text())
        if fitted["column"] != self.column or fitted["fraction"] != self.fraction:
            raise RuntimeError(f"{artifact}: fitted for other parameters than {self}")
        hexed = fitted["threshold"]
        self._rule = (fitted["decision"], None if hexed is None else float.fromhex(hexed))

    def keep(self, batch: pa.Table) -> np.ndarray:
        decision, threshold = self._rule
        values = score_values(batch[self.column], self.column)
        if decision == KEEP_NONE:
            return np.zeros(len(values), dtype=bool)
        if decision == KEEP_ALL:
            return scored(values)
        return at_least(values, threshold)
