"""Pool-wide statistics as Parquet artifacts: a DuckDB query over Parquet files, written atomically.

The fit half of fit → artifact → apply (see curate/operators.py). DuckDB
aggregates out of core, so the statistics of a pool larger than memory still fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq


def sql_string(path: Path) -> str:
    """A path as a DuckDB string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def sql_paths(paths: list[Path]) -> str:
    """Paths as a DuckDB list literal, for ``read_parquet``."""
    return "[" + ", ".join(sql_string(p) for p in paths) + "]"


def write_query(query: str, files: list[Path], out: Path, empty: pa.Table) -> Path:
    """Write ``query``'s result to ``out`` (via a temporary name) and return ``out``.

    ``{files}`` in ``query`` stands for the list of ``files``; with no files the
    artifact is ``empty``, a table of the columns the query would give.
    """
    tmp = out.with_name(out.name + ".tmp")
    if files:
        sql = query.format(files=sql_paths(files))
        with duckdb.connect() as con:
            con.execute(f"COPY ({sql}) TO {sql_string(tmp)} (FORMAT parquet)")
    else:
        pq.write_table(empty, tmp)
    os.replace(tmp, out)
    return out
