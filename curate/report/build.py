"""The report of a run: the funnel (rows in, dropped per filter or stage in pipeline
order, rows out), downloads, stage timings, figures and examples.

The funnel is computed with DuckDB over the ledger, so it reflects exactly what
was written, and checked: rows in must equal rows kept plus rows dropped, every
drop with its reason. ``write_report`` (after ``curate run``) and ``report_run``
(``curate report RUN``, from the run folder alone) describe the report once as
sections (``curate.report.render``) and write it three ways: ``report.json``,
``report.md`` with PNGs in ``report/``, and a self-contained ``report.html``.
Figures come from ``curate.report.plots``, their numbers from ``curate.report.data``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import duckdb
import yaml

from curate.core.config import ConfigError
from curate.core.layout import FIGURES, LEDGER, RECIPE, UIDS
from curate.core.operators import load_registry
from curate.core.recipe import Recipe
from curate.core.runfolder import claim, remove_tree, shared_links
from curate.io.submission import kept_uids, write_uids
from curate.report.data import (
    LEDGER_SQL,
    SCORE_COLUMNS,
    check_ledger,
    dup_groups,
    dup_summary,
    examples,
    ledger_columns,
    ledger_glob,
    read_images,
    score_histogram,
    stage_folders,
)
from curate.report.plots import (
    concept_figure,
    funnel_figure,
    groups_grid,
    image_grid,
    png_bytes,
    score_figure,
)
from curate.report.render import Section, Table, markdown_table, render_html, render_markdown
from curate.runner import RunResult, StageResult, read_manifest
from curate.stages import STAGES

#: Example rows per drop reason, and of kept rows (one line of thumbnails each).
EXAMPLES = 6


def drop_order(stages: list[dict]) -> list[str]:
    """Every reason a row can be dropped for, in the order the pipeline applies them, each
    once: a filter in two stages (a top fraction of one score, then of another) drops rows
    under one name, counted where it first cuts.

    ``stages`` is a resolved recipe's stage list (``Recipe.resolved()["stages"]``, or
    a run's ``recipe.yaml``): plain data, so an old run's order needs no stage objects.
    """
    load_registry()
    order = []
    for entry in stages:
        if entry["stage"] == "filter":
            order.extend(name for f in entry["filters"] for name in f)
        elif STAGES[entry["stage"]].produces_ledger and entry["stage"] != "ingest":
            order.append(entry["name"])
    return list(dict.fromkeys(order))


def funnel(run_dir: Path, order: list[str]) -> dict:
    """Rows in, rows kept, and the drop count of every reason (pipeline order first)."""
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT dropped_by, count(*) FILTER (WHERE keep), count(*) FROM {LEDGER_SQL} "
        "GROUP BY dropped_by",
        [ledger_glob(run_dir)],
    ).fetchall()
    kept = sum(k for reason, k, _ in rows if reason is None)
    dropped = {reason: n for reason, _, n in rows if reason is not None}
    rows_in = sum(n for _, _, n in rows)
    unexplained = sum(n - k for reason, k, n in rows if reason is None)
    if unexplained:
        raise RuntimeError(f"{unexplained} rows are neither kept nor dropped with a reason")
    ordered = {r: dropped.pop(r, 0) for r in order}
    ordered.update(sorted(dropped.items()))
    steps, remaining = [], rows_in
    for reason, n in ordered.items():
        remaining -= n
        steps.append({"step": reason, "dropped": n, "remaining": remaining})
    return {"rows_in": rows_in, "rows_out": kept, "dropped": ordered, "funnel": steps}


def download_summary(run_dir: Path) -> dict | None:
    """Success rate and failures by kind, with one example message each (None: no download)."""
    if "status" not in ledger_columns(run_dir):
        return None
    rows = (
        duckdb.connect()
        .execute(
            f"SELECT status, count(*), min(error_message) FROM {LEDGER_SQL} "
            "WHERE status IS NOT NULL GROUP BY status ORDER BY count(*) DESC, status",
            [ledger_glob(run_dir)],
        )
        .fetchall()
    )
    attempted = sum(n for _, n, _ in rows)
    success = sum(n for kind, n, _ in rows if kind == "success")
    return {
        "attempted": attempted,
        "success": success,
        "success_rate": round(success / attempted, 4) if attempted else None,
        "failures": {kind: n for kind, n, _ in rows if kind != "success"},
        "examples": {kind: message for kind, _, message in rows if kind != "success"},
    }


# --- tables --------------------------------------------------------------------------------


def funnel_rows(summary: dict) -> Table:
    """The funnel: rows in, then each reason's drops and what remains, then rows out."""
    n = max(summary["rows_in"], 1)
    rows: list[list[object]] = [["rows in", None, summary["rows_in"], "100.0"]]
    for step in summary["funnel"]:
        share = f"{100 * step['remaining'] / n:.1f}"
        rows.append([step["step"], step["dropped"], step["remaining"], share])
    rows.append(["rows out", None, summary["rows_out"], f"{100 * summary['rows_out'] / n:.1f}"])
    return Table(["step", "dropped", "remaining", "% of pool"], rows, right={1, 2, 3}, total=True)


