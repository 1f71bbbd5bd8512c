"""Run folders are safe: curate deletes only what it wrote, one writer at a time, finished
stages are trusted only while their files are intact, and OS errors are one line."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.core.config import ConfigError
from curate.core.layout import ledger_files
from curate.core.recipe import load_recipe
from curate.core.runfolder import LOCK, MARKER, RunFolderError, claim, remove_tree, scratch, staged
from curate.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
CURATE = [sys.executable, "-m", "curate.cli"]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def victim(tmp_path: Path) -> Path:
    """A folder of the user's that curate must never touch."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    return folder


def assert_intact(folder: Path) -> None:
    assert (folder / "thesis.txt").read_text() == "four years of work"


def run_basic(pool: Path, out: Path, *overrides: str):
    return run_recipe(load_recipe("datacomp_basic", list(overrides)), pool, out, engine="local")


# --- what curate deletes ------------------------------------------------------------------


def test_every_delete_in_curate_goes_through_the_run_folder_module():
    """Each delete site calls remove_tree, scratch or staged (tested below); none deletes
    on its own."""
    deletes = {"rmtree", "remove", "unlink", "rmdir", "removedirs"}
    found = []
    for path in sorted((ROOT / "curate").rglob("*.py")):
        if path.name == "runfolder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in deletes:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert found == []


def test_remove_tree_stays_inside_a_folder_curate_marked(tmp_path):
    outside = victim(tmp_path)
    with claim(tmp_path / "run"):
        run = tmp_path / "run"
        (run / "stages").mkdir()
        with pytest.raises(RunFolderError, match="outside"):
            remove_tree(run / ".." / "victim", run)
        with pytest.raises(RunFolderError, match="outside"):
            remove_tree(run, run)
        (run / "stages" / "link").symlink_to(outside)  # a link on the way out
        with pytest.raises(RunFolderError, match="outside"):
            remove_tree(run / "stages" / "link" / "thesis.txt", run)
        with pytest.raises(RunFolderError, match="symbolic link"):
            remove_tree(run / "stages" / "link", run)
        with pytest.raises(RunFolderError, match="not a folder curate made"):
            remove_tree(outside / "thesis.txt", outside)
        remove_tree(run / "stages", run)
        assert not (run / "stages").exists()
        remove_tree(run / "never-made", run)  # nothing there: nothing to do
    assert_intact(outside)


def test_shared_folders_are_links_curate_records_and_removes_as_links(tmp_path):
    """``--from``'s links: made into another run only, removed as links (the base stays),
    recorded in links.json, whose damage is an error rather than a crash."""
    from curate.core.runfolder import (
        LINKS,
        check_shared,
        refresh_links,
        share,
        shared_links,
        unshare,
    )

    base, run = tmp_path / "base", tmp_path / "run"
    with claim(base):
        (base / "images").mkdir()
        (base / "images" / "0.parquet").write_text("bytes")
    with claim(run):
        (run / "images").mkdir()  # the run's own folder of that name: replaced
        share(run, "images", base / "images", "h1")
        assert (run / "images").is_symlink() and (run / "images" / "0.parquet").is_file()
        home = base.resolve()
        expected = {"target": str(home / "images"), "base": str(home), "hash": "h1"}
        assert shared_links(run) == {"images": expected}
        with pytest.raises(RunFolderError, match="not inside a curate run folder"):
            share(run, "stages/01_x", victim(tmp_path), "h2")
        with pytest.raises(RunFolderError, match="symbolic link"):
            remove_tree(run / "images", run)  # only unshare removes it
        unshare(run, "images")
        assert not (run / "images").exists() and (base / "images" / "0.parquet").is_file()
        (run / "elsewhere").symlink_to(base / "images")
        with pytest.raises(RunFolderError, match="did not make"):
            unshare(run, "elsewhere")

        share(run, "images", base / "images", "h1")
        (run / LINKS).write_text(
            json.dumps({**shared_links(run), "embeddings": shared_links(run)["images"]})
        )
        refresh_links(run)  # a record whose link was never made (a kill in between)
        assert list(shared_links(run)) == ["images"]
        shutil.rmtree(base / "images")
        with pytest.raises(RunFolderError, match=f"shared with the base run {base.resolve()}"):
            check_shared(run)
        for damaged in ("[1, 2]", '{"images": {"target": 1}}', "{not json"):
            (run / LINKS).write_text(damaged)
            with pytest.raises(RunFolderError, match=LINKS):
                shared_links(run)


def test_scratch_and_staged_delete_only_their_own_folders(tmp_path):
    mine = tmp_path / "_scratch-x"
    mine.mkdir()  # a folder of the name scratch might pick: not touched
    with scratch(tmp_path) as work:
        (work / "a").write_text("x")
    assert not work.exists() and mine.exists()
    target = tmp_path / "ckpt"
    with pytest.raises(InterruptedError), staged(target) as work:
        (work / "half").write_text("x")
        raise InterruptedError
    assert not target.exists() and not work.exists()
    with staged(target) as work:
        (work / "whole").write_text("x")
    assert (target / "whole").exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


