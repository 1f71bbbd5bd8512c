"""DataComp metadata as ingest input: parquet shards with fp16 embeddings in sibling .npz files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pools import SMALL_DIMS, embedding, run_ingest, write_datacomp_pool

from curate.io.datacomp import KEYS, MANIFEST, read_npz_embeddings
from curate.stages.ingest import IngestError

N_ROWS, N_FILES = 300, 3


@pytest.fixture
def pool(tmp_path):
    folder = tmp_path / "pool"
    return folder, write_datacomp_pool(folder, N_ROWS, N_FILES, seed=7)


def test_ingest_keeps_uids_sizes_and_scores(tmp_path, pool):
    folder, source = pool
    table, rows, ctx = run_ingest(folder, tmp_path, rows_per_file=70)
    assert rows == N_ROWS and ctx.counters["format"] == "datacomp"
    assert table["uid"].equals(source["uid"])
    assert table["url"].equals(source["url"])
    assert table["caption"].equals(source["text"])
    assert "text" not in table.column_names
    for size in ("original_width", "original_height"):
        assert table.schema.field(size).type == pa.int32()
        assert table[size].to_pylist() == source[size].to_pylist()
    for column in ("sha256", "clip_b32_similarity_score", "clip_l14_similarity_score"):
        assert table[column].equals(source[column])
    assert table["keep"].to_pylist() == [True] * N_ROWS
    assert table["caption_error"].null_count == N_ROWS


def test_manifest_lists_each_parquet_with_its_npz(tmp_path, pool):
    folder, _ = pool
    run_ingest(folder, tmp_path)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    files = manifest["files"]
    assert [f["rows"] for f in files] == [100, 100, 100]
    assert [f["first_row"] for f in files] == [0, 100, 200]
    for i, entry in enumerate(files):
        assert entry["parquet"] == str((folder / f"{i:07d}.parquet").resolve())
        assert entry["npz"] == str((folder / f"{i:07d}.npz").resolve())
        assert entry["arrays"] == {
            "b32_img": [100, 8],
            "b32_txt": [100, 8],
            "l14_img": [100, 12],
            "l14_txt": [100, 12],
        }


@pytest.mark.parametrize("key", KEYS)
def test_read_npz_embeddings_pairs_vectors_with_their_uids(tmp_path, pool, key):
    folder, source = pool
    run_ingest(folder, tmp_path, rows_per_file=70)  # parts do not line up with source files
    tables = list(read_npz_embeddings(tmp_path / "out", key))
    assert [t.num_rows for t in tables] == [100, 100, 100]
    model, kind = key.split("_")
    dim = SMALL_DIMS[model]
    assert tables[0].schema.field("embedding").type == pa.list_(pa.float16(), dim)
    row_of = {uid: i for i, uid in enumerate(source["uid"].to_pylist())}
    got = pa.concat_tables(tables)
    rows = np.array([row_of[u] for u in got["uid"].to_pylist()])
    assert sorted(rows.tolist()) == list(range(N_ROWS))  # every uid once
    vectors = np.stack(got["embedding"].to_numpy(zero_copy_only=False))
    expected = embedding(rows, dim, list(SMALL_DIMS).index(model))
    np.testing.assert_array_equal(vectors, -expected if kind == "txt" else expected)


def test_a_single_datacomp_file_is_recognised(tmp_path):
    folder = tmp_path / "pool"
    source = write_datacomp_pool(folder, 50, 1, seed=1)
    table, _, ctx = run_ingest(folder / "0000000.parquet", tmp_path)
    assert ctx.counters["format"] == "datacomp"
    assert table["uid"].equals(source["uid"])
    (vectors,) = read_npz_embeddings(tmp_path / "out", "l14_img")
    assert vectors["uid"].equals(source["uid"])


def test_nested_columns_pass_through(tmp_path):
    folder = tmp_path / "pool"
    source = write_datacomp_pool(folder, 3, 1, seed=2)
    boxes = pa.array([[[0.1, 0.2, 0.3, 0.4]], [], None], pa.list_(pa.list_(pa.float64())))
    pq.write_table(source.append_column("face_bboxes", boxes), folder / "0000000.parquet")
    table, _, _ = run_ingest(folder, tmp_path)
    assert table["face_bboxes"].equals(pa.chunked_array([boxes]))


def test_format_parquet_ignores_the_npz_files(tmp_path, pool):
    folder, source = pool
    table, _, ctx = run_ingest(folder, tmp_path, format="parquet")
    assert ctx.counters["format"] == "parquet" and table["uid"].equals(source["uid"])
    assert not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(IngestError, match=f"no {MANIFEST}"):
        next(read_npz_embeddings(tmp_path / "out", "b32_img"))


def test_a_parquet_without_its_npz_fails(tmp_path, pool):
    folder, _ = pool
    (folder / "0000001.npz").unlink()
    with pytest.raises(IngestError) as info:
        run_ingest(folder, tmp_path)
    message = str(info.value)
    assert str(folder / "0000001.parquet") in message and "0000001.npz" in message
    assert "missing" in message


def test_npz_row_count_must_match_its_parquet(tmp_path, pool):
    folder, _ = pool
    np.savez(folder / "0000002.npz", b32_img=np.zeros((99, 8), np.float16))
    with pytest.raises(IngestError) as info:
        run_ingest(folder, tmp_path)
    message = str(info.value)
    assert str(folder / "0000002.npz") in message and "(99, 8)" in message and "100 rows" in message


def test_corrupt_npz_fails_at_ingest(tmp_path, pool):
    folder, _ = pool
    (folder / "0000000.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(IngestError, match=r"0000000\.npz: not a readable \.npz"):
        run_ingest(folder, tmp_path)


def test_read_npz_embeddings_fails_clearly(tmp_path, pool):
    folder, _ = pool
    run_ingest(folder, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(IngestError) as info:
        next(read_npz_embeddings(out, "h14_img"))
    message = str(info.value)
    assert "0000000.npz" in message and "'h14_img'" in message and "b32_img" in message
    (folder / "0000001.npz").unlink()
    embeddings = read_npz_embeddings(out, "b32_img")
    assert next(embeddings).num_rows == 100
    with pytest.raises(IngestError, match=r"0000001\.npz: missing"):
        next(embeddings)
    np.savez(folder / "0000001.npz", b32_img=np.zeros((5, 8), np.float16))  # replaced after ingest
    with pytest.raises(IngestError, match=r"has shape \(5, 8\), but 0000001\.parquet has 100"):
        list(read_npz_embeddings(out, "b32_img"))
