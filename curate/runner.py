"""Run a recipe: stages in order, each resumable, on an engine (``curate.engine``).

The driver plans: it claims the run folder, checks the whole recipe against the
columns ingest will write, decides which finished stages it can trust, and hands
each stage's work to the engine. A stage's output goes to a temporary folder, is
renamed into place, then gets a ``_SUCCESS`` manifest (rows, params hash,
timings, its files); a re-run skips every stage whose manifest hash matches and
whose files are intact. The hash chains each stage's resolved parameters with
its upstream hash, so changing a parameter re-runs that stage and everything
after it.

A run may share finished stages with a base run (``base``, ``curate run --from``):
every leading stage the base finished with the same hash (same input, same
parameters upstream) is linked, not computed, and its folders (``stages/NN_name``,
``images/``, ``embeddings/`` …) are links into the base, which the run never writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from curate.core.layout import LEDGER, RECIPE, SUCCESS, count_rows, ledger_files, stage_folder
from curate.core.progress import Progress
from curate.core.recipe import Recipe, stage_params
from curate.core.runfolder import (
    RunFolderError,
    check_shared,
    claim,
    reading,
    refresh_links,
    remove_tree,
    run_folder_of,
    share,
    shared_links,
    unshare,
)
from curate.engine import Engine, Kind, open_engine
from curate.stages import MapStage, Stage, StageContext


@dataclass
class StageResult:
    name: str
    kind: str
    seconds: float
    rows_in: int
    rows_out: int
    skipped: bool
    counters: dict = field(default_factory=dict)
    rerun_reason: str | None = None  # why a stage that had finished ran again
    shared_from: str | None = None  # the base run whose finished stage this one is (--from)


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageResult]
    ledger_files: list[Path]
    finished: Any = None  # what run_recipe's ``finish`` returned


def _hash(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_fingerprint(path: Path) -> list:
    """What identifies the user's input: names, sizes and modification times."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [str(path)] + [
        (str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]


# --- the run -------------------------------------------------------------------------------


def read_manifest(stage_dir: Path) -> dict:
    """A finished stage's manifest; empty when the stage has not finished."""
    try:
        return json.loads((stage_dir / SUCCESS).read_text())
    except (OSError, ValueError):
        return {}


def _stage_outputs(stage: Stage, run_dir: Path, stage_dir: Path) -> list[Path]:
    """Every folder a stage writes: its own and those beside it (images/, embeddings/ …)."""
    return [stage_dir, *(run_dir / o for o in stage.outputs())]


def file_records(run_dir: Path, folders: list[Path]) -> dict[str, list[int]]:
    """What a stage's manifest records of its files: the size, and rows for Parquet, of
    every file in ``folders``, by path inside the run."""
    records = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUCCESS)
        for f in files:
            entry = [f.stat().st_size]
            if f.suffix == ".parquet":
                entry.append(pq.ParquetFile(f).metadata.num_rows)
            records[f.relative_to(run_dir).as_posix()] = entry
    return records


def _damaged(run_dir: Path, folders: list[Path], manifest: dict) -> list[tuple[str, str]]:
    """The files of a finished stage (``folders``: its own first) that are no longer those
    it wrote, each with why.

    Sizes first (a stat per file), Parquet row counts (a footer read) only for files
    whose size still matches: a truncated file is caught without being parsed.
    """
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        manifest_file = (folders[0] / SUCCESS).relative_to(run_dir).as_posix()
        return [(manifest_file, "does not list the stage's files")]
    present = {
        f.relative_to(run_dir).as_posix(): f
        for folder in folders
        for f in folder.rglob("*")
        if f.is_file() and f.name != SUCCESS
    }
    damaged = []
    for name in sorted(recorded.keys() | present.keys()):
        if name not in present:
            why = "is missing"
        elif name not in recorded:
            why = "appeared after the stage finished"
        else:
            why = _problem(present[name], recorded[name])
        if why:
            damaged.append((name, why))
    return damaged


def _problem(path: Path, record: list[int]) -> str | None:
    """Why ``path`` is not the file recorded as [size] or [size, Parquet rows]; None if it is."""
    size, *rows = record
    now = path.stat().st_size
    if now != size:
        return f"changed after the stage finished ({size:,} bytes, now {now:,})"
    if rows:
        try:
            now = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            return f"cannot be read ({exc})"
        if now != rows[0]:
            return f"changed after the stage finished ({rows[0]:,} rows, now {now:,})"
    return None