def test_output_that_holds_someone_elses_files_is_refused(bad_pool, tmp_path, capsys):
    mine = victim(tmp_path)
    (mine / "ledger").mkdir()
    (mine / "uids.npy").write_bytes(b"user data")
    code = main(["run", "datacomp_basic", "--input", str(bad_pool), "--output", str(mine)])
    assert code == 2
    assert "is not a curate run folder" in capsys.readouterr().err
    assert_intact(mine)
    assert (mine / "uids.npy").read_bytes() == b"user data"
    assert sorted(p.name for p in mine.iterdir()) == ["ledger", "thesis.txt", "uids.npy"]


def test_a_demo_or_compare_folder_is_not_a_run_folder(bad_pool, tmp_path):
    with claim(tmp_path / "cmp", "compare"):
        pass
    with pytest.raises(RunFolderError, match="curate compare folder, not a run folder"):
        run_basic(bad_pool, tmp_path / "cmp")


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_and_input_must_not_overlap(tmp_path, bad_pool, where):
    folder = tmp_path / "in"
    folder.mkdir()
    pool = folder / "pool.parquet"
    pool.write_bytes(bad_pool.read_bytes())
    output = {"same": folder, "inside": folder / "run", "around": tmp_path}[where]
    with pytest.raises(RunFolderError, match="overlap"):
        run_basic(folder, output)
    assert sorted(p.name for p in folder.iterdir()) == ["pool.parquet"]


def test_a_stage_name_cannot_point_outside_the_run(bad_pool, tmp_path):
    """Even a Recipe built in Python, past the loader's name check."""
    outside = victim(tmp_path)
    recipe = load_recipe("datacomp_basic")
    recipe.stages[1].name = "../../victim"
    with pytest.raises(ConfigError, match=r"stage name '\.\./\.\./victim' is not a plain"):
        run_recipe(recipe, bad_pool, tmp_path / "run" / "deep", engine="local")
    assert_intact(outside)


@pytest.mark.parametrize("name", ["stages/00_ingest", "stages/01_filter", "ledger", "report"])
def test_a_link_where_curate_keeps_its_folders_is_refused_not_followed(
    bad_pool, tmp_path, name, capsys
):
    """Each place a run deletes and rewrites on a re-run: replaced by a link to the user's
    folder, the re-run stops with the path named, and the user's folder is intact."""
    out = tmp_path / "run"
    assert main(["run", "datacomp_basic", "--input", str(bad_pool), "--output", str(out),
                 "--engine", "local", "--quiet"]) == 0  # fmt: skip
    outside = victim(tmp_path)
    remove_tree(out / name, out)
    (out / name).symlink_to(outside)
    changed = "filter.image_size.min_side=150"  # the filter stage and what follows run again
    pool = tmp_path / "pool2.parquet"  # ingest runs again too: a new input
    pool.write_bytes(bad_pool.read_bytes())
    code = main(["run", "datacomp_basic", "--input", str(pool), "--output", str(out),
                 "--engine", "local", "--quiet", "--set", changed])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{out / name} is a symbolic link" in err and "Traceback" not in err
    assert_intact(outside)


# --- one writer ------------------------------------------------------------------------------


