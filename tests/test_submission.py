"""DataComp's uids.npy: round trips, DataComp's own construction, export-uids and --input-uids."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pools import random_hex, write_datacomp_pool

from curate.cli import main
from curate.core.config import ConfigError
from curate.io.submission import (
    UID_DTYPE,
    UidSet,
    load_pairs,
    read_uids,
    to_pairs,
    write_uids,
)

EDGES = ["0" * 32, "f" * 32, "0" * 16 + "f" * 16, "f" * 16 + "0" * 16, "8" + "0" * 31]


def datacomp_pairs(uids: list[str]) -> np.ndarray:
    """How DataComp's baselines/apply_filter.py builds and saves a subset."""
    pairs = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    pairs.sort()
    return pairs


def test_write_read_round_trip_is_datacomps_format(tmp_path):
    uids = random_hex(np.random.default_rng(0), 2000).to_pylist() + EDGES
    path = tmp_path / "subset.npy"
    assert write_uids(pa.array(uids), path) == len(uids)
    saved = np.load(path, allow_pickle=False)
    assert saved.dtype == UID_DTYPE and saved.ndim == 1
    np.testing.assert_array_equal(saved, datacomp_pairs(uids))
    assert saved.tolist() == sorted(set(saved.tolist()))  # sorted, unique
    back = read_uids(path).to_pylist()
    assert back == sorted(uids) and set(back) == set(uids)


def test_a_name_without_npy_is_kept_as_given(tmp_path):
    path = tmp_path / "kept.uids"
    write_uids(pa.array(EDGES), path)
    assert path.is_file() and not (tmp_path / "kept.uids.npy").exists()


def test_datacomp_files_with_other_field_names_or_order_are_read(tmp_path):
    uids = random_hex(np.random.default_rng(1), 50).to_pylist()
    pairs = datacomp_pairs(uids).astype(np.dtype([("hi", "<u8"), ("lo", "<u8")]))
    path = tmp_path / "renamed.npy"
    np.save(path, pairs[::-1])  # unsorted too
    assert read_uids(path).to_pylist() == sorted(uids)


def test_membership_is_exact_at_the_edges(tmp_path):
    rng = np.random.default_rng(2)
    subset_uids = random_hex(rng, 500).to_pylist() + EDGES[:3]
    others = random_hex(rng, 500).to_pylist() + EDGES[3:]
    write_uids(pa.array(subset_uids), tmp_path / "subset.npy")
    subset = UidSet.load(tmp_path / "subset.npy")
    found = subset.contains(pa.array(subset_uids + others))
    assert found[: len(subset_uids)].all() and not found[len(subset_uids) :].any()
    assert not UidSet(subset.keys[:0]).contains(pa.array(EDGES)).any()
    assert UidSet.of(pa.array(subset_uids)).keys.tolist() == subset.keys.tolist()


def test_bad_files_are_clear_errors(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(4, dtype=np.uint64))
    np.save(tmp_path / "square.npy", np.zeros((2, 2), UID_DTYPE))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name in ("flat", "square", "junk"):
        with pytest.raises(ConfigError, match=f"{name}.npy"):
            load_pairs(tmp_path / f"{name}.npy")
    with pytest.raises(ValueError, match="32 hex digits"):
        to_pairs(pa.array(["abc"]))


def kept(run) -> set[str]:
    table = pq.read_table(run / "ledger", columns=["uid", "keep"])
    return set(table.filter(table["keep"])["uid"].to_pylist())


def test_runs_write_uids_export_them_and_restrict_to_them(tmp_path, capsys):
    pool = tmp_path / "pool"
    table = write_datacomp_pool(pool, 300, n_files=2)
    run = tmp_path / "scored"
    args = ["run", "datacomp_clip_score", "--input", str(pool), "--engine", "local", "--quiet"]
    assert main([*args, "--output", str(run)]) == 0
    chosen = kept(run)
    assert 80 <= len(chosen) <= 100  # the top 30 %
    assert set(read_uids(run / "uids.npy").to_pylist()) == chosen

    exported = tmp_path / "exported.npy"
    assert main(["export-uids", str(run), "--output", str(exported)]) == 0
    assert f"{len(chosen):,} kept uids" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(exported), np.load(run / "uids.npy"))

    subset = tmp_path / "subset.npy"  # the chosen rows plus uids the pool does not have
    write_uids(pa.array([*chosen, *EDGES]), subset)
    again = tmp_path / "restricted"
    args = ["run", "no_filter", "--input", str(pool), "--engine", "local", "--quiet"]
    assert main([*args, "--output", str(again), "--input-uids", str(subset)]) == 0
    ledger = pq.read_table(again / "ledger").to_pylist()
    assert len(ledger) == table.num_rows  # every row accounted for
    assert {r["uid"] for r in ledger if r["keep"]} == chosen
    assert {r["dropped_by"] for r in ledger if not r["keep"]} == {"input_uids"}
    manifest = json.loads(next((again / "stages").glob("*_ingest/_SUCCESS")).read_text())
    assert manifest["counters"]["outside_input_uids"] == table.num_rows - len(chosen)
    assert manifest["counters"]["input_uids_not_in_pool"] == len(EDGES)


def test_input_uids_must_exist(tmp_path, capsys):
    pool = tmp_path / "pool"
    write_datacomp_pool(pool, 10)
    args = ["run", "no_filter", "--input", str(pool), "--output", str(tmp_path / "r")]
    assert main([*args, "--input-uids", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy: no such file" in capsys.readouterr().err
