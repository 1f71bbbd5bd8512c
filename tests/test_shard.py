"""The shard stage on real downloads of the demo pool, read back by every reader it promises.

The pool is downloaded once (module fixture); each run copies that folder and
adds its shard stage, so the download is found done and skipped.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

import curate.train.shards as shard_stage
from curate.core.config import ConfigError
from curate.core.layout import IMAGES
from curate.core.recipe import recipe_from_data
from curate.io.images import image_shards
from curate.runner import run_recipe

DOWNLOAD = {"stage": "download", "allow_private_networks": True, "image_size": 64}
ROWS_PER_SHARD = 100
ROWS_PER_GROUP = 40  # patched in: several row groups per shard on a 500-row pool


def _recipe(*stages: dict):
    data = {"name": "shard_test", "stages": [{"stage": "ingest"}, DOWNLOAD, *stages]}
    return recipe_from_data(data, {}, "inline")


@pytest.fixture(scope="module")
def downloaded(served_pool, tmp_path_factory) -> Path:
    """A run folder whose ingest and download stages are done."""
    run = tmp_path_factory.mktemp("shard") / "base"
    run_recipe(_recipe(), served_pool.urls_path, run, engine="local")
    return run


def run_shard(start: Path, run: Path, served_pool, **params) -> Path:
    """Copy a downloaded run and add a shard stage (the download is reused)."""
    shutil.copytree(start, run)
    stage = {"stage": "shard", "rows_per_shard": ROWS_PER_SHARD, **params}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_stage, "ROWS_PER_GROUP", ROWS_PER_GROUP)
        result = run_recipe(_recipe(stage), served_pool.urls_path, run, engine="local")
    assert result.stages[1].skipped, "the download should have been reused"
    return run


@pytest.fixture(scope="module")
def sharded(downloaded, served_pool, tmp_path_factory) -> Path:
    return run_shard(downloaded, tmp_path_factory.mktemp("shard") / "run", served_pool)


def shard_files(run: Path, ext: str = "parquet") -> list[Path]:
    return sorted((run / "shards").glob(f"shard-*.{ext}"))


def kept_rows(run: Path) -> list[dict]:
    ledger = pq.read_table(run / "ledger", columns=["uid", "caption", "width", "height", "keep"])
    return ledger.filter(pc.fill_null(ledger["keep"], False)).to_pylist()


def downloaded_bytes(run: Path) -> dict[str, bytes]:
    images = [pq.read_table(f, columns=["uid", "jpg"]) for f in image_shards(run / IMAGES)]
    table = pa.concat_tables(images)
    return dict(zip(table["uid"].to_pylist(), table["jpg"].to_pylist()))


def test_shards_hold_the_kept_rows_in_ledger_order_with_their_images(sharded):
    kept = kept_rows(sharded)
    files = shard_files(sharded)
    assert len(kept) > 400
    assert [pq.read_metadata(f).num_rows for f in files[:-1]] == [ROWS_PER_SHARD] * (len(files) - 1)
    for f in files:
        meta = pq.read_metadata(f)
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert max(groups) <= ROWS_PER_GROUP and sum(groups) == meta.num_rows
    table = pq.read_table(files)
    assert table["uid"].to_pylist() == [r["uid"] for r in kept]
    assert not {"keep", "dropped_by", "caption_error"} & set(table.column_names)
    assert {"caption", "width", "height", "sha256", "url"} <= set(table.column_names)
    jpg = downloaded_bytes(sharded)
    for row, want in zip(table.to_pylist(), kept):
        assert row["image"]["bytes"] == jpg[row["uid"]]
        assert row["image"]["path"] == f"{row['uid']}.jpg"
        with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
            assert image.size == (want["width"], want["height"]) == (row["width"], row["height"])


def test_duckdb_reads_the_image_bytes(sharded):
    import duckdb

    files = [str(f) for f in shard_files(sharded)]
    # DuckDB has no length(BLOB): octet_length counts a blob's bytes.
    sql = "SELECT count(*), sum(octet_length(image.bytes)) FROM read_parquet(?)"
    with duckdb.connect() as con:
        count, total = con.execute(sql, [files]).fetchone()
    jpg = downloaded_bytes(sharded)
    kept = kept_rows(sharded)
    assert count == len(kept)
    assert total == sum(len(jpg[r["uid"]]) for r in kept)


def test_hf_datasets_decodes_the_images(sharded, tmp_path):
    from datasets import load_dataset

    files = [str(f) for f in shard_files(sharded)]
    dataset = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    kept = kept_rows(sharded)
    assert dataset.num_rows == len(kept)
    assert type(dataset.features["image"]).__name__ == "Image"
    for i in (0, len(kept) // 2, len(kept) - 1):
        row = dataset[i]
        assert isinstance(row["image"], Image.Image)
        assert row["uid"] == kept[i]["uid"]
        assert row["image"].size == (kept[i]["width"], kept[i]["height"])


@pytest.mark.slow
def test_ray_data_reads_the_shards(sharded, ray_local):
    import ray.data

    # The folder, not a list of files: Ray 2.60 resolves listed paths in threads that
    # race to import fsspec's HTTP filesystem, an ImportError when aiohttp is missing.
    dataset = ray.data.read_parquet(str(sharded / "shards")).select_columns(["uid", "image"])
    rows = dataset.take_all()
    jpg = downloaded_bytes(sharded)
    assert sorted(r["uid"] for r in rows) == sorted(r["uid"] for r in kept_rows(sharded))
    assert all(r["image"]["bytes"] == jpg[r["uid"]] for r in rows)


def test_the_same_ledger_gives_byte_identical_shards(sharded, downloaded, served_pool, tmp_path):
    again = run_shard(downloaded, tmp_path / "again", served_pool)
    first, second = shard_files(sharded), shard_files(again)
    assert [f.name for f in first] == [f.name for f in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))


def test_webdataset_shards_are_what_open_clip_reads(downloaded, served_pool, tmp_path):
    run = run_shard(downloaded, tmp_path / "wds", served_pool, format="webdataset")
    tars = shard_files(run, "tar")
    kept = kept_rows(run)
    sizes = json.loads((run / "shards" / "sizes.json").read_text())
    assert sizes == {t.name: min(ROWS_PER_SHARD, len(kept) - i * ROWS_PER_SHARD)
                     for i, t in enumerate(tars)}  # fmt: skip
    jpg = downloaded_bytes(run)
    members = []
    for path in tars:
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.uname) == (0, 0, 0, "")
                members.append((info.name, tar.extractfile(info).read()))
    expected = [f"{r['uid']}.{ext}" for r in kept for ext in ("jpg", "json", "txt")]
    assert [name for name, _ in members] == expected
    for row, (image, meta, text) in zip(kept, zip(*[iter(members)] * 3)):
        assert image[1] == jpg[row["uid"]]
        assert text[1].decode() == row["caption"]
        sample = json.loads(meta[1])
        assert {k: sample[k] for k in ("uid", "width", "height")} == {
            k: row[k] for k in ("uid", "width", "height")
        }
        assert "keep" not in sample and "image" not in sample
    again = run_shard(downloaded, tmp_path / "wds_again", served_pool, format="webdataset")
    assert [t.read_bytes() for t in tars] == [t.read_bytes() for t in shard_files(again, "tar")]


def test_webdataset_samples_group_as_in_open_clip(downloaded, served_pool, tmp_path):
    """open_clip's pipeline: group members by key, then rename image/text as its data.py does."""
    import webdataset as wds

    run = run_shard(downloaded, tmp_path / "wds", served_pool, format="webdataset")
    urls = [str(t) for t in shard_files(run, "tar")]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.to_tuple("__key__", "image", "text"),
    )
    captions = {r["uid"]: r["caption"] for r in kept_rows(run)}
    samples = list(pipeline)
    assert [key for key, _, _ in samples] == list(captions)
    assert all(text.decode() == captions[key] for key, _, text in samples)