def start(*args: str) -> subprocess.Popen:
    """``curate ARGS`` in its own process group (a terminal's Ctrl-C reaches the group),
    with SIGINT handled as in a terminal even when this test runs where it is ignored."""
    return subprocess.Popen(
        [*CURATE, *args],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


HOLD = "import sys, time; from curate.core.runfolder import claim\nwith claim(sys.argv[1]):\n"


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD + "    print('held', flush=True); time.sleep(600)", folder],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_stops_at_once_and_names_the_first(bad_pool, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold(out)
    try:
        start = time.monotonic()
        code = main(["run", "datacomp_basic", "--input", str(bad_pool), "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and time.monotonic() - start < 5
        assert f"is in use by another curate run (pid {holder.pid} on " in err
        assert not (out / "stages").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(bad_pool, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (out / LOCK).read_text()  # it left its name behind
    result = run_basic(bad_pool, out)
    err = capsys.readouterr().err
    assert "taking over the lock left by a run that is no longer running" in err
    assert f"pid {holder.pid}" in err
    assert result.stages[-1].rows_out > 0
    assert (out / LOCK).read_text() == ""  # released: nothing to take over next time
    assert json.loads((out / MARKER).read_text())["kind"] == "run"


@pytest.mark.slow
def test_two_runs_started_together_leave_one_consistent_run(bad_pool, tmp_path):
    out = tmp_path / "run"
    args = ["run", "datacomp_basic", "--input", str(bad_pool), "--output", str(out)]
    runs = [
        start(*args, "--engine", "local", "--set", f"filter.image_size.min_side={side}")
        for side in (100, 300)
    ]
    done = [(r.wait(timeout=300), *r.communicate()) for r in runs]
    codes = sorted(code for code, _, _ in done)
    assert codes == [0, 2], done
    (winner,) = [i for i, (code, _, _) in enumerate(done) if code == 0]
    assert "is in use by another curate run" in done[1 - winner][2]
    side = (100, 300)[winner]
    recipe = (out / "recipe.yaml").read_text()
    assert f"min_side: {side}" in recipe
    ledger = pq.read_table(ledger_files(out / "ledger"))
    kept = sorted(u for u, k in zip(ledger["uid"].to_pylist(), ledger["keep"].to_pylist()) if k)
    assert len(np.load(out / "uids.npy")) == len(kept)
    assert f"({len(kept):,})" in done[winner][1]


# --- the recipe, checked before any work ----------------------------------------------------


def test_a_clip_stage_without_a_download_fails_before_ingest(bad_pool, tmp_path):
    from curate.core.recipe import recipe_from_data

    stages = [
        {"stage": "ingest"},
        {"stage": "clip", "model": "curate-tiny", "pretrained": "random"},
    ]
    recipe = recipe_from_data({"stages": stages}, {}, "inline")
    with pytest.raises(ConfigError, match="embedding images needs a download stage before it"):
        run_recipe(recipe, bad_pool, tmp_path / "run", engine="local")
    assert not (tmp_path / "run" / "stages").exists()


# --- what a re-run trusts ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "fewer rows", "removed", "added"])
def test_a_ledger_file_changed_after_its_stage_is_recomputed(tmp_path, bad_pool, damage, capsys):
    out = tmp_path / "run"
    overrides = ("ingest.rows_per_file=20",)  # several parts, so one can be damaged
    first = run_basic(bad_pool, out, *overrides)
    expected = pq.read_table(ledger_files(out / "ledger"))
    part = ledger_files(out / "stages" / "00_ingest")[1]
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:-100])
    elif damage == "fewer rows":
        pq.write_table(pq.read_table(part).slice(0, 5), part)
    elif damage == "removed":
        part.unlink()
    else:
        pq.write_table(pq.read_table(part), part.with_name("part-99999.parquet"))
    capsys.readouterr()
    again = run_basic(bad_pool, out, *overrides)
    err = capsys.readouterr().err
    assert (
        f"stage ingest: stages/00_ingest/{part.name if damage != 'added' else 'part-99999.parquet'}"
        in err
    )
    assert "running it again from its input" in err
    assert [s.skipped for s in again.stages] == [False, False, False]
    assert again.stages[0].rerun_reason is not None
    assert again.stages[0].rows_out == first.stages[0].rows_out
    assert pq.read_table(ledger_files(out / "ledger")).equals(expected)
    quiet = run_basic(bad_pool, out, *overrides)  # intact now: nothing runs
    assert all(s.skipped for s in quiet.stages)


@pytest.mark.slow
def test_a_damaged_image_shard_is_fetched_again_and_only_it(served_pool, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = ["download.allow_private_networks=true", "download.number_sample_per_shard=100",
                 "download.respect_robots_txt=false"]  # fmt: skip
    recipe = load_recipe("download_basic", overrides)
    run_recipe(recipe, served_pool.urls_path, out, engine="local")
    expected = pq.read_table(ledger_files(out / "ledger"))
    shards = {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")}
    damaged = sorted((out / "images").glob("*.parquet"))[2]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    asked = len(served_pool.server.requests)
    capsys.readouterr()
    again = run_recipe(recipe, served_pool.urls_path, out, engine="local")
    assert f"stage download: images/{damaged.name} changed after the stage finished" in (
        capsys.readouterr().err
    )
    assert [s.skipped for s in again.stages] == [True, False, False, False]
    assert len(served_pool.server.requests) - asked == 100  # that shard's urls, once each
    assert pq.read_table(ledger_files(out / "ledger")).equals(expected)
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.parquet")} == shards


# --- errors, not tracebacks ----------------------------------------------------------------


def test_export_to_a_full_disk_or_under_a_file_is_one_line(bad_pool, tmp_path, capsys):
    out = tmp_path / "run"
    run_basic(bad_pool, out)
    assert main(["export-uids", str(out), "--output", "/dev/full"]) == 2
    assert capsys.readouterr().err.strip() == (
        "curate: error: /dev/full: the disk is full: free some space, then run the same "
        "command to resume"
    )
    (tmp_path / "file").write_text("x")
    assert main(["export-uids", str(out), "--output", str(tmp_path / "file" / "u.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'file'}: already exists, where curate expected nothing or a folder" in err


def test_an_output_that_cannot_be_made_is_one_line(bad_pool, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["run", "datacomp_basic", "--input", str(bad_pool),
                 "--output", str(blocker / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{blocker / 'run'}" in err and "a file where a folder is expected" in err


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_without_a_traceback(served_pool, tmp_path):
    run = start(
        "run", "download_basic", "--input", str(served_pool.urls_path),
        "--output", str(tmp_path / "run"), "--set", "download.allow_private_networks=true",
    )  # fmt: skip
    asked = len(served_pool.server.requests)
    deadline = time.monotonic() + 120
    while len(served_pool.server.requests) < asked + 20:  # the download is under way
        assert time.monotonic() < deadline and run.poll() is None, run.communicate()
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "curate: interrupted; run the same command again to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