def funnel_table(summary: dict) -> str:
    """The funnel as a Markdown table (also what the CLI prints)."""
    return markdown_table(funnel_rows(summary))


def download_text(summary: dict) -> str:
    n = max(summary["attempted"], 1)
    return (
        f"{summary['success']:,} of {summary['attempted']:,} images downloaded "
        f"({100 * summary['success'] / n:.1f} %)."
    )


def download_rows(summary: dict) -> Table:
    """The download's failures by kind, most frequent first, with one example message."""
    n = max(summary["attempted"], 1)
    rows = [
        [kind, count, f"{100 * count / n:.1f}", (summary["examples"].get(kind) or "")[:120]]
        for kind, count in summary["failures"].items()
    ]
    return Table(["failure", "rows", "% of attempted", "example"], rows, right={1, 2})


def download_table(summary: dict) -> str:
    """The download's success rate and failures by kind as Markdown (also printed by the CLI)."""
    return download_text(summary) + "\n\n" + markdown_table(download_rows(summary))


def stage_rows(stages: list[StageResult]) -> Table:
    """Rows in and out, seconds and throughput (rows handled per second) of each stage."""
    rows = []
    for s in stages:
        handled = max(s.rows_in, s.rows_out)
        rate = f"{handled / s.seconds:,.0f}" if s.seconds > 0 and handled else ""
        if s.shared_from:
            name = f"{s.name} (shared with {s.shared_from})"
        else:
            name = f"{s.name} (resumed)" if s.skipped else s.name
        rows.append([name, s.kind, s.rows_in, s.rows_out, f"{s.seconds:.2f}", rate])
    return Table(
        ["stage", "kind", "rows in", "rows out", "seconds", "rows/s"], rows, right={2, 3, 4, 5}
    )


# --- the report ----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40]


def _examples_table(rows: list[dict], columns: list[str] | None = None) -> Table:
    """The rows' ``columns`` (default: all), less those no row fills; uid and caption always."""
    columns = [
        c
        for c in columns or list(rows[0])
        if c in ("uid", "caption") or any(r.get(c) is not None for r in rows)
    ]
    return Table(columns, [[r.get(c) for c in columns] for r in rows])


def _score_sections(run_dir: Path, figures: dict[str, bytes]) -> list[Section]:
    """A histogram of every score column the ledger has, kept vs dropped."""
    sections = []
    names = ledger_columns(run_dir)
    for column in (c for c in SCORE_COLUMNS if c in names):
        hist = score_histogram(run_dir, column)
        if hist is None:
            continue
        name = f"score_{column}.png"
        figures[name] = png_bytes(score_figure(hist))
        text = (
            f"{hist.rows:,} rows have a score: {int(hist.kept.sum()):,} kept, "
            f"{int(hist.dropped.sum()):,} dropped (by any filter or stage)."
        )
        sections.append(Section(f"Score: {column}", text=text, figure=name))
    return sections