def _link_ledger(src: Path, dst: Path) -> list[Path]:
    """Expose the final ledger as ``run_dir/ledger`` (hard links: no copy of the data)."""
    tmp = dst.with_name(dst.name + ".tmp")
    remove_tree(tmp, dst.parent)
    tmp.mkdir(parents=True)
    for f in ledger_files(src):
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    remove_tree(dst, dst.parent)
    tmp.rename(dst)
    return ledger_files(dst)


def check_columns(stages: list[Stage], columns: set[str]) -> None:
    """Fail now if a later stage needs a column no earlier stage provides."""
    for stage in stages:
        columns = stage.columns_after(columns)


def _plan_digests(recipe: Recipe, input_path: Path) -> list[str]:
    """Each stage's hash: its resolved parameters chained to everything upstream of it."""
    digests, upstream = [], _hash("input", input_fingerprint(input_path))
    for stage in recipe.stages:
        upstream = _hash(upstream, stage_params(stage), recipe.seed)
        digests.append(upstream)
    return digests


def _say(text: str) -> None:
    print(f"curate: {text}", file=sys.stderr, flush=True)


def run_recipe(
    recipe: Recipe,
    input_path: Path,
    run_dir: Path,
    engine: Kind = "ray",
    address: str | None = None,
    verbose: bool = False,
    on_stage: Callable[[StageResult], None] | None = None,
    progress: bool | None = None,
    finish: Callable[[RunResult], Any] | None = None,
    base: Path | None = None,
) -> RunResult:
    """Run every stage of ``recipe`` on ``input_path`` into ``run_dir``, resuming where possible.

    ``base`` is a finished run whose stages this run shares where it would compute
    them the same way (see the module's docstring).

    ``finish`` (the run's report and uids.npy, for ``curate run``) runs as one engine
    task once the ledger is final, its result in ``RunResult.finished``: it reads the
    whole ledger, which is row work, not the driver's.

    The run folder is claimed first (``curate.core.runfolder``): created and marked, or
    refused when it holds someone else's files or another run is writing it.
    ``verbose`` shows Ray's logs and Ray Data's progress bars. ``progress`` draws one
    progress line per stage on stderr (``curate.core.progress``); None: when stderr is a
    terminal, or with ``verbose``. It is decided here once, so every stage agrees.
    """
    if progress is None:
        progress = verbose or sys.stderr.isatty()
    run_dir = Path(run_dir)
    if base is not None:
        base = _check_base(Path(base), run_dir)
    with claim(run_dir, "run", input_path), reading(_bases(run_dir, base)):
        return _run_claimed(recipe, Path(input_path), run_dir, engine, address, verbose,
                            on_stage, progress, finish, base)  # fmt: skip


def _check_base(base: Path, run_dir: Path) -> Path:
    """``--from``: a curate run folder other than this run."""
    if not base.is_dir() or run_folder_of(base) != base:
        raise RunFolderError(f"--from {base}: not a curate run folder")
    mine, theirs = run_dir.resolve(), base.resolve()
    if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
        raise RunFolderError(f"--from {base}: the run folder {run_dir} is it, or overlaps it")
    return base


def _bases(run_dir: Path, base: Path | None) -> list[Path]:
    """The runs whose folders this run reads: ``base``, and those it or the run link to
    (a base that is gone is reported later)."""
    runs = [base] if base is not None else []
    for run in [*runs, run_dir]:
        links = [run / name for name in shared_links(run)]
        runs += [run_folder_of(link.resolve()) for link in links if link.is_symlink()]
    mine = run_dir.resolve()
    return [r for r in runs if r is not None and r.resolve() != mine]


def _folders(stage: Stage, run_dir: Path, stage_dir: Path) -> list[str]:
    """A stage's folders (its own, then images/ …) by their names inside the run."""
    return [stage_dir.relative_to(run_dir).as_posix(), *stage.outputs()]


def _drop_stale_links(run_dir: Path, recipe: Recipe, stage_dirs: list, digests: list) -> None:
    """Unlink the shared folders of stages this recipe no longer computes the same way:
    they are computed here now. The base is left as it is."""
    wanted = {
        name: digest
        for stage, stage_dir, digest in zip(recipe.stages, stage_dirs, digests)
        for name in _folders(stage, run_dir, stage_dir)
    }
    for name, link in shared_links(run_dir).items():
        if wanted.get(name) != link["hash"]:
            unshare(run_dir, name)


