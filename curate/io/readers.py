"""Streaming readers for ingest: Parquet, CSV and JSONL files as bounded Arrow record batches.

Each format fails differently on hostile bytes, so the differences are absorbed
here and ingest sees one shape: batches whose text columns are ``string`` but
may still hold invalid UTF-8 (ingest checks and repairs them in one place).

- Parquet: pyarrow does not validate UTF-8 on read, so a string column can
  carry invalid bytes; batches pass through as stored.
- CSV: pyarrow silently turns a column with invalid UTF-8 into ``binary`` and
  infers types from the first block only (a later block then fails to
  convert), so every column is read as bytes and viewed as ``string``. CSV has
  no types; ingest casts columns it knows (``original_width`` …) to the ledger
  type and keeps the others as text.
- JSONL: pyarrow's JSON reader rejects lone surrogate escapes (``"\\ud800"``),
  non-object lines and a column whose first block is all null, so lines are
  parsed with Python's ``json``: one pass fixes each column's type, a second
  reads. Slower than Arrow, but JSONL is a convenience format; large pools come
  as Parquet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq


class IngestError(ValueError):
    """An input that cannot be ingested as written; the message names the file and the problem."""


#: Extensions per format (compressed variants: ``.gz``, ``.bz2``, ``.zst``, ``.lz4`` suffixes).
EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".tsv"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
#: Readers cut batches at about this many bytes of input, whatever the row count.
BATCH_BYTES = 64 << 20


def format_of(path: Path) -> str | None:
    """The format a file's extension names, or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    return next((fmt for fmt, exts in EXTENSIONS.items() if ext in exts), None)


@dataclass
class Source:
    """One input file: its format, the schema of the batches it yields, its rows if known."""

    path: Path
    format: str  # parquet | csv | jsonl
    schema: pa.Schema
    rows: int | None = None
    json_columns: tuple[str, ...] = ()  # JSONL columns of mixed or nested values, kept as JSON text
    first_line: dict = field(default_factory=dict)  # JSONL: (column, kind) -> line it first shows