def _concept_sections(run_dir: Path, figures: dict[str, bytes]) -> list[Section]:
    """The balance stage's concept counts before and after (none without a balance stage)."""
    figure = concept_figure(run_dir)
    if figure is None:
        return []
    figures["concepts.png"] = png_bytes(figure)
    text = (
        "Rows matching each concept before the balance stage and kept by it "
        "(p = t / max(count, t)); every concept: stages/*_balance/concept_counts.csv."
    )
    return [Section("Concept balancing", text=text, figure="concepts.png")]


def _dedup_sections(
    run_dir: Path, groups: list[list[dict]], images: dict[str, bytes], figures: dict[str, bytes]
) -> list[Section]:
    """The largest duplicate groups side by side (none when the ledger has no groups)."""
    if not groups:
        return []
    n_groups, n_rows = dup_summary(run_dir)
    figures["duplicates.png"] = png_bytes(groups_grid(groups, images))
    members = [
        {"group": n, "decision": r["dropped_by"] or "kept", **r}
        for n, group in enumerate(groups, 1)
        for r in group
    ]
    text = (
        f"{n_groups:,} groups of duplicates hold {n_rows:,} rows; the largest "
        f"{len(groups)}, one line each, kept members first."
    )
    table = _examples_table(members, ["group", "decision", "uid", "clip_score", "caption"])
    return [Section("Duplicates", text=text, figure="duplicates.png", table=table)]


def _example_sections(
    report: dict, picked: dict, images: dict[str, bytes], figures: dict[str, bytes]
) -> list[Section]:
    """Thumbnails and captions of kept rows, then of each drop reason in funnel order."""
    text = f"Up to {EXAMPLES} rows per reason, in uid order (a stable sample)."
    sections = [Section("Examples", text=text)]
    for i, (reason, rows) in enumerate(picked.items()):
        if not rows:
            continue
        name = f"examples_{i:02d}_{_slug(reason or 'kept')}.png"
        figures[name] = png_bytes(image_grid(rows, images))
        count = report["rows_out"] if reason is None else report["dropped"][reason]
        title = "kept" if reason is None else f"dropped by {reason}"
        table = _examples_table(rows)
        sections.append(Section(f"{title} ({count:,} rows)", level=3, table=table, figure=name))
    return sections


def _sections(run_dir: Path, report: dict) -> tuple[list[Section], dict[str, bytes]]:
    """Everything after the funnel, download and stage tables: scores, concepts,
    duplicates and examples, with their figures as PNG bytes by file name."""
    figures: dict[str, bytes] = {}
    groups = dup_groups(run_dir)
    picked = {None: examples(run_dir, None, EXAMPLES)}
    picked.update((r, examples(run_dir, r, EXAMPLES)) for r, n in report["dropped"].items() if n)
    shown = [r for rows in [*groups, *picked.values()] for r in rows]
    images = read_images(run_dir, [r["uid"] for r in shown])  # one pass over images/
    sections = [
        *_score_sections(run_dir, figures),
        *_concept_sections(run_dir, figures),
        *_dedup_sections(run_dir, groups, images, figures),
        *_example_sections(report, picked, images, figures),
    ]
    return sections, figures