def _share(base: Path, recipe: Recipe, run_dir: Path, stage_dirs: list, digests: list,
           done: list[bool], manifests: list[dict]) -> list[str]:  # fmt: skip
    """Link the leading stages ``base`` finished with this run's hashes, where this run has
    not finished them itself; mark them done. The names of the stages shared."""
    names = []
    for i, stage in enumerate(recipe.stages):
        if i and not done[i - 1]:
            break
        if done[i]:
            continue
        theirs = stage_folder(base, i, stage.name, stage.folder)
        manifest = read_manifest(theirs)
        if manifest.get("hash") != digests[i]:
            break
        targets = [theirs, *(base / o for o in stage.outputs())]
        for name, target in zip(_folders(stage, run_dir, stage_dirs[i]), targets):
            share(run_dir, name, target, digests[i])
        manifests[i], done[i] = manifest, True
        names.append(stage.name)
    return names


def _base_changed(stage: Stage, link: dict, why: str) -> RunFolderError:
    return RunFolderError(
        f"stage {stage.name} is shared with the base run {link['base']}, whose {why}: this "
        "run still needs it as it was. Re-run the base with the recipe it had, or delete "
        "this run and run its recipe again (with --from to share what still matches)"
    )


def _run_claimed(
    recipe: Recipe,
    input_path: Path,
    run_dir: Path,
    engine: Kind,
    address: str | None,
    verbose: bool,
    on_stage: Callable[[StageResult], None] | None,
    progress: bool,
    finish: Callable[[RunResult], Any] | None,
    base: Path | None,
) -> RunResult:
    (run_dir / RECIPE).write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
    digests = _plan_digests(recipe, input_path)
    stage_dirs = [stage_folder(run_dir, i, s.name, s.folder) for i, s in enumerate(recipe.stages)]
    own = [d.relative_to(run_dir).as_posix() for d in stage_dirs]  # names of stage folders
    refresh_links(run_dir)
    _drop_stale_links(run_dir, recipe, stage_dirs, digests)
    check_shared(run_dir)
    manifests = [read_manifest(d) for d in stage_dirs]
    done = [m.get("hash") == h for m, h in zip(manifests, digests)]
    linked = shared_links(run_dir)
    for stage, name, ok in zip(recipe.stages, own, done):
        if name in linked and not ok:  # the link is this recipe's, the folder is not
            raise _base_changed(stage, linked[name], f"{name} was run again since")
    # A stage that re-runs invalidates everything after it, whatever is on disk.
    for i in range(1, len(done)):
        done[i] = done[i] and done[i - 1]
    if base is not None:
        if not _share(base, recipe, run_dir, stage_dirs, digests, done, manifests):
            _say(f"--from {base}: no finished stage of it matches this recipe and input")
        linked = shared_links(run_dir)
    # A finished stage is trusted only while its files are those it wrote. Damaged files
    # beside its own folder (images/ …) are removed, so the stage makes them again.
    reasons: list[str | None] = [None] * len(done)
    for i, (stage, stage_dir) in enumerate(zip(recipe.stages, stage_dirs)):
        if not done[i]:
            break
        damaged = _damaged(run_dir, _stage_outputs(stage, run_dir, stage_dir), manifests[i])
        if damaged:
            (name, why), more = damaged[0], len(damaged) - 1
            reasons[i] = f"{name} {why}" + (f" (and {more} more files)" if more else "")
            if own[i] in linked:  # never repaired from here
                raise _base_changed(stage, linked[own[i]], f"file {reasons[i]}")
            _say(f"stage {stage.name}: {reasons[i]}; running it again from its input")
            for name, _ in damaged:
                if not (run_dir / name).is_relative_to(stage_dir):
                    remove_tree(run_dir / name, run_dir)
            done[i:] = [False] * (len(done) - i)
            break
    for stage, skip in zip(recipe.stages, done):
        if not skip:
            stage.preflight()

    def context(
        i: int, files: list[Path], schema: pa.Schema | None, on: Engine | None
    ) -> StageContext:
        return StageContext(
            run_dir=run_dir,
            out_dir=stage_dirs[i].with_name(stage_dirs[i].name + ".tmp"),
            input_files=files,
            input_schema=schema,
            seed=recipe.seed,
            input_path=input_path,
            verbose=verbose,
            progress=progress,
            engine=on,
            ingest_dir=stage_dirs[0],
        )

    needs_ray = engine == "ray" and not all(done)  # nothing to run: no cluster to start
    # Every later stage's columns are checked against what ingest will write before any
    # stage runs: a bad recipe fails in seconds, not after the download.
    first = context(0, [], None, None)  # its engine is set once it is started, below
    if done[0]:
        files = ledger_files(stage_dirs[0])
        check_columns(recipe.stages[1:], set(pq.read_schema(files[0]).names) if files else set())
    else:
        first.plan = recipe.stages[0].plan(first)
        check_columns(recipe.stages[1:], set(first.plan.schema.names))
    first.engine = engine = open_engine("ray" if needs_ray else "local", address, verbose)

    files: list[Path] = []
    schema: pa.Schema | None = None
    ledger_dir: Path | None = None
    results: list[StageResult] = []
    try:
        for i, (stage, stage_dir, digest, skip, m) in enumerate(
            zip(recipe.stages, stage_dirs, digests, done, manifests)
        ):
            if skip:
                result = StageResult(
                    stage.name,
                    stage.kind,
                    m["seconds"],
                    m["rows_in"],
                    m["rows_out"],
                    skipped=True,
                    counters=m.get("counters", {}),
                    shared_from=linked.get(own[i], {}).get("base"),
                )
            else:
                ctx = first if i == 0 else context(i, files, schema, engine)
                result = _run_stage(stage, ctx, stage_dir, digest)
                result.rerun_reason = reasons[i]
            results.append(result)
            if on_stage:
                on_stage(result)
            if stage.produces_ledger:
                ledger_dir = stage_dir
                files = ledger_files(stage_dir)
                schema = pq.read_schema(files[0]) if files else None
        final = _link_ledger(ledger_dir, run_dir / LEDGER) if ledger_dir else []
        run = RunResult(run_dir, results, final)
        if finish is not None:  # one more task: its work grows with the pool too
            (run.finished,) = engine.map_items(finish, [run], "finish")
    finally:
        engine.close()
    return run


