"""Throughput of concept matching (MetaCLIP's substring rule) and of the balance stage.

    python benchmarks/bench_balance.py [--rows 1000000] [--workdir /tmp/curate-bench-balance]

1. Writes ``--rows`` synthetic web captions in 10 ledger files of equal size:
   ``benchmarks/pool.py``'s alt-text (half English, eight other languages,
   boilerplate, repeated stock captions), where 20 % of the English captions get
   one of the ImageNet class names (``imagenet1k``, 1,003 entries) before, after
   or amid a comma, in its own case, lower case or capitalised. Seeded: the same
   captions every time.
2. Times ``Matcher.match`` (the whole per-caption work of the balance stage and
   the concept_match filter), in this process, over each file's captions
   (reading excluded), case-sensitive as MetaCLIP and lower-cased as the
   DataComp-style filter: captions/s on one core.
3. Times the same per file in a ``multiprocessing`` pool of ``--workers``
   processes (default 2), each reading its file and matching it, from the
   first task submitted to the last result (workers started and their
   automatons built beforehand): captions/s on that many cores.
4. Times the balance stage in this process, once: ``plan`` (match and count the
   pool, decide once for the counts file) and ``__call__`` on every file, with
   t = 20,000 (reading the files included).
5. Writes ``benchmarks/results/bench_balance.json``, prints a markdown table.

Each measurement runs ``--repeat`` times (default 3); the fastest is reported
with every time and the CPU seconds other processes used meanwhile (this is
often a shared machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_filters import busy_cpu_seconds, curate_version, machine, tree  # noqa: E402
from pool import pool_table  # noqa: E402

from curate.core.stage import StageContext  # noqa: E402
from curate.engine.local import LocalEngine  # noqa: E402
from curate.stages.balance import BalanceStage  # noqa: E402
from curate.text.concepts import Matcher, load_concepts  # noqa: E402

FILES = 10
CONCEPTS = "imagenet1k"
NAMED_SHARE = 0.2  # of the English captions, given a class name
T = 20_000


# --- the captions ------------------------------------------------------------------------


def captions_with_names(rows: int, seed: int = 0) -> pa.Table:
    """A ledger (uid, caption, caption_error, keep, dropped_by) of web alt-text, some naming
    an ImageNet class."""
    table, category = pool_table(rows, seed)
    rng = np.random.default_rng(seed + 1)
    names = pa.array(load_concepts(CONCEPTS))
    picked = names.take(pa.array(rng.integers(0, len(names), rows)))
    case = rng.integers(0, 3, rows)  # as listed, lower-cased, capitalised
    picked = pc.if_else(pa.array(case == 1), pc.utf8_lower(picked), picked)
    picked = pc.if_else(pa.array(case == 2), pc.utf8_capitalize(picked), picked)
    text = table["text"].combine_chunks()
    where = rng.integers(0, 3, rows)
    variants = [
        pc.binary_join_element_wise(picked, text, " "),  # "Beagle puppy for sale"
        pc.binary_join_element_wise(text, picked, " "),  # "… by the lake tench"
        pc.binary_join_element_wise(text, picked, ", "),  # "…, great white shark"
    ]
    named = text
    for i, variant in enumerate(variants):
        named = pc.if_else(pa.array(where == i), variant, named)
    chosen = (category == "en") & (rng.random(rows) < NAMED_SHARE)
    caption = pc.if_else(pa.array(chosen), named, text)
    return pa.table(
        {
            "uid": table["uid"],
            "caption": caption,
            "caption_error": pa.nulls(rows, pa.string()),
            "keep": pa.array(np.ones(rows, bool)),
            "dropped_by": pa.nulls(rows, pa.string()),
        }
    )


def write_ledger(folder: Path, rows: int) -> list[Path]:
    folder.mkdir(parents=True)
    table = captions_with_names(rows)
    bounds = np.linspace(0, rows, FILES + 1).astype(int)
    files = []
    for i in range(FILES):
        files.append(folder / f"part-{i:05d}.parquet")
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), files[-1])
    return files


# --- timing ------------------------------------------------------------------------------


def timed(fn, repeat: int) -> dict:
    """Fastest wall time of ``fn()`` over ``repeat`` runs, every time, and the CPU seconds
    processes other than this one and its children (the pool's workers) used meanwhile."""
    seconds, others, result = [], [], None
    for _ in range(repeat):
        busy, ours, start = busy_cpu_seconds(), tree(os.getpid()), time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        after = tree(os.getpid())
        used = sum(cpu - ours.get(pid, 0.0) for pid, cpu in after.items())
        others.append(round(max(0.0, busy_cpu_seconds() - busy - used), 2))
    return {
        "seconds": min(seconds),
        "all_seconds": seconds,
        "other_cpu_seconds": others,
        "result": result,
    }


def match_in_process(captions: list[pa.ChunkedArray], matcher: Matcher) -> int:
    """Rows naming at least one concept."""
    matched = 0
    for column in captions:
        offsets, _ = matcher.match(column)
        matched += int(np.count_nonzero(np.diff(offsets)))
    return matched


_worker_matcher: Matcher | None = None


def _start_worker(lowercase: bool) -> None:
    global _worker_matcher
    _worker_matcher = Matcher(load_concepts(CONCEPTS), lowercase)
    _worker_matcher.match(pa.array(["warm up the automaton"]))


def _match_file(path: str) -> int:
    offsets, _ = _worker_matcher.match(pq.read_table(path, columns=["caption"])["caption"])
    return int(np.count_nonzero(np.diff(offsets)))


def match_in_pool(files: list[Path], workers: int, repeat: int) -> dict:
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers, initializer=_start_worker, initargs=(False,)) as pool:
        pool.map(_match_file, [str(files[0])] * workers)  # every worker up and warm
        return timed(lambda: sum(pool.map(_match_file, [str(f) for f in files], 1)), repeat)


