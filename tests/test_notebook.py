"""notebooks/inspect.ipynb, executed headless (nbclient, kernel python3) against a real run.

The run shares every stage of tests/test_report.py's run (made once per session:
the demo pool downloaded, filtered, CLIP-scored, deduplicated, balanced and sharded,
so every cell of the notebook has something to show) through ``--from``: its stage
folders, images, embeddings and shards are links into that run.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import nbformat
import pytest
from nbclient import NotebookClient
from test_report import STAGES, demo_run

from curate.core.recipe import recipe_from_data
from curate.report.build import write_report
from curate.runner import run_recipe

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "inspect.ipynb"
#: Appended to the executed copy only: what the notebook's variables ended up as.
PROBE = """
import json
print("PROBE " + json.dumps({
    "run": str(RUN),
    "kept": KEPT,
    "reason": REASON,
    "by_reason": [r["uid"] for r in by_reason],
    "lowest": [r["uid"] for r in lowest],
    "figures": sorted(name for name, figure in figures.items() if figure is not None),
}))
"""


@pytest.fixture
def run(served_pool, tmp_path_factory) -> Path:
    base = demo_run(served_pool, tmp_path_factory)[0]
    branch = tmp_path_factory.mktemp("notebook") / "run"
    recipe = recipe_from_data({"name": "report_test", "stages": STAGES}, {}, "inline")
    result = run_recipe(recipe, served_pool.urls_path, branch, engine="local", base=base)
    assert all(stage.shared_from == str(base) for stage in result.stages)
    write_report(recipe, result)
    return branch


def test_the_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "CURATE_RUN" in code[0].source
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) / 2


def test_the_notebook_runs_on_a_real_run(run, monkeypatch):
    monkeypatch.setenv("CURATE_RUN", str(run))
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    path = {"metadata": {"path": str(NOTEBOOK.parent)}}
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources=path)
    client.execute()  # raises CellExecutionError on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    probe = json.loads(text.split("PROBE ", 1)[1].splitlines()[0])

    con = duckdb.connect()
    con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet('{run}/ledger/*.parquet')")
    kept = con.execute("SELECT count(*) FROM ledger WHERE keep").fetchone()[0]
    reason, dropped = con.execute(
        "SELECT dropped_by, count(*) AS n FROM ledger WHERE dropped_by IS NOT NULL "
        "GROUP BY ALL ORDER BY n DESC LIMIT 1"
    ).fetchone()
    lowest = con.execute(
        "SELECT uid FROM ledger WHERE keep AND clip_score IS NOT NULL "
        "ORDER BY clip_score, uid LIMIT 6"
    ).fetchall()
    assert probe["run"] == str(run) and probe["kept"] == kept > 0
    assert f"kept {kept:,} of 500 rows" in text
    assert probe["reason"] == reason and len(probe["by_reason"]) == min(6, dropped)
    assert probe["lowest"] == [u for (u,) in lowest]
    assert {"clip score", "concepts"} <= set(probe["figures"])
    # Figures displayed: the funnel, the kept and dropped grids, and every plot that exists.
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3 + len(probe["figures"])
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any(f"| {kept:,}" in m.replace("**", "") for m in markdown)
