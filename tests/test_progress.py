"""The progress line: its arithmetic, terminal vs log output, and what a run prints."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.progress import LOG_EVERY, FinishedRows, Progress
from curate.core.recipe import load_recipe
from curate.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rate_and_time_left_from_the_rows_done_since_the_start():
    clock = Clock()
    progress = Progress("filter", 1_000, stream=io.StringIO(), clock=clock)
    assert progress.rate() is None and progress.left() is None  # no time has passed
    clock.now += 2
    progress.update(250)
    assert progress.rate() == 125 and progress.left() == 6
    line = progress.line()
    assert line.startswith("  filter ")
    for part in ("250/1,000 rows", "25%", "125 rows/s", "0:06 left"):
        assert part in line, line


def test_work_done_earlier_counts_towards_the_total_not_the_rate():
    clock = Clock()
    progress = Progress("download", 10_000, done=4_000, stream=io.StringIO(), clock=clock)
    clock.now += 10
    progress.add(1_000)
    assert progress.rate() == 100 and progress.left() == 50
    assert "5,000/10,000 rows" in progress.line()


def test_an_unknown_total_shows_count_and_rate_only():
    clock = Clock()
    progress = Progress("ingest", stream=io.StringIO(), clock=clock)
    clock.now += 4
    progress.update(2_000)
    assert progress.left() is None
    line = progress.line()
    assert "2,000 rows  500 rows/s" in line and "%" not in line and "left" not in line


def test_extra_text_is_asked_for_only_when_a_line_is_drawn():
    clock, calls = Clock(), []

    def extra() -> str:
        calls.append(1)
        return "loss 1.2345"

    out = Terminal()
    progress = Progress("train", 100, unit="samples", extra=extra, stream=out, clock=clock)
    for _ in range(10):
        progress.add(1)  # no time passes: nothing drawn
    assert not calls and out.getvalue() == ""
    clock.now += 1
    progress.add(1)
    assert len(calls) == 1 and "11/100 samples" in out.getvalue()
    assert "loss 1.2345" in out.getvalue() and "samples/s" in out.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place_then_erased():
    clock, out = Clock(), Terminal()
    progress = Progress("shard", 100, stream=out, clock=clock)
    progress.update(10)  # too soon after the start: not drawn
    assert out.getvalue() == ""
    for done in (20, 40, 60):
        clock.now += 0.3
        progress.update(done)
    clock.now += 0.1
    progress.update(80)  # 0.1 s after the last redraw: not drawn
    progress.close()
    progress.close()  # once only
    text = out.getvalue()
    assert text.count("\r") == 4 and "\n" not in text
    redraws = text.split("\r")[1:]
    assert "60/100 rows" in redraws[-2] and redraws[-1] == "\x1b[K"  # erased for the summary


def test_a_log_gets_a_line_at_most_every_30_s_and_a_final_line():
    clock, out = Clock(), io.StringIO()
    progress = Progress("clip", 1_000, unit="images", stream=out, clock=clock)
    for done in range(0, 600, 10):
        clock.now += 1  # 60 updates over a minute
        progress.update(done)
    progress.close()
    lines = out.getvalue().splitlines()
    assert LOG_EVERY == 30 and len(lines) == 3  # at 30 s, at 60 s, the final line
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("  clip ") and "290/1,000 images" in lines[0]
    assert "590 images in 1:00" in lines[-1]


def test_a_disabled_line_writes_nothing_and_close_writes_once():
    out = io.StringIO()
    with Progress("x", 5, enabled=False, stream=out) as off:
        off.add(5)
    assert out.getvalue() == ""
    on = Progress("x", 5, stream=out)
    on.close()
    on.close()
    assert len(out.getvalue().splitlines()) == 1


def test_poll_counts_finished_parquet_files_and_skips_one_being_written(tmp_path):
    count = FinishedRows(tmp_path)
    pq.write_table(pa.table({"n": range(7)}), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.parquet").write_bytes(b"PAR1 half a file")  # no footer yet
    assert count() == 7
    pq.write_table(pa.table({"n": range(5)}), tmp_path / "part-1.parquet")
    assert count() == 12

    out = Terminal()
    progress = Progress("filter", 12, stream=out)
    with progress.poll(count, every=0.05):
        time.sleep(0.4)  # longer than a terminal's redraw interval
    assert progress.done == 12 and "12/12 rows" in out.getvalue()


def test_a_forced_on_run_writes_one_progress_line_per_stage(bad_pool, tmp_path, capsys):
    recipe = load_recipe("datacomp_basic")
    run_recipe(recipe, bad_pool, tmp_path / "run", engine="local", progress=True)
    lines = capsys.readouterr().err.splitlines()  # not a terminal: the final lines only
    assert [line.split()[0] for line in lines] == [s.name for s in recipe.stages], lines
    assert "71 rows in" in lines[0] and "58 rows in" in lines[-1]


def test_run_quiet_prints_nothing_at_all(bad_pool, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "curate.cli", "run", "datacomp_basic", "--input", str(bad_pool),
         "--output", str(tmp_path / "run"), "--engine", "local", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert (tmp_path / "run" / "shards").is_dir()
