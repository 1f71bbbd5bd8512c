"""Many recipes on one pool: ``curate run --from BASE`` shares the base's finished stages.

Real downloads from the served demo pool, a real curate-tiny model, the CLI in-process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.cli import main
from curate.core.layout import IMAGES, LEDGER, SHARDS
from curate.core.recipe import load_recipe
from curate.core.runfolder import RunFolderError, claim
from curate.runner import run_recipe

pytestmark = pytest.mark.slow

STAGES = """\
stages:
  - stage: ingest
  - stage: download
    image_size: 64
    allow_private_networks: true
  - stage: clip
    model: curate-tiny
    pretrained: random
    batch_size: 64
"""
BASE = STAGES + "  - stage: shard\n"
BRANCH = (
    STAGES
    + """\
  - stage: filter
    filters:
      - clip_score_top_fraction: {fraction: 0.5}
  - stage: shard
"""
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def cli_run(recipe: Path, urls: Path, out: Path, *more: str) -> int:
    return main(["run", str(recipe), "--input", str(urls), "--output", str(out),
                 "--engine", "local", "--quiet", *more])  # fmt: skip


def files_of(run: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``run`` reached without following links: (size, mtime)."""
    out = {}
    for folder, _, names in os.walk(run):
        for name in names:
            path = Path(folder) / name
            stat = path.lstat()
            out[str(path.relative_to(run))] = (stat.st_size, stat.st_mtime_ns)
    return out


def disk_bytes(run: Path) -> int:
    """What ``run`` holds on disk itself: its files, each inode once, links not followed."""
    seen, total = set(), 0
    for folder, _, names in os.walk(run):
        for name in names:
            stat = (Path(folder) / name).lstat()
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total