def balance_in_process(files: list[Path], work: Path) -> dict:
    """``plan`` then ``__call__`` on every file, as the local engine runs the stage."""
    stage = BalanceStage(concepts=CONCEPTS, t=T)
    stage.name = "balance"
    out = work / "stage"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctx = StageContext(work, out, files, pq.read_schema(files[0]), engine=LocalEngine())
    stage.output_dir = out
    start = time.perf_counter()
    stage.plan(ctx)
    stage.setup()
    planned = time.perf_counter()
    kept = sum(pc.sum(stage(pq.read_table(f))["keep"]).as_py() for f in files)
    return {
        "plan_seconds": planned - start,
        "apply_seconds": time.perf_counter() - planned,
        "rows_kept": kept,
        "counters": ctx.counters,
    }


# --- report ------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    m, rows = r["machine"], r["rows"]
    single, lower, pooled, stage = r["match"], r["match_lowercase"], r["match_pool"], r["stage"]

    def rate(entry: dict) -> str:
        others = ", ".join(f"{x:.1f}" for x in entry["other_cpu_seconds"])
        return (
            f"{rows / entry['seconds']:,.0f} captions/s ({entry['seconds']:.2f} s; all "
            f"{', '.join(f'{x:.2f}' for x in entry['all_seconds'])} s; others' CPU {others} s)"
        )

    total = stage["plan_seconds"] + stage["apply_seconds"]
    lines = [
        ("machine", f"{m['cores']} cores, {m['cpu']}, {m['ram_gib']} GiB RAM"),
        ("curate", f"commit {r['curate_version']}"),
        (
            "captions",
            f"{rows:,} in {FILES} files; {r['share_matched']:.1%} name one of "
            f"{r['concepts']:,} ImageNet class names",
        ),
        ("match, 1 process, case-sensitive", rate(single)),
        ("match, 1 process, lower-cased", rate(lower)),
        (f"read + match, {r['workers']} processes", rate(pooled)),
        (
            f"balance stage (t = {r['t']:,}), 1 process",
            f"plan {stage['plan_seconds']:.2f} s + apply {stage['apply_seconds']:.2f} s: "
            f"{rows / total:,.0f} rows/s; kept {stage['rows_kept']:,}; others' CPU "
            f"{stage['other_cpu_seconds'][0]:.1f} s",
        ),
    ]
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in lines)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/curate-bench-balance"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    version = curate_version()
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    files = write_ledger(args.workdir / "ledger", args.rows)
    print(f"{args.rows:,} captions written in {time.perf_counter() - start:.1f} s", flush=True)
    captions = [pq.read_table(f, columns=["caption"])["caption"] for f in files]

    results: dict = {
        "machine": machine(),
        "curate_version": version,
        "rows": args.rows,
        "workers": args.workers,
        "repeat": args.repeat,
        "t": T,
    }
    entries = load_concepts(CONCEPTS)
    results["concepts"] = len(Matcher(entries))
    for key, lowercase in (("match", False), ("match_lowercase", True)):
        matcher = Matcher(entries, lowercase)
        matcher.match(pa.array(["warm up the automaton"]))
        results[key] = timed(lambda m=matcher: match_in_process(captions, m), args.repeat)
        print(f"{key}: {args.rows / results[key]['seconds']:,.0f} captions/s", flush=True)
    matched = results["match"].pop("result")
    assert results["match_lowercase"].pop("result") >= matched
    results["share_matched"] = matched / args.rows
    results["match_pool"] = match_in_pool(files, args.workers, args.repeat)
    assert results["match_pool"].pop("result") == matched
    print(f"pool: {args.rows / results['match_pool']['seconds']:,.0f} captions/s", flush=True)
    stage = timed(lambda: balance_in_process(files, args.workdir), 1)
    results["stage"] = {**stage.pop("result"), **stage}
    results["captions_per_s"] = {
        "one_process": args.rows / results["match"]["seconds"],
        "one_process_lowercase": args.rows / results["match_lowercase"]["seconds"],
        f"{args.workers}_processes_with_reading": args.rows / results["match_pool"]["seconds"],
    }
    out = ROOT / "benchmarks" / "results" / "bench_balance.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(markdown(results))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