def test_a_kept_row_without_its_image_is_an_error_naming_it(downloaded, tmp_path):
    """The stage given a ledger whose images are gone. (A run never gets there: it finds
    images/ changed since the download finished and downloads again, test_run_folder.)"""
    from curate.core.layout import ledger_files
    from curate.engine.local import LocalEngine

    run = tmp_path / "run"
    shutil.copytree(downloaded, run)
    for shard in image_shards(run / IMAGES):  # the images gone, their index left
        shard.unlink()
    first = kept_rows(run)[0]["uid"]
    ledger = ledger_files(run / "ledger")
    out = tmp_path / "shards"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match=f"kept row {first} has no image"):
        shard_stage.write_shards(ledger, out, run / IMAGES, 10_000, False, LocalEngine(), "shard")


def test_runs_without_a_download_write_shards_without_images(served_pool, tmp_path):
    data = {"name": "meta", "stages": [{"stage": "ingest"}, {"stage": "shard"}]}
    recipe = recipe_from_data(data, {}, "inline")
    run_recipe(recipe, served_pool.urls_path, tmp_path / "run", engine="local")
    (path,) = shard_files(tmp_path / "run")
    schema = pq.read_schema(path)
    assert "image" not in schema.names
    assert b"huggingface" not in (schema.metadata or {})
    assert pq.read_metadata(path).num_rows == pq.read_metadata(served_pool.urls_path).num_rows


def test_webdataset_needs_a_download_stage(served_pool, tmp_path):
    data = {
        "name": "meta",
        "stages": [{"stage": "ingest"}, {"stage": "shard", "format": "webdataset"}],
    }
    recipe = recipe_from_data(data, {}, "inline")
    with pytest.raises(ConfigError, match="webdataset shards need a download stage"):
        run_recipe(recipe, served_pool.urls_path, tmp_path / "run", engine="local")
    assert not (tmp_path / "run" / "stages").exists()  # found before ingest ran


def test_shards_are_exact_ranges_across_ledger_files():
    """Kept rows per file 3, 0, 7, 1 in shards of 4: (file, first, stop) ranges per shard."""
    assert shard_stage._ranges([3, 0, 7, 1], 4) == [
        [(0, 0, 3), (2, 0, 1)],
        [(2, 1, 5)],
        [(2, 5, 7), (3, 0, 1)],
    ]
    assert shard_stage._ranges([0, 0], 4) == []