def _run_stage(stage: Stage, ctx: StageContext, stage_dir: Path, digest: str) -> StageResult:
    """Run one stage into a temporary folder, then move it into place and mark it done."""
    remove_tree(stage_dir, ctx.run_dir)
    remove_tree(ctx.out_dir, ctx.run_dir)
    ctx.out_dir.mkdir(parents=True)
    start = time.perf_counter()
    placed = ctx.engine.tasks_per_node()
    rows_in = count_rows(ctx.input_files)
    stage.output_dir = ctx.out_dir
    if ctx.plan is None:  # ingest is planned before any stage runs, to check the columns
        ctx.plan = stage.plan(ctx)
    if isinstance(stage, MapStage):
        with Progress(stage.name, rows_in, enabled=ctx.progress) as shown:
            ctx.engine.map_files(stage, ctx.input_files, ctx.out_dir, shown)
        rows_out = count_rows(ledger_files(ctx.out_dir))
        if rows_out != rows_in:
            raise RuntimeError(
                f"stage {stage.name} turned {rows_in} rows into {rows_out}: stages must not "
                "add or delete ledger rows"
            )
    else:
        ctx.engine.wait_ready()
        rows_out = stage.run(ctx)
    seconds = time.perf_counter() - start
    ctx.out_dir.rename(stage_dir)
    manifest = {
        "stage": stage.name,
        "kind": stage.kind,
        "hash": digest,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "seconds": round(seconds, 3),
        "engine": ctx.engine.name,
        "params": stage_params(stage),
        "counters": ctx.counters,
        "tasks_per_node": _since(placed, ctx.engine.tasks_per_node()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": file_records(ctx.run_dir, _stage_outputs(stage, ctx.run_dir, stage_dir)),
    }
    (stage_dir / SUCCESS).write_text(json.dumps(manifest, indent=2, default=str))
    return StageResult(stage.name, stage.kind, seconds, rows_in, rows_out, False, ctx.counters)


def _since(before: dict[str, int], now: dict[str, int]) -> dict[str, int]:
    """Tasks per node between two counts: where one stage's work ran."""
    return {node: n - before.get(node, 0) for node, n in now.items() if n > before.get(node, 0)}
