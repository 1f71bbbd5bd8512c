"""The funnel of a run: rows in, dropped per filter or stage in pipeline order, rows out.

Computed with DuckDB over the ledger, so it reflects exactly what was written,
and checked: rows in must equal rows kept plus rows dropped, every drop with
its reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import duckdb

from curate.recipe import Recipe
from curate.runner import RunResult
from curate.stages.filter import FilterStage


def drop_order(recipe: Recipe) -> list[str]:
    """Every reason a row can be dropped for, in the order the pipeline applies them."""
    order = []
    for stage in recipe.stages:
        if isinstance(stage, FilterStage):
            order.extend(f.name for f in stage.filters)
        elif stage.produces_ledger and stage.kind != "ingest":
            order.append(stage.name)
    return order


def ledger_glob(run_dir: Path) -> str:
    return str(Path(run_dir) / "ledger" / "*.parquet")


def funnel(run_dir: Path, order: list[str]) -> dict:
    """Rows in, rows kept, and the drop count of every reason (pipeline order first)."""
    con = duckdb.connect()
    rows = con.execute(
        "SELECT dropped_by, count(*) FILTER (WHERE keep), count(*) "
        "FROM read_parquet(?, union_by_name = true) GROUP BY dropped_by",
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
    con = duckdb.connect()
    source = "read_parquet(?, union_by_name = true)"
    names = {
        r[0]
        for r in con.execute(f"DESCRIBE SELECT * FROM {source}", [ledger_glob(run_dir)]).fetchall()
    }
    if "status" not in names:
        return None
    rows = con.execute(
        f"SELECT status, count(*), min(error_message) FROM {source} "
        "WHERE status IS NOT NULL GROUP BY status ORDER BY count(*) DESC, status",
        [ledger_glob(run_dir)],
    ).fetchall()
    attempted = sum(n for _, n, _ in rows)
    success = sum(n for kind, n, _ in rows if kind == "success")
    return {
        "attempted": attempted,
        "success": success,
        "success_rate": round(success / attempted, 4) if attempted else None,
        "failures": {kind: n for kind, n, _ in rows if kind != "success"},
        "examples": {kind: message for kind, _, message in rows if kind != "success"},
    }


def download_table(summary: dict) -> str:
    """The download's failures by kind as Markdown, most frequent first."""
    n = max(summary["attempted"], 1)
    lines = [
        f"{summary['success']:,} of {summary['attempted']:,} images downloaded "
        f"({100 * summary['success'] / n:.1f} %).",
        "",
        "| failure | rows | % of attempted | example |",
        "| --- | ---: | ---: | --- |",
    ]
    for kind, count in summary["failures"].items():
        example = (summary["examples"].get(kind) or "").replace("|", "\\|")[:120]
        lines.append(f"| {kind} | {count:,} | {100 * count / n:.1f} | {example} |")
    return "\n".join(lines)


def funnel_table(summary: dict) -> str:
    """The funnel as a Markdown table (also what the CLI prints)."""
    n = max(summary["rows_in"], 1)
    lines = ["| step | dropped | remaining | % of pool |", "| --- | ---: | ---: | ---: |"]
    lines.append(f"| rows in | | {summary['rows_in']:,} | 100.0 |")
    for step in summary["funnel"]:
        lines.append(
            f"| {step['step']} | {step['dropped']:,} | {step['remaining']:,} | "
            f"{100 * step['remaining'] / n:.1f} |"
        )
    lines.append(
        f"| **rows out** | | **{summary['rows_out']:,}** | {100 * summary['rows_out'] / n:.1f} |"
    )
    return "\n".join(lines)


def write_report(recipe: Recipe, result: RunResult) -> dict:
    """Write report.json and report.md into the run folder; return the report."""
    summary = funnel(result.run_dir, drop_order(recipe))
    download = download_summary(result.run_dir)
    report = {
        "recipe": recipe.name,
        "source": recipe.source,
        **summary,
        "download": download,
        "stages": [asdict(s) for s in result.stages],
        "total_seconds": round(sum(s.seconds for s in result.stages if not s.skipped), 3),
    }
    (result.run_dir / "report.json").write_text(json.dumps(report, indent=2))
    stage_lines = [
        "| stage | kind | rows in | rows out | seconds |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for s in result.stages:
        note = " (resumed)" if s.skipped else ""
        stage_lines.append(
            f"| {s.name}{note} | {s.kind} | {s.rows_in:,} | {s.rows_out:,} | {s.seconds:.2f} |"
        )
    md = [
        f"# Run report: {recipe.name}",
        "",
        recipe.description.strip(),
        "",
        "## Funnel",
        "",
        funnel_table(summary),
        "",
        *(["## Download", "", download_table(download), ""] if download else []),
        "## Stages",
        "",
        *stage_lines,
        "",
    ]
    (result.run_dir / "report.md").write_text("\n".join(md))
    return report
