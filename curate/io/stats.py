"""Pool-wide statistics on the cluster: partials per ledger file, merged per hash partition.

The fit half of fit → artifact → apply (see curate/core/operators.py). A statistic
over the whole pool (how often each caption occurs, the n-gram vocabulary) is
made in two rounds of engine tasks, and no row passes through the driver:

1. each task reads what it needs of one ledger file and ``scatter``s its partial
   result, split by a hash of the key, into ``WORK/FILE/part=P/``;
2. each task of the second round reads partition P of every file
   (``partition_files``) and merges it into one artifact file (``write_query``).

The driver only chooses how many partitions there are and hands out folder
names. DuckDB hashes, splits and merges, out of core (its ``hash`` is the same in
every process of one installation); each task's connection uses one thread,
since a task holds one CPU.
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


def sql_name(name: str) -> str:
    """A column name as a DuckDB identifier, whatever characters it holds."""
    return '"' + name.replace('"', '""') + '"'


def sql_paths(paths: list[Path]) -> str:
    """Paths as a DuckDB list literal, for ``read_parquet``."""
    return "[" + ", ".join(sql_string(p) for p in paths) + "]"


#: At most this many partitions (a ledger file is ~10^5 rows: one partition per file
#: keeps a merge task's input about one file's worth).
MAX_PARTITIONS = 256


def partitions_for(files: list[Path]) -> int:
    """How many partitions a statistic over ``files`` is merged in: one per file, capped."""
    return max(1, min(MAX_PARTITIONS, len(files)))


def connect() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for one task: one thread."""
    return duckdb.connect(config={"threads": 1})


def scatter(con: duckdb.DuckDBPyConnection, sql: str, key: str, folder: Path, parts: int) -> None:
    """Write the rows of ``sql`` under ``folder/part=P/`` by a hash of the ``key`` expression
    (nothing when there are none)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    con.execute(
        f"COPY (SELECT *, hash({key}) % {parts} AS part FROM ({sql})) TO {sql_string(folder)} "
        "(FORMAT parquet, PARTITION_BY (part), OVERWRITE_OR_IGNORE)"
    )


def partition_files(work: Path, part: int) -> list[Path]:
    """Partition ``part``'s files from every ledger file's folder under ``work``."""
    return sorted(work.glob(f"*/part={part}/*.parquet"))


def write_query(query: str, files: list[Path], out: Path, empty: pa.Table) -> Path:
    """Write ``query``'s result to ``out`` (via a temporary name) and return ``out``.

    ``{files}`` in ``query`` stands for a source over ``files`` (partition files: their
    ``part`` column left out); with no files the result is ``empty``, a table of the
    columns the query would give.
    """
    tmp = out.with_name(out.name + ".tmp")
    if files:
        source = f"read_parquet({sql_paths(files)}, hive_partitioning = false)"
        with connect() as con:
            con.execute(
                f"COPY ({query.format(files=source)}) TO {sql_string(tmp)} (FORMAT parquet)"
            )
    else:
        pq.write_table(empty, tmp)
    os.replace(tmp, out)
    return out