def _write(run_dir: Path, recipe: dict, source: str, stages: list[StageResult]) -> dict:
    """Compute the report of a run folder and write report.json, report.md, report/, report.html.

    ``recipe`` is the resolved recipe as data (name, description, stages). The caller
    holds the run folder (``curate.core.runfolder.claim``): a report is not written beside
    a running stage.
    """
    summary = funnel(run_dir, drop_order(recipe["stages"]))
    download = download_summary(run_dir)
    report = {
        "recipe": recipe["name"],
        "source": source,
        **summary,
        "download": download,
        "stages": [asdict(s) for s in stages],
        "total_seconds": round(sum(s.seconds for s in stages if not s.skipped), 3),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    description = (recipe.get("description") or "").strip()
    sections = [
        Section("Recipe", text=f"{description} (recipe: {source})" if description else source),
        Section("Funnel", table=funnel_rows(summary), figure="funnel.png"),
    ]
    if download:
        text, table = download_text(download), download_rows(download)
        sections.append(Section("Download", text=text, table=table))
    sections.append(Section("Stages: time and throughput", table=stage_rows(stages)))
    more, figures = _sections(run_dir, report)
    figures["funnel.png"] = png_bytes(funnel_figure(summary))
    folder = run_dir / FIGURES
    remove_tree(folder, run_dir)
    folder.mkdir()
    for name, data in figures.items():
        (folder / name).write_bytes(data)
    title = f"Run report: {recipe['name']}"
    (run_dir / "report.md").write_text(
        render_markdown(title, sections + more, FIGURES), encoding="utf-8"
    )
    (run_dir / "report.html").write_text(
        render_html(title, sections + more, figures), encoding="utf-8"
    )
    return report


def write_report(recipe: Recipe, result: RunResult) -> dict:
    """Write report.json, report.md (+ report/*.png) and report.html into the run folder;
    return the report."""
    return _write(Path(result.run_dir), recipe.resolved(), recipe.source, result.stages)


def finisher(recipe: Recipe) -> Callable[[RunResult], tuple[dict, int]]:
    """``run_recipe``'s ``finish`` for ``curate run`` and ``curate demo``: what a finished run
    leaves besides its ledger, the report and uids.npy (DataComp's format).

    It runs as an engine task, inside the run's claim, since it reads the whole ledger;
    it carries the recipe as data (the stage objects may hold the run's engine).
    """
    return functools.partial(_finish, recipe.resolved(), recipe.source)


def _finish(resolved: dict, source: str, result: RunResult) -> tuple[dict, int]:
    """The report and how many uids were kept."""
    report = _write(Path(result.run_dir), resolved, source, result.stages)
    kept = write_uids(kept_uids(result.ledger_files), Path(result.run_dir) / UIDS)
    return report, kept


def finished_stages(run_dir: Path) -> list[StageResult]:
    """What each finished stage of a run did, from its ``_SUCCESS`` manifest (in recipe order)."""
    results, links = [], shared_links(run_dir)
    for _, folder in stage_folders(run_dir):
        m = read_manifest(folder)
        if not m:  # not finished
            continue
        numbers = [m[k] for k in ("stage", "kind", "seconds", "rows_in", "rows_out")]
        shared = links.get(folder.relative_to(run_dir).as_posix(), {}).get("base")
        results.append(StageResult(*numbers, skipped=False, counters=m.get("counters", {}),
                                   shared_from=shared))  # fmt: skip
    return results


def report_run(run_dir: Path) -> dict:
    """``curate report RUN``: write the report of a finished run again, from the folder alone.

    The recipe comes from ``RUN/recipe.yaml``, the stages from their manifests; the
    recipe's source is kept from an earlier report.json when there is one.
    """
    run_dir = Path(run_dir)
    if not (run_dir / LEDGER).is_dir() or not (run_dir / RECIPE).is_file():
        raise FileNotFoundError(f"{run_dir} has no ledger/ or recipe.yaml: is it a run folder?")
    check_ledger(run_dir)
    try:
        recipe = yaml.safe_load((run_dir / RECIPE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{run_dir / 'recipe.yaml'}: not the YAML a run writes") from error
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list):
        raise ConfigError(f"{run_dir / 'recipe.yaml'}: not the recipe a run writes")
    try:
        source = json.loads((run_dir / "report.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        source = str(run_dir / RECIPE)
    with claim(run_dir, "run"):
        return _write(run_dir, recipe, source, finished_stages(run_dir))
