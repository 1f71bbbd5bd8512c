"""What a run's report shows, queried from the run folder: histograms, concept counts,
duplicate groups and image bytes by uid.

Every query over the ledger is DuckDB over its Parquet files and aggregates or
limits in SQL (histogram bins with ``floor()``, examples with ``LIMIT``), so a
10^6-row run is never loaded into memory: what comes back is a few hundred
numbers or a few dozen rows. Image bytes are read with the same row-group reader
the clip stage uses (``curate.clip.embed.read_image_bytes``), only for the uids asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate.clip.embed import read_image_bytes
from curate.core.config import ConfigError
from curate.core.layout import CONCEPT_COUNTS, IMAGES, LEDGER, RECIPE, ledger_files, stage_folder
from curate.core.operators import load_registry
from curate.core.runfolder import check_shared
from curate.io.images import image_column, image_shards
from curate.io.stats import sql_name
from curate.runner import read_manifest
from curate.stages import STAGES

LEDGER_SQL = "read_parquet(?, union_by_name = true)"
#: Score columns worth a histogram: the clip stage's, and DataComp metadata's own.
SCORE_COLUMNS = ("clip_score", "clip_l14_similarity_score", "clip_b32_similarity_score")


def clean_text(value: object, limit: int = 200) -> str:
    """``value`` as one line of at most ``limit`` printable characters.

    Unprintable characters (controls, bidi overrides, zero-width and line
    separators) become their Python escapes, ``\\n``, ``\\x07``, ``\\u202e``: a
    caption that hides or reorders text shows what it holds. A longer text is cut
    and ends with "…". Escape the result for HTML or Markdown where it goes.
    """
    text = value if isinstance(value, str) else repr(value)
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def ledger_glob(run_dir: Path) -> str:
    return str(Path(run_dir) / LEDGER / "*.parquet")


def check_ledger(run_dir: Path) -> None:
    """Stop with a clear error where DuckDB would fail mid-report: a ledger with no
    Parquet file, or one cut short (a run killed while writing it); or a base run whose
    stages the run shares that is gone."""
    check_shared(run_dir)
    files = ledger_files(Path(run_dir) / LEDGER)
    if not files:
        raise ConfigError(f"{run_dir}/ledger holds no Parquet file: the run did not finish")
    for file in files:
        try:
            pq.read_metadata(file)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(
                f"{file}: not a readable Parquet file ({error}); run the recipe again"
            ) from error


def stage_folders(run_dir: Path) -> list[tuple[dict, Path]]:
    """Each stage of the run's ``recipe.yaml`` (resolved parameters) with its folder.

    The folder is the runner's ``stage_folder``. Folders an earlier recipe left behind
    under other names are not the run's, so nothing here globs for them.
    """
    load_registry()
    run_dir = Path(run_dir)
    stages = yaml.safe_load((run_dir / RECIPE).read_text())["stages"]
    out = []
    for i, entry in enumerate(stages):
        folder = STAGES[entry["stage"]].folder
        out.append((entry, stage_folder(run_dir, i, entry["name"], folder)))
    return out


def ledger_columns(run_dir: Path) -> set[str]:
    """The column names of a run's ledger (union over its files)."""
    con = duckdb.connect()
    rows = con.execute(f"DESCRIBE SELECT * FROM {LEDGER_SQL}", [ledger_glob(run_dir)]).fetchall()
    return {r[0] for r in rows}


@dataclass
class ScoreHistogram:
    """Counts per bin of one score column, split by the row's final decision."""

    column: str
    edges: np.ndarray  # bins + 1 bin edges, ascending
    kept: np.ndarray  # rows per bin with keep true
    dropped: np.ndarray  # rows per bin with keep false or null

    @property
    def rows(self) -> int:
        return int(self.kept.sum() + self.dropped.sum())


def score_histogram(
    run_dir: Path, column: str = "clip_score", bins: int = 40
) -> ScoreHistogram | None:
    """The histogram of ``column`` over rows with a finite score (None: no such row/column).

    Two aggregate queries: the range, then ``floor((x - lo) / width)`` per row,
    grouped; the maximum falls in the last bin.
    """
    if column not in ledger_columns(run_dir):
        return None
    con = duckdb.connect()
    scores = (
        f"SELECT CAST({sql_name(column)} AS DOUBLE) AS x, coalesce(keep, false) AS k "
        f"FROM {LEDGER_SQL} WHERE isfinite({sql_name(column)})"
    )
    lo, hi, n = con.execute(
        f"SELECT min(x), max(x), count(*) FROM ({scores})", [ledger_glob(run_dir)]
    ).fetchone()
    if not n:
        return None
    if hi == lo:  # one value: one bin around it
        lo, hi, bins = lo - 0.5, hi + 0.5, 1
    width = (hi - lo) / bins
    counts = con.execute(
        f"SELECT least(CAST(floor((x - ?) / ?) AS BIGINT), ?) AS bin, k, count(*) "
        f"FROM ({scores}) GROUP BY ALL",
        [lo, width, bins - 1, ledger_glob(run_dir)],
    ).fetchall()
    kept, dropped = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    for b, k, c in counts:
        (kept if k else dropped)[b] += c
    return ScoreHistogram(column, np.linspace(lo, hi, bins + 1), kept, dropped)


@dataclass
class ConceptCounts:
    """The most matched concepts of a balance stage: rows matching each, before and after."""

    stage: str  # the balance stage's folder name, e.g. 06_balance
    t: int | None  # the cap
    concepts: int  # in the list
    matched: int  # concepts matched by at least one row
    names: list[str]  # the top concepts by matches, most matched first
    before: np.ndarray
    after: np.ndarray