@pytest.fixture(scope="module")
def base_run(served_pool, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("branch")
    assert cli_run(write(folder, "base", BASE), served_pool.urls_path, folder / "base") == 0
    return folder / "base"


def test_a_second_recipe_downloads_and_embeds_nothing_it_shares(
    served_pool, base_run, tmp_path, monkeypatch
):
    from curate.clip.embed import Embedder

    recipe = write(tmp_path, "branch", BRANCH)
    base_files = files_of(base_run)
    requests = len(served_pool.server.requests)

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("the shared clip stage ran the model")

    monkeypatch.setattr(Embedder, "embed_chunk", no_forward_pass)
    branch = tmp_path / "branch"
    assert cli_run(recipe, served_pool.urls_path, branch, "--from", str(base_run)) == 0
    monkeypatch.undo()

    assert len(served_pool.server.requests) == requests  # not one HTTP request
    assert files_of(base_run) == base_files  # the base is only read
    for name in ("stages/00_ingest", "stages/01_download", "stages/02_clip", "images",
                 "embeddings"):  # fmt: skip
        assert (branch / name).is_symlink(), name
    # No copy of the images: besides its products (shards, report), the branch holds its
    # ledger and manifests, a fraction of the images' bytes, and none of their files.
    images = sum(p.stat().st_size for p in (base_run / IMAGES).glob("*.parquet"))
    products = disk_bytes(branch / SHARDS) + disk_bytes(branch / "report")
    products += sum((branch / f"report.{ext}").stat().st_size for ext in ("html", "md", "json"))
    own = disk_bytes(branch) - products
    assert images > 100_000 and own < images / 5, (own, images)
    inodes = {p.stat().st_ino for p in (base_run / IMAGES).iterdir()}
    assert not inodes & {p.lstat().st_ino for p in branch.rglob("*") if p.is_file()}

    # The same ledger and shards as the recipe run from nothing.
    alone = tmp_path / "alone"
    result = run_recipe(load_recipe(str(recipe)), served_pool.urls_path, alone, engine="local")
    assert not any(s.shared_from or s.skipped for s in result.stages)
    assert pq.read_table(branch / LEDGER).equals(pq.read_table(alone / LEDGER))
    for shard in sorted((alone / SHARDS).glob("shard-*.parquet")):
        assert (branch / SHARDS / shard.name).read_bytes() == shard.read_bytes()

    # Everything else reads a branch as any run; its report says what was shared.
    assert f"download (shared with {base_run})" in (branch / "report.md").read_text()
    assert main(["report", str(branch)]) == 0
    assert f"clip (shared with {base_run})" in (branch / "report.md").read_text()
    assert main(["inspect", str(branch)]) == 0
    assert main(["export-uids", str(branch), "--output", str(tmp_path / "uids.npy")]) == 0
    exported = tmp_path / "exported"
    assert main(["export-embeddings", str(branch), "--output", str(exported)]) == 0
    assert list(exported.glob("*.npz"))


def test_a_finished_branch_resumes_and_a_changed_stage_is_its_own(served_pool, base_run, tmp_path):
    recipe = write(tmp_path, "branch", BRANCH)
    branch = tmp_path / "branch"
    base_files = files_of(base_run)
    assert cli_run(recipe, served_pool.urls_path, branch, "--from", str(base_run)) == 0
    # A run killed between recording a link and making it left a record: dropped.
    links = json.loads((branch / "links.json").read_text())
    links["stages/03_filter"] = {**links["images"], "hash": "0" * 16}
    (branch / "links.json").write_text(json.dumps(links))
    again = run_recipe(load_recipe(str(recipe)), served_pool.urls_path, branch, engine="local")
    assert "stages/03_filter" not in json.loads((branch / "links.json").read_text())
    assert [s.shared_from is not None for s in again.stages] == [True] * 3 + [False] * 2
    assert all(s.skipped for s in again.stages)

    # The branch's own clip parameters: its clip stage (and what follows) runs here, into
    # its own folders; the download stays shared and the base is untouched.
    changed = load_recipe(str(recipe), ["clip.batch_size=32"])
    result = run_recipe(changed, served_pool.urls_path, branch, engine="local")
    assert [s.name for s in result.stages if s.shared_from] == ["ingest", "download"]
    assert not (branch / "embeddings").is_symlink() and (branch / "embeddings").is_dir()
    assert not (branch / "stages/02_clip").is_symlink()
    assert files_of(base_run) == base_files


def test_a_base_that_is_gone_or_changed_is_named(served_pool, tmp_path):
    base, branch = tmp_path / "pair" / "base", tmp_path / "pair" / "branch"
    recipe = load_recipe(str(write(tmp_path, "base", BASE)))
    run_recipe(recipe, served_pool.urls_path, base, engine="local")
    run_recipe(recipe, served_pool.urls_path, branch, engine="local", base=base)
    # Moved together (to another disk, say), the two still share.
    (tmp_path / "pair").rename(tmp_path / "moved")
    base, branch = tmp_path / "moved" / "base", tmp_path / "moved" / "branch"
    moved = run_recipe(recipe, served_pool.urls_path, branch, engine="local")
    assert all(s.skipped and s.shared_from for s in moved.stages)

    # Re-run with other download settings, the base no longer holds what the branch shares.
    other = load_recipe(str(write(tmp_path, "other", BASE)), ["download.image_size=48"])
    run_recipe(other, served_pool.urls_path, base, engine="local")
    with pytest.raises(RunFolderError, match=f"shared with the base run {base}.*run again"):
        run_recipe(recipe, served_pool.urls_path, branch, engine="local")

    # Deleted: every command that reads the branch names the base.
    import shutil

    shutil.rmtree(base)
    with pytest.raises(RunFolderError, match=f"shared with the base run {base}.*is gone"):
        run_recipe(recipe, served_pool.urls_path, branch, engine="local")
    for command in (["report", str(branch)], ["inspect", str(branch)],
                    ["export-uids", str(branch)]):  # fmt: skip
        assert main(command) == 2


def test_bad_bases_are_refused(served_pool, base_run, tmp_path):
    recipe = load_recipe(str(write(tmp_path, "base", BASE)))
    with pytest.raises(RunFolderError, match="not a curate run folder"):
        run_recipe(recipe, served_pool.urls_path, tmp_path / "b", engine="local", base=tmp_path)
    with pytest.raises(RunFolderError, match="overlaps"):
        run_recipe(recipe, served_pool.urls_path, base_run, engine="local", base=base_run)
    with claim(base_run, "run"), pytest.raises(RunFolderError, match=r"base run .* is in use"):
        run_recipe(recipe, served_pool.urls_path, tmp_path / "c", engine="local", base=base_run)