@contextmanager
def reading(path: Path, what: str):
    """Turn a reader's exception into an IngestError naming the file, never a traceback."""
    try:
        yield
    except IngestError:
        raise
    except (pa.ArrowException, OSError, ValueError, OverflowError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IngestError(f"{path}: cannot read as {what}: {message}") from exc


def open_source(path: Path, fmt: str) -> Source:
    """Read what ingest must know before reading rows: columns and their types."""
    if fmt == "parquet":
        with reading(path, "Parquet"), pq.ParquetFile(path) as pf:
            return Source(path, fmt, pf.schema_arrow, pf.metadata.num_rows)
    if fmt == "csv":
        return Source(path, fmt, _csv_schema(path))
    if fmt == "jsonl":
        return _jsonl_source(path)
    raise IngestError(f"{path}: unknown format {fmt!r}")


def iter_batches(
    source: Source, batch_rows: int, row_groups: list[int] | None = None
) -> Iterator[pa.RecordBatch]:
    """The file's rows in order, at most ``batch_rows`` per batch (CSV: per parse block);
    of a Parquet file, only ``row_groups`` when given."""
    if source.format == "parquet":
        yield from _parquet_batches(source, batch_rows, row_groups)
    else:
        readers = {"csv": _csv_batches, "jsonl": _jsonl_batches}
        yield from readers[source.format](source, batch_rows)


def check_unique_names(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise IngestError(f"{path}: column {name!r} appears twice")
        seen.add(name)


# --- Parquet


def _parquet_batches(
    source: Source, batch_rows: int, row_groups: list[int] | None
) -> Iterator[pa.RecordBatch]:
    with reading(source.path, "Parquet"), pq.ParquetFile(source.path) as pf:
        # Rows are not a bound on memory when captions are 1 MB each: size batches by bytes.
        meta = pf.metadata
        wanted = range(meta.num_row_groups) if row_groups is None else row_groups
        groups = [meta.row_group(i) for i in wanted]
        widest = max((g.total_byte_size / max(g.num_rows, 1) for g in groups), default=1)
        rows = max(1024, min(batch_rows, int(BATCH_BYTES // max(widest, 1))))
        yield from pf.iter_batches(batch_size=rows, row_groups=row_groups)


# --- CSV


def _delimiter(path: Path) -> str:
    return "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","


def _csv_options(path: Path, names: list[str] | None):
    delimiter = _delimiter(path)
    read = pcsv.ReadOptions(block_size=1 << 24, use_threads=False)  # single thread: row numbers
    parse = pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    # Unquoted empty fields are null, quoted "" is an empty string; no other null spellings
    # (a caption reading "NA" or "null" is text).
    convert = pcsv.ConvertOptions(
        column_types={n: pa.binary() for n in names or []},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    return {"read_options": read, "parse_options": parse, "convert_options": convert}


def _csv_schema(path: Path) -> pa.Schema:
    if path.stat().st_size == 0:
        return pa.schema([])  # no header at all: zero rows, no columns
    with reading(path, "CSV"):
        reader = pcsv.open_csv(path, **_csv_options(path, None))
        names = reader.schema.names
        reader.close()
    check_unique_names(path, names)
    line = _unclosed_quote(path)
    if line is not None:
        raise IngestError(
            f"{path}: line {line}: a quoted field opens there and never closes "
            "(read as CSV, it would swallow the rest of the file)"
        )
    return pa.schema([(n, pa.string()) for n in names])


def _chunks(path: Path, size: int = 1 << 22) -> Iterator[bytes]:
    with pa.input_stream(str(path), compression="detect") as stream:
        while chunk := stream.read(size):
            yield chunk


def _unclosed_quote(path: Path, chunk_size: int = 1 << 22) -> int | None:
    """The line where a never-closed quoted field opens, or None.

    pyarrow silently reads everything after an unclosed quote into one field.
    Well-formed CSV has an even number of quote characters, so only a file with
    an odd count (which may just hold a literal ``12" pizza`` in an unquoted
    field) is scanned, following pyarrow's rules: a quote opens a quoted field
    only at the start of a field; inside one, ``""`` is a literal quote.
    """
    if sum(chunk.count(b'"') for chunk in _chunks(path)) % 2 == 0:
        return None
    delimiter = _delimiter(path).encode()
    token = re.compile(b'["\n' + re.escape(delimiter) + b"]")
    quoted, line, opened, carry, field_start = False, 1, 0, b"", 0
    for chunk in [*_chunks(path, chunk_size), b""]:
        data = carry + chunk
        kept = len(data.rstrip(b'"')) if chunk else len(data)  # a '""' may straddle chunks
        data, carry, skip = data[:kept], data[kept:], -1
        for m in token.finditer(data):
            pos, tok = m.start(), m.group()
            if pos == skip:
                continue
            line += tok == b"\n"
            if quoted:
                if tok == b'"' and data[pos + 1 : pos + 2] == b'"':
                    skip = pos + 1  # an escaped quote
                elif tok == b'"':
                    quoted = False
            elif tok != b'"':
                field_start = pos + 1
            elif pos == field_start:
                quoted, opened = True, line
        field_start = 0 if field_start == len(data) else -1
    return opened if quoted else None


def _csv_batches(source: Source, batch_rows: int) -> Iterator[pa.RecordBatch]:
    names = source.schema.names
    if not names:
        return
    with reading(source.path, "CSV"):
        reader = pcsv.open_csv(source.path, **_csv_options(source.path, names))
        for batch in reader:
            for start in range(0, batch.num_rows, batch_rows):
                part = batch.slice(start, batch_rows)
                arrays = [part.column(i).view(pa.string()) for i in range(part.num_columns)]
                yield pa.RecordBatch.from_arrays(arrays, schema=source.schema)


# --- JSONL

_KINDS = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
_DECODER = json.JSONDecoder(strict=False)  # strict=False: raw tabs and NULs inside strings


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) for non-blank lines; BOM dropped; compressed files decoded."""
    with pa.input_stream(str(path), compression="detect") as stream:
        tail, number = b"", 0
        while True:
            chunk = stream.read(1 << 22)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop() if chunk else b""
            for line in lines:
                number += 1
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if line.strip():
                    yield number, line
            if not chunk:
                return


def _records(path: Path) -> Iterator[tuple[int, dict, int]]:
    """(line number, parsed JSON object, line bytes); a line that is no object is an IngestError."""
    with reading(path, "JSONL"):
        for number, line in _lines(path):
            # surrogateescape keeps invalid bytes as lone surrogates, flagged later like "\ud800".
            text = line.decode("utf-8", "surrogateescape")
            try:
                record = _DECODER.decode(text)
            except json.JSONDecodeError as exc:
                raise IngestError(
                    f"{path}: line {number}: not valid JSON ({exc.msg}); ingest reads JSON Lines, "
                    "one object per line"
                ) from exc
            if not isinstance(record, dict):
                kind = _KINDS.get(type(record), "array")
                raise IngestError(
                    f"{path}: line {number}: expected a JSON object, got a JSON {kind}"
                )
            yield number, record, len(line)


def _jsonl_source(path: Path) -> Source:
    """First pass: each column's kinds of values, in order of first appearance."""
    kinds: dict[str, set[str]] = {}
    first_line: dict[tuple[str, str], int] = {}
    shapes: set[tuple] = set()
    rows = 0
    for number, record, _ in _records(path):
        rows += 1
        shape = (tuple(record), tuple(map(type, record.values())))
        if shape in shapes:  # most lines repeat a shape already seen: skip them quickly
            continue
        if len(shapes) < 4096:
            shapes.add(shape)
        for key, value in record.items():
            kind = _KINDS.get(type(value), "object or array")
            seen = kinds.setdefault(key, set())
            if kind not in seen:
                seen.add(kind)
                first_line[key, kind] = number
    fields, json_columns = [], []
    for key, seen in kinds.items():
        values = seen - {"null"}
        if not values:
            tp = pa.null()
        elif values == {"string"}:
            tp = pa.string()
        elif values == {"integer"}:
            tp = pa.int64()
        elif values <= {"integer", "number"}:
            tp = pa.float64()
        elif values == {"boolean"}:
            tp = pa.bool_()
        else:  # mixed or nested values: keep each as JSON text (strings stay as they are)
            tp = pa.string()
            json_columns.append(key)
        fields.append(pa.field(key, tp))
    return Source(path, "jsonl", pa.schema(fields), rows, tuple(json_columns), first_line)


def _utf8_bytes(value: str) -> bytes:
    """Bytes of a str that may hold surrogates (from invalid bytes or "\\ud800" escapes)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")  # invalid UTF-8: ingest replaces it


def _strings(values: list) -> pa.Array:
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:
        raw = [None if v is None else _utf8_bytes(v) for v in values]
        return pa.array(raw, pa.binary()).view(pa.string())


def _jsonl_batch(rows: list[dict], source: Source) -> pa.RecordBatch:
    arrays = []
    for column in source.schema:
        values = [r.get(column.name) for r in rows]
        if column.name in source.json_columns:
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
        if pa.types.is_string(column.type):
            arrays.append(_strings(values))
        else:
            with reading(source.path, f"JSONL (column {column.name!r})"):
                arrays.append(pa.array(values, column.type))
    return pa.RecordBatch.from_arrays(arrays, schema=source.schema)


def _jsonl_batches(source: Source, batch_rows: int) -> Iterator[pa.RecordBatch]:
    rows: list[dict] = []
    size = 0
    for _, record, line_bytes in _records(source.path):
        rows.append(record)
        size += line_bytes
        if len(rows) == batch_rows or size >= BATCH_BYTES:
            yield _jsonl_batch(rows, source)
            rows, size = [], 0
    if rows:
        yield _jsonl_batch(rows, source)


# --- Text repair: one place for every format's invalid UTF-8

TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(), pa.null())


def is_text(tp: pa.DataType) -> bool:
    """Whether a column of this type can be read as text (binary is decoded as UTF-8)."""
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return tp in TEXT_TYPES


def as_string(arr: pa.Array) -> pa.Array:
    """A text-like column as ``string``, without validating its bytes yet."""
    tp = arr.type
    if pa.types.is_dictionary(tp):
        arr, tp = arr.dictionary_decode(), tp.value_type
    if pa.types.is_null(tp):
        return pa.nulls(len(arr), pa.string())
    if pa.types.is_large_string(tp):
        arr, tp = arr.view(pa.large_binary()), pa.large_binary()
    if pa.types.is_large_binary(tp):
        arr = arr.cast(pa.binary())  # binary → binary casts never look at the bytes
    return arr if pa.types.is_string(arr.type) else arr.view(pa.string())


def repair_utf8(arr: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """(valid strings, mask of rows that were not valid UTF-8 or None if all were).

    Invalid rows are decoded with U+FFFD replacement. Checking is one vectorised
    ``validate(full=True)``; only a batch that fails it is repaired row by row.
    """
    try:
        arr.validate(full=True)
        return arr, None
    except pa.ArrowInvalid:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary()
    values, bad = [], []
    for raw in arr.view(binary).to_pylist():
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            values.append(raw.decode("utf-8", "replace"))
            bad.append(True)
    return pa.array(values, arr.type), pa.array(bad, pa.bool_())