def concept_counts(run_dir: Path, top: int = 30) -> ConceptCounts | None:
    """The last balance stage's ``concept_counts.csv``, top ``top`` concepts (None: no balance)."""
    found = [
        folder / CONCEPT_COUNTS
        for entry, folder in stage_folders(run_dir)
        if entry["stage"] == "balance" and (folder / CONCEPT_COUNTS).is_file()
    ]
    if not found:
        return None
    path = found[-1]
    con = duckdb.connect()
    source = "read_csv(?, header = true)"
    total, matched = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE matches > 0) FROM {source}", [str(path)]
    ).fetchone()
    rows = con.execute(
        f"SELECT concept, matches, kept FROM {source} WHERE matches > 0 "
        f"ORDER BY matches DESC, concept LIMIT {int(top)}",
        [str(path)],
    ).fetchall()
    t = read_manifest(path.parent).get("counters", {}).get("t")
    return ConceptCounts(
        path.parent.name,
        t,
        total,
        matched,
        [str(r[0]) for r in rows],
        np.array([r[1] for r in rows], np.int64),
        np.array([r[2] for r in rows], np.int64),
    )


def dup_groups(run_dir: Path, groups: int = 4, members: int = 6) -> list[list[dict]]:
    """The largest duplicate groups (``dup_group``), each: kept members first, then by uid.

    Up to ``members`` rows of each of ``groups`` groups; [] when the ledger has no groups.
    """
    names = ledger_columns(run_dir)
    if "dup_group" not in names:
        return []
    cols = ["uid", "caption", "keep", "dropped_by", "dup_group"]
    cols += [c for c in ("clip_score",) if c in names]
    select = ", ".join(f"s.{c}" for c in cols)
    rows = (
        duckdb.connect()
        .execute(
            f"WITH s AS (SELECT * FROM {LEDGER_SQL} WHERE dup_group IS NOT NULL), "
            "g AS (SELECT dup_group, count(*) AS n FROM s GROUP BY dup_group "
            f"ORDER BY n DESC, dup_group LIMIT {int(groups)}) "
            f"SELECT {select} FROM s JOIN g USING (dup_group) "
            "QUALIFY row_number() OVER (PARTITION BY s.dup_group "
            f"ORDER BY coalesce(s.keep, false) DESC, s.uid) <= {int(members)} "
            "ORDER BY g.n DESC, s.dup_group, coalesce(s.keep, false) DESC, s.uid",
            [ledger_glob(run_dir)],
        )
        .fetchall()
    )
    out: dict[int, list[dict]] = {}
    for row in rows:
        record = dict(zip(cols, row))
        out.setdefault(record["dup_group"], []).append(record)
    return list(out.values())


def dup_summary(run_dir: Path) -> tuple[int, int]:
    """(groups, rows in groups) of the ledger's ``dup_group`` column."""
    return (
        duckdb.connect()
        .execute(
            f"SELECT count(DISTINCT dup_group), count(dup_group) FROM {LEDGER_SQL}",
            [ledger_glob(run_dir)],
        )
        .fetchone()
    )


def read_images(run_dir: Path, uids: list[str]) -> dict[str, bytes]:
    """The downloaded image bytes of ``uids`` (those without an image are left out).

    DuckDB finds each uid's image shard and row from the shards' uid columns; the
    bytes come from only the row groups that hold them. A run without a download
    stage (no ``images/``) gives {}.
    """
    column_of = {
        str(path): column
        for path in image_shards(Path(run_dir) / IMAGES)
        if (column := image_column(path))
    }
    wanted = sorted(set(uids))
    if not column_of or not wanted:
        return {}
    found = (
        duckdb.connect()
        .execute(
            "SELECT uid, filename, file_row_number FROM read_parquet(?, "
            "filename = true, file_row_number = true, union_by_name = true) "
            "WHERE uid IN (SELECT unnest(?))",
            [list(column_of), wanted],
        )
        .fetchall()
    )
    if not found:
        return {}
    where, shards, rows = zip(*found)
    todo = pa.table(
        {"uid": where, "shard": shards, "column": [column_of[s] for s in shards], "row": rows}
    )
    data = read_image_bytes(todo)
    return {u: blob for u, blob in zip(where, data) if isinstance(blob, bytes) and blob}


#: Columns worth showing next to an example, when the ledger has them.
CONTEXT_COLUMNS = (
    "original_width",
    "original_height",
    "n_words",
    "lang",
    "lang_score",
    "text_count",
    "clip_score",
    "status",
)


def examples(run_dir: Path, reason: str | None, limit: int) -> list[dict]:
    """Up to ``limit`` ledger rows dropped by ``reason`` (None: kept rows), in uid order."""
    con = duckdb.connect()
    glob = ledger_glob(run_dir)
    source = "read_parquet(?, union_by_name = true)"
    names = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}", [glob]).fetchall()}
    cols = ["uid", "caption"] + [c for c in CONTEXT_COLUMNS if c in names]
    where = "dropped_by IS NULL" if reason is None else "dropped_by = ?"
    params = [glob] if reason is None else [glob, reason]
    cur = con.execute(
        f"SELECT {', '.join(cols)} FROM {source} WHERE {where} ORDER BY uid LIMIT {int(limit)}",
        params,
    )
    return [dict(zip(cols, row)) for row in cur.fetchall()]
