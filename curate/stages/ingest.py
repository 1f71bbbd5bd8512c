"""The ingest stage: url lists (Parquet, CSV, JSONL, DataComp metadata) → the ledger.

Ingest is where untrusted input becomes the ledger every later stage trusts,
so it refuses loudly what no later stage could explain — a missing or
non-text url/caption column, malformed or duplicate uids, unreadable files,
sizes that do not fit the ledger's int32 — and repairs only what a filter can
later drop with a reason: a caption that is not valid UTF-8 is decoded with
U+FFFD and flagged in ``caption_error``, an unreadable url becomes null (the
download stage drops it). Every row is kept (``keep`` true, ``dropped_by`` null).

It streams: files are read in sorted order, batch by batch, and written as
``part-NNNNN.parquet`` of at most ``rows_per_file`` rows, so memory is bounded
by a batch, not the pool (plus 8 bytes a row for the uid check, see
``curate.io.uids``: uid uniqueness is global, so it is checked exactly at the end).
Row numbers in error messages count a file's data rows from 0.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError, Count
from curate.core.progress import FinishedRows, Progress
from curate.core.runfolder import scratch
from curate.core.schema import LEDGER_SCHEMA, ledger_type, uids_for
from curate.core.stage import Stage, StageContext, register_stage
from curate.io import datacomp
from curate.io.readers import (
    IngestError,
    Source,
    as_string,
    check_unique_names,
    format_of,
    is_text,
    iter_batches,
    open_source,
    reading,
    repair_utf8,
)
from curate.io.submission import UidSet, open_pairs
from curate.io.uids import normalise_uids, uid_keys

__all__ = ["IngestError", "IngestStage"]

RESERVED = ("keep", "dropped_by", "caption_error")  # decisions only the pipeline may write
BATCH_ROWS = 1 << 16
#: The duplicate-uid check reads one partition (of the uids' hash) per task.
MAX_UID_PARTITIONS = 256
UID_PLACES = pa.schema([("uid", pa.string()), ("source", pa.int32()), ("row", pa.int64())])
FORMATS = ("auto", "parquet", "csv", "jsonl", "datacomp")
COMPRESSIONS = ("none", "snappy", "zstd")


@dataclass
class IngestPlan:
    """What ingest will read and write, fixed before the first row is written."""

    format: str
    sources: list[Source]
    url: str
    caption: str
    uid: str | None  # None: computed from (url, caption)
    schema: pa.Schema  # of the ledger parts: core columns, pass-through columns, decisions
    passthrough: list[pa.Field]  # the other input columns, typed once for all files
    npz: list[dict] = field(default_factory=list)  # DataComp: one manifest entry per source
    subset: str | None = None  # a DataComp uid file the run is restricted to
    subset_size: int = 0  # how many uids it lists


@register_stage("ingest")
@dataclass
class IngestStage(Stage):
    """Read ``ctx.input_path`` (a file or a folder of files) into ledger parts."""

    format: Literal["auto", "parquet", "csv", "jsonl", "datacomp"] = "auto"
    url_column: str = "url"
    caption_column: str | None = None  # None: "caption" if the input has it, else "text"
    uid_column: str | None = None  # None: "uid" if the input has it, else computed
    rows_per_file: Count = 100_000
    # Of the ledger parts. "none" costs no CPU; snappy or zstd trade some for smaller parts.
    compression: Literal["none", "snappy", "zstd"] = "none"
    # A DataComp uid file (``curate run --input-uids``): rows whose uid it does not list are
    # dropped here, with dropped_by "input_uids".
    uids: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"compression: {self.compression!r} is not one of {', '.join(COMPRESSIONS)}"
            )
        for name in ("url_column", "caption_column", "uid_column"):
            if getattr(self, name) == "":
                raise ConfigError(f"{name}: must not be empty")

    def plan(self, ctx: StageContext) -> IngestPlan:
        """Find the input files and check their columns before anything is written."""
        if ctx.input_path is None:
            raise IngestError("ingest needs an input path (a file or a folder of files)")
        return self._make_plan(Path(ctx.input_path))

    def run(self, ctx: StageContext) -> int:
        plan: IngestPlan = ctx.plan
        started = time.perf_counter()
        out = Path(ctx.out_dir)
        jobs = _jobs(plan, self.rows_per_file, self.compression, out)
        known = [src.rows for src in plan.sources]  # CSV and JSONL: rows unknown until read
        total = sum(known) if None not in known else None
        label = self.name
        with Progress(label, total, enabled=ctx.progress) as shown, scratch(out, "_uids-") as tmp:
            for job in jobs:
                job.uids = tmp
            with shown.poll(FinishedRows(out, "part-*.parquet")):
                done = ctx.engine.map_items(_ingest_piece, jobs, f"{label}: read")
            partitions = sorted(tmp.iterdir())
            found = ctx.engine.map_items(_duplicates_in, partitions, f"{label}: uids")
        repeated = sum(n for n, _ in found)
        if repeated:
            shown_uids = sorted((u for _, some in found for u in some), key=lambda u: u[0])[:3]
            raise duplicate_error(plan, repeated, shown_uids)
        rows = sum(d["rows"] for d in done)
        if not rows:  # an input with no rows still gets one (empty) part: the ledger's schema
            pq.write_table(plan.schema.empty_table(), out / "part-00000-00000-000.parquet")
        if plan.format == "datacomp":
            per_source = [0] * len(plan.sources)
            for job, d in zip(jobs, done):
                per_source[job.index] += d["rows"]
            first_rows = np.concatenate([[0], np.cumsum(per_source)[:-1]]).tolist()
            datacomp.write_manifest(out, plan.npz, first_rows)
        outside = sum(d["outside"] for d in done)
        ctx.counters.update(
            rows=rows,
            input_files=len(plan.sources),
            format=plan.format,
            uids="input" if plan.uid else "computed",
            invalid_utf8_captions=sum(d["caption_errors"] for d in done),
            **self._subset_counters(plan, rows, outside),
            seconds=round(time.perf_counter() - started, 3),
        )
        return rows

    def _subset_counters(self, plan: IngestPlan, rows: int, outside: int) -> dict:
        if plan.subset is None:
            return {}
        inside = rows - outside
        return {"outside_input_uids": outside, "input_uids_not_in_pool": plan.subset_size - inside}

    # --- planning

    def _make_plan(self, path: Path) -> IngestPlan:
        files, fmt = discover(path, self.format)
        sources = [open_source(f, "parquet" if fmt == "datacomp" else fmt) for f in files]
        named = [s for s in sources if s.schema.names]  # empty CSV/JSONL files have no columns
        present = set().union(*(s.schema.names for s in named))
        caption = self.caption_column or ("caption" if "caption" in present else "text")
        uid = self.uid_column or ("uid" if "uid" in present else None)
        for source in named:
            _check_columns(source, self.url_column, caption, uid)
        passthrough = _passthrough(named, {self.url_column, caption, uid})
        schema = pa.schema(
            [LEDGER_SCHEMA.field(n) for n in ("uid", "url", "caption", "caption_error")]
            + passthrough
            + [LEDGER_SCHEMA.field(n) for n in ("keep", "dropped_by")]
        )
        npz = [datacomp.npz_entry(s.path, s.rows) for s in sources] if fmt == "datacomp" else []
        size = 0 if self.uids is None else len(open_pairs(Path(self.uids)))
        return IngestPlan(
            fmt, sources, self.url_column, caption, uid, schema, passthrough, npz, self.uids, size
        )


def discover(path: Path, fmt: str) -> tuple[list[Path], str]:
    """The input files in sorted order and their format (DataComp: parquets with .npz beside)."""
    if path.is_file():
        found = format_of(path) if fmt == "auto" else fmt
        if found is None:
            raise IngestError(f"{path}: cannot tell the format from the extension; set format")
        if fmt == "auto" and found == "parquet" and datacomp.npz_for(path).is_file():
            found = "datacomp"
        return [path], found
    if not path.is_dir():
        raise IngestError(f"{path}: no such file or folder")
    by_format: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        if p.is_file() and not p.name.startswith((".", "_")) and format_of(p):
            by_format.setdefault(format_of(p), []).append(p)
    if fmt == "auto":
        if len(by_format) > 1:
            kinds = ", ".join(sorted(by_format))
            raise IngestError(f"{path}: the folder mixes formats ({kinds}); set format to pick one")
        fmt = next(iter(by_format), "auto")
        if fmt == "parquet" and any(datacomp.npz_for(p).is_file() for p in by_format[fmt]):
            fmt = "datacomp"
    files = by_format.get("parquet" if fmt == "datacomp" else fmt, [])
    if not files:
        wanted = "input" if fmt == "auto" else fmt
        raise IngestError(f"{path}: the folder has no {wanted} files (.parquet, .csv, .jsonl …)")
    return files, fmt


def _type_problem(source: Source, name: str) -> str | None:
    """Why column ``name`` cannot be read as text, or None if it can."""
    lines = {k: n for (c, k), n in source.first_line.items() if c == name}  # JSONL only
    others = sorted((n, k) for k, n in lines.items() if k not in ("string", "null"))
    if others:
        line, kind = others[0]
        return f"line {line} holds a JSON {kind}, not a string"
    tp = source.schema.field(name).type
    return None if is_text(tp) else f"it has type {tp}, not string"


def _check_columns(source: Source, url: str, caption: str, uid: str | None) -> None:
    path, names = source.path, source.schema.names
    check_unique_names(path, names)
    for name in RESERVED:
        if name in names:
            raise IngestError(f"{path}: column {name!r} is reserved for the ledger; rename it")
    for role, name in (("url", url), ("caption", caption), ("uid", uid)):
        if name is None:
            continue
        if name not in names:
            raise IngestError(
                f"{path}: no {role} column {name!r} (the file has: {', '.join(names)}); "
                f"set {role}_column"
            )
        if role != name and role in names:
            raise IngestError(
                f"{path}: has a {role!r} column and also {role}_column {name!r}; rename one"
            )
        problem = _type_problem(source, name)
        if problem:
            raise IngestError(f"{path}: {role} column {name!r} must hold text: {problem}")


def _passthrough(sources: list[Source], core: set) -> list[pa.Field]:
    """Every other input column, typed once for all files (ledger columns: the ledger type)."""
    types: dict[str, tuple[pa.DataType, Path]] = {}
    for source in sources:
        for f in source.schema:
            if f.name in core:
                continue
            tp = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            if f.name in LEDGER_SCHEMA.names:
                tp = ledger_type(f.name)
            old, where = types.get(f.name, (pa.null(), source.path))
            if old != tp and not pa.types.is_null(tp) and not pa.types.is_null(old):
                try:
                    a, b = pa.schema([(f.name, old)]), pa.schema([(f.name, tp)])
                    tp = pa.unify_schemas([a, b], promote_options="permissive").field(0).type
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise IngestError(
                        f"{source.path}: column {f.name!r} has type {tp}, but {old} in {where}"
                    ) from exc
            types[f.name] = (old if pa.types.is_null(tp) else tp, where)
    return [pa.field(name, tp) for name, (tp, _) in types.items()]


# --- per batch


def _to_ledger(
    batch: pa.RecordBatch, source: Source, plan: IngestPlan, row0: int
) -> tuple[pa.RecordBatch, int]:
    """One input batch as ledger columns, and how many captions were not valid UTF-8."""
    n = batch.num_rows
    names = batch.schema.names
    url, bad_url = repair_utf8(as_string(batch.column(plan.url)))
    if bad_url is not None:  # an unreadable url is no url: download drops it with a reason
        url = pc.if_else(bad_url, pa.scalar(None, pa.string()), url)
    caption, bad = repair_utf8(as_string(batch.column(plan.caption)))
    caption_error = pa.nulls(n, pa.string())
    if bad is not None:
        caption_error = pc.if_else(bad, "invalid utf-8", caption_error)
    if plan.uid:
        uid = normalise_uids(batch.column(plan.uid), source.path, row0)
    else:
        uid = uids_for(url, caption)
    arrays = [uid, url, caption, caption_error]
    for f in plan.passthrough:
        if f.name not in names:
            arrays.append(pa.nulls(n, f.type))
            continue
        values = batch.column(f.name)
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            values, _ = repair_utf8(values)  # pass-through text: repaired, not flagged
        arrays.append(values if values.type == f.type else _cast(values, f, source.path, row0))
    if plan.subset is None:
        arrays += [pa.array(np.ones(n, dtype=bool)), pa.nulls(n, pa.string())]
    else:
        keep = _subset(plan.subset).contains(uid)
        arrays += [pa.array(keep), pc.if_else(pa.array(keep), None, "input_uids")]
    errors = 0 if bad is None else pc.sum(bad).as_py()
    return pa.RecordBatch.from_arrays(arrays, schema=plan.schema), errors


def _cast(values: pa.Array, f: pa.Field, path: Path, row0: int) -> pa.Array:
    """Cast to the ledger/unified type; on failure name the first row that does not convert."""
    if pa.types.is_floating(values.type) and pa.types.is_integer(f.type):
        # pandas writes an integer column with gaps as floats, the gaps as NaN: unknown.
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
    try:
        return values.cast(f.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        lo, hi = 0, len(values)  # bisect: values[lo:hi] holds the first failing row
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                values.slice(lo, mid - lo).cast(f.type)
                lo = mid
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                hi = mid
        value = values[lo].as_py()
        raise IngestError(
            f"{path}: row {row0 + lo}: column {f.name!r}: {value!r} does not fit {f.type} "
            f"({str(exc).splitlines()[0]})"
        ) from exc


# --- the work of one task: a piece of an input file


@dataclass
class PieceJob:
    """One task's share of the input: row groups ``groups`` of a Parquet file (all of a CSV
    or JSONL file: None), written as ``part-SSSSS-PPPPP-KKK.parquet``, in input order."""

    plan: IngestPlan  # without its list of sources: a task needs its own only
    source: Source
    index: int  # the source's index in the input
    piece: int  # the piece's index among the source's pieces
    groups: list[int] | None
    row0: int  # the piece's first row in its file (error messages count from it)
    rows_per_file: int
    compression: str
    out: Path
    uids: Path | None = None  # where each uid goes, into one of ``partitions`` folders
    partitions: int = 1


def _jobs(plan: IngestPlan, rows_per_file: int, compression: str, out: Path) -> list[PieceJob]:
    """Pieces of about ``rows_per_file`` rows: whole row groups of Parquet files, whole
    CSV and JSONL files (their rows are only known by reading them)."""
    shared = dataclasses.replace(plan, sources=[], npz=[])
    pieces: list[tuple[int, list[int] | None, int]] = []  # (source, row groups, first row)
    for s, source in enumerate(plan.sources):
        if source.format != "parquet":
            pieces.append((s, None, 0))
            continue
        with reading(source.path, "Parquet"), pq.ParquetFile(source.path) as pf:
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        groups, rows, row0 = [], 0, 0
        for g, size in enumerate(sizes):
            if groups and rows + size > rows_per_file:
                pieces.append((s, groups, row0))
                groups, row0, rows = [], row0 + rows, 0
            groups.append(g)
            rows += size
        if groups or not sizes:
            pieces.append((s, groups, row0))
    partitions = uid_partitions(len(pieces))
    jobs, count = [], {}
    for s, groups, row0 in pieces:
        count[s] = count.get(s, -1) + 1
        jobs.append(PieceJob(shared, plan.sources[s], s, count[s], groups, row0, rows_per_file,
                             compression, out, partitions=partitions))  # fmt: skip
    return jobs


def uid_partitions(pieces: int) -> int:
    """How many partitions the uids are checked in: about one per piece, at most 256."""
    return max(1, min(MAX_UID_PARTITIONS, pieces))


def _ingest_piece(job: PieceJob) -> dict:
    """Read, check, uid-hash and write one piece; send its uids to their partitions."""
    plan, source = job.plan, job.source
    name = f"part-{job.index:05d}-{job.piece:05d}"
    writer = PartWriter(job.out, plan.schema, job.rows_per_file, job.compression, name)
    uids = _UidPartitions(job.uids, job.partitions, name)
    done = {"rows": 0, "caption_errors": 0, "outside": 0}
    try:
        for batch in iter_batches(source, BATCH_ROWS, job.groups):
            row0 = job.row0 + done["rows"]
            out, bad = _to_ledger(batch, source, plan, row0)
            done["outside"] += out.num_rows - int(pc.sum(out.column("keep")).as_py() or 0)
            done["caption_errors"] += bad
            uids.add(out.column(0), job.index, row0)
            writer.write(out)
            done["rows"] += batch.num_rows
    finally:
        writer.close()
        uids.close()
    return done


class _UidPartitions:
    """Each uid, with its file and row, to the partition of its hash: the duplicate check
    then reads one partition at a time, wherever its uids came from."""

    def __init__(self, folder: Path | None, partitions: int, name: str):
        self.folder, self.partitions, self.name = folder, partitions, name
        self._writers: dict[int, pq.ParquetWriter] = {}

    def add(self, uids: pa.Array, source: int, row0: int) -> None:
        if self.folder is None or not len(uids):
            return
        partition = uid_keys(uids) % np.uint64(self.partitions)
        rows = np.arange(row0, row0 + len(uids), dtype=np.int64)
        for p in np.unique(partition).tolist():
            at = np.flatnonzero(partition == p)
            places = [uids.take(pa.array(at)), pa.array(np.full(len(at), source, np.int32)),
                      pa.array(rows[at])]  # fmt: skip
            self._writer(p).write_table(pa.Table.from_arrays(places, schema=UID_PLACES))

    def _writer(self, p: int) -> pq.ParquetWriter:
        if p not in self._writers:
            folder = self.folder / f"p-{p:04d}"
            folder.mkdir(exist_ok=True)
            self._writers[p] = pq.ParquetWriter(folder / f"{self.name}.parquet", UID_PLACES)
        return self._writers[p]

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def _duplicates_in(folder: Path) -> tuple[int, list[tuple[str, list[tuple[int, int]]]]]:
    """How many uids of one partition occur more than once, and the three smallest with
    their places (source, row)."""
    table = pq.read_table(folder, schema=UID_PLACES)
    counts = table.group_by("uid").aggregate([("row", "count")])
    shown = sorted(counts.filter(pc.greater(counts["row_count"], 1))["uid"].to_pylist())
    places = table.filter(pc.is_in(table["uid"], value_set=pa.array(shown[:3], pa.string())))
    rows = places.sort_by([("uid", "ascending"), ("source", "ascending"), ("row", "ascending")])
    listed = [(u, [(r["source"], r["row"]) for r in rows.to_pylist() if r["uid"] == u])
              for u in shown[:3]]  # fmt: skip
    return len(shown), listed


class PartWriter:
    """Writes ``NAME-000.parquet``, ``NAME-001.parquet``, … of at most ``rows_per_file`` rows."""

    def __init__(
        self,
        out_dir: Path,
        schema: pa.Schema,
        rows_per_file: int,
        compression: str = "none",
        name: str = "part",
    ):
        self.out_dir, self.schema, self.rows_per_file = out_dir, schema, rows_per_file
        self.name = name
        self.files: list[Path] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0
        # Measured on a 10^6-row DataComp pool: dictionary encoding, string min/max
        # statistics and compressing random hex (uid, sha256: incompressible) were each
        # a large share of ingest time and bought nothing for near-unique columns.
        self._options = {
            "use_dictionary": False,
            "write_statistics": [f.name for f in schema if not pa.types.is_string(f.type)],
            "compression": {
                n: "none" if n in ("uid", "sha256") else compression for n in schema.names
            },
        }

    def _open(self) -> None:
        self.files.append(self.out_dir / f"{self.name}-{len(self.files):03d}.parquet")
        self._writer = pq.ParquetWriter(self.files[-1], self.schema, **self._options)
        self._in_file = 0

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None:
                self._open()
            take = min(batch.num_rows, self.rows_per_file - self._in_file)
            self._writer.write_batch(batch.slice(0, take))
            self._in_file += take
            self.rows += take
            batch = batch.slice(take)
            if self._in_file == self.rows_per_file:
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def duplicate_error(
    plan: IngestPlan, repeated: int, shown: list[tuple[str, list[tuple[int, int]]]]
) -> IngestError:
    """Name each shown duplicate uid with the input files and rows it comes from."""
    described = []
    for uid, places in shown:
        where = [f"{plan.sources[s].path} row {row}" for s, row in places[:3]]
        more = f" and {len(places) - 3} more rows" if len(places) > 3 else ""
        described.append(f"{uid} at {', '.join(where)}{more}")
    hint = ""
    if plan.uid is None:
        hint = (
            " (uids are computed from url and caption, so the same (url, caption) pair occurs "
            "more than once: drop the repeats or give the input a uid column)"
        )
    return IngestError(
        f"duplicate uids: {repeated} uid(s) occur more than once: {'; '.join(described)}{hint}"
    )


@functools.lru_cache(maxsize=1)
def _subset(path: str) -> UidSet:
    """The uid file a run is restricted to, loaded once per worker process."""
    return UidSet.load(Path(path))
