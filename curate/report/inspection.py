"""``curate inspect``: the funnel of a run and a few kept and dropped examples per reason."""

from __future__ import annotations

import json
from pathlib import Path

from curate.core.layout import LEDGER
from curate.report.build import funnel, funnel_table
from curate.report.data import check_ledger, examples


def _shorten(value: object, width: int = 70) -> str:
    if isinstance(value, float):
        value = f"{value:.3f}"
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def inspect_run(run_dir: Path, limit: int = 3) -> str:
    """A text report: the funnel, then examples for every drop reason and for kept rows."""
    run_dir = Path(run_dir)
    if not (run_dir / LEDGER).is_dir():
        raise FileNotFoundError(f"{run_dir} has no ledger/: is it a run folder of `curate run`?")
    check_ledger(run_dir)
    try:  # an earlier report's order of drop reasons, when it left a readable one
        order = list(json.loads((run_dir / "report.json").read_text())["dropped"])
    except (OSError, ValueError, KeyError, TypeError):
        order = []
    summary = funnel(run_dir, order)
    out = [f"run: {run_dir}", "", funnel_table(summary), ""]
    for reason in [None, *summary["dropped"]]:
        if reason is not None and not summary["dropped"][reason]:
            continue
        out.append("kept:" if reason is None else f"dropped by {reason}:")
        for row in examples(run_dir, reason, limit):
            context = ", ".join(
                f"{k}={_shorten(v, 12)}"
                for k, v in row.items()
                if k not in ("uid", "caption") and v is not None
            )
            out.append(f"  {row['uid'][:12]}  {_shorten(row['caption'])!s}  [{context}]")
        out.append("")
    return "\n".join(out)
