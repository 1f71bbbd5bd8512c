"""The pure parts of dedup: the within-cluster rule, survivor order, assignment, decisions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.dedup import semdedup
from curate.dedup.decisions import (
    DECISIONS,
    REGROUP,
    apply_decisions,
    group_id,
    survivor_order,
)
from curate.io.vectors import unit_rows


def sequential_greedy(x: np.ndarray, threshold: float) -> np.ndarray:
    """The rule stated plainly: each row, in order, joins the first kept row it is too close to."""
    parent = np.full(len(x), -1)
    kept: list[int] = []
    for j in range(len(x)):
        for i in kept:
            if float(np.dot(x[i], x[j])) > threshold:
                parent[j] = i
                break
        else:
            kept.append(j)
    return parent


def clustered(rng: np.random.Generator, n: int, copies: int, dim: int = 16) -> np.ndarray:
    base = rng.normal(size=(n, dim))
    noise = rng.uniform(0.02, 0.4, size=(copies, 1))
    copies_of = base[rng.integers(0, n, copies)] + noise * rng.normal(size=(copies, dim))
    x = np.concatenate([base, copies_of])[rng.permutation(n + copies)]
    return unit_rows(x, np.float64)


@pytest.mark.parametrize("block", [1, 3, 17, 64, 512])
def test_absorbers_follow_the_sequential_rule(block, monkeypatch):
    monkeypatch.setattr(semdedup, "BLOCK", block)
    monkeypatch.setattr(semdedup, "KEPT_CHUNK", 5)  # several chunks of earlier kept rows
    rng = np.random.default_rng(block)
    for _ in range(5):
        x = clustered(rng, 80, 120)
        expected = sequential_greedy(x, 0.95)
        np.testing.assert_array_equal(semdedup.absorbers(x, 0.95), expected)
    assert (expected >= 0).sum() > 20  # the case is not trivial


def test_threshold_is_strict_and_decided_exactly():
    """cos == 1 − ε stays; the next float64 above it is dropped, even far below float32's grain."""
    t = 0.95
    above = np.nextafter(t, 2.0)
    rows = [[1.0, 0.0, 0.0]]
    for cos in (t, above, np.nextafter(t, 0.0)):
        rows.append([cos, np.sqrt(1 - cos * cos), 0.0])
    x = np.array(rows)
    assert float(x[2] @ x[0]) > t and float(x[1] @ x[0]) == t  # the vectors say what they mean
    parent = semdedup.absorbers(x, t)
    # row 2 (just above) joins row 0; rows 1 and 3 stay; rows 1-3 are within 1e-15 of each other
    assert parent.tolist() == [-1, -1, 0, 1]


def test_a_chain_keeps_one_survivor_per_group_and_never_drops_everyone():
    """A~B, B~C, A!~C: B is absorbed by A; C is not near any kept row, so it stays.

    The reference SemDeDup code drops C too (similar to an earlier row, kept or not)."""
    angle = np.arccos(0.96)
    x = np.array([[np.cos(k * angle), np.sin(k * angle)] for k in range(3)])
    assert x[0] @ x[2] < 0.95 < x[0] @ x[1]
    assert semdedup.absorbers(x, 0.95).tolist() == [-1, 0, -1]
    same = np.repeat(x[:1], 6, axis=0)
    assert semdedup.absorbers(same, 0.95).tolist() == [-1, 0, 0, 0, 0, 0]


def test_nan_and_zero_vectors_never_match():
    x = unit_rows(np.array([[1.0, 0.0], [0.0, 0.0], [np.nan, 1.0], [1.0, 0.0]]), np.float64)
    assert semdedup.absorbers(x, 0.95).tolist() == [-1, -1, -1, 0]


def test_pairs_between_finds_every_pair_above_the_threshold(monkeypatch):
    monkeypatch.setattr(semdedup, "BLOCK", 7)
    monkeypatch.setattr(semdedup, "KEPT_CHUNK", 11)
    rng = np.random.default_rng(5)
    a = clustered(rng, 40, 30)
    b = unit_rows(
        np.concatenate([a[:30] + 0.2 * rng.normal(size=(30, 16)), clustered(rng, 20, 5)]),
        np.float64,
    )
    i, j = semdedup.pairs_between(a, b, 0.9)
    expected = np.argwhere(a @ b.T > 0.9)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(map(tuple, expected.tolist()))
    assert len(expected) > 0


def test_the_rule_on_a_graph_is_the_rule_on_vectors():
    """Given every pair above the threshold as edges, the graph rule decides as ``absorbers``."""
    x = clustered(np.random.default_rng(9), 60, 90)
    names = [f"r{i:03d}" for i in range(len(x))]
    i, j = np.nonzero(np.triu(x @ x.T, 1) > 0.95)
    parent = semdedup.absorb_on_graph(names, [(names[a], names[b]) for a, b in zip(i, j)])
    expected = semdedup.absorbers(x, 0.95)
    assert parent == {names[k]: names[p] for k, p in enumerate(expected) if p >= 0}
    # A chain: B joins A; C (close to B only) stays, as B is gone; D joins C.
    edges = [("b", "a"), ("c", "b"), ("d", "c")]
    assert semdedup.absorb_on_graph(list("abcde"), edges) == {"b": "a", "d": "c"}


def test_survivor_order_is_score_then_uid_with_missing_scores_last():
    uids = ["b" * 32, "a" * 32, "c" * 32, "d" * 32, "e" * 32, "0" * 32]
    scores = np.array([0.5, 0.5, np.nan, 0.9, -0.0, np.nan])
    order = survivor_order(uids, scores)
    assert [uids[i][0] for i in order] == ["d", "a", "b", "e", "0", "c"]


def test_assignment_does_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    centroids = unit_rows(rng.normal(size=(40, 32)), np.float32)
    x = unit_rows(rng.normal(size=(3000, 32)), np.float32)
    first, second = semdedup.assign(x, centroids)
    for size in (1, 7, 1024, 1500):
        parts = [semdedup.assign(x[i : i + size], centroids) for i in range(0, len(x), size)]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), first)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), second)
    ranked = np.argsort(-(x @ centroids.T), axis=1, kind="stable")
    np.testing.assert_array_equal(first, ranked[:, 0])
    np.testing.assert_array_equal(second, ranked[:, 1])
    assert (semdedup.assign(x, centroids[:1])[1] == -1).all()


def test_kmeans_is_reproducible_from_the_seed():
    rng = np.random.default_rng(1)
    sample = unit_rows(rng.normal(size=(2000, 16)), np.float32)
    a = semdedup.train_centroids(sample, 10, 10, seed=3)
    np.testing.assert_array_equal(a, semdedup.train_centroids(sample, 10, 10, seed=3))
    assert a.shape == (10, 16) and not np.array_equal(
        a, semdedup.train_centroids(sample, 10, 10, 4)
    )
    assert semdedup.train_centroids(sample[:3], 10, 10, seed=3).shape == (3, 16)  # k <= rows


def test_decisions_regroup_followers_and_leave_earlier_drops_alone():
    u = [f"{i:032x}" for i in range(5)]
    batch = pa.table(
        {
            "uid": u,
            "keep": [True, True, False, False, True],
            "dropped_by": [None, None, "image_size", "dedup_exact", None],
            "dup_group": pa.array([None, group_id(u[1]), None, group_id(u[1]), None], pa.int64()),
        }
    )
    # Row 1 (an exact survivor, row 3 its copy) is absorbed by row 0; row 2 was dropped before.
    decisions = pa.table(
        {
            "uid": [u[0], u[1], u[2]],
            "dup_group": [group_id(u[0])] * 3,
            "drop": [False, True, True],
        },
        DECISIONS,
    )
    regroup = pa.table({"old": [group_id(u[1])], "new": [group_id(u[0])]}, REGROUP)
    out = apply_decisions(batch, decisions, "dedup_semantic", regroup).to_pydict()
    assert out["keep"] == [True, False, False, False, True]
    assert out["dropped_by"] == [None, "dedup_semantic", "image_size", "dedup_exact", None]
    assert out["dup_group"][:4] == [group_id(u[0])] * 4 and out["dup_group"][4] is None


def test_decisions_made_by_several_tasks_are_those_made_at_once():
    """Each bucket decides its rows, the cross-cluster task the survivors it moved (and their
    new heads): together, every row once, in the group of its final survivor."""
    from curate.dedup.decisions import PARENTS, final_decisions

    def parents(pairs: str) -> pa.Table:
        return pa.table({"uid": list(pairs[::2]), "parent": list(pairs[1::2])}, PARENTS)

    moved = parents("dazf")  # survivors d and z absorbed across clusters, into a and f
    tasks = [final_decisions(parents(b), moved) for b in ("baca", "edhd", "gf")]
    tasks.append(final_decisions(moved))
    decisions = pa.concat_tables(d for d, _ in tasks).to_pylist()
    regroup = pa.concat_tables(r for _, r in tasks).to_pylist()
    assert len({d["uid"] for d in decisions}) == len(decisions)  # nobody decided twice
    final = {u: "a" for u in "bcdeh"} | {u: "f" for u in "gz"}
    assert {d["uid"]: (d["dup_group"], d["drop"]) for d in decisions} == {
        **{u: (group_id(f), True) for u, f in final.items()},
        "a": (group_id("a"), False),
        "f": (group_id("f"), False),
    }
    assert {(r["old"], r["new"]) for r in regroup} == {
        (group_id(u), group_id(f)) for u, f in final.items()
    }


def test_group_ids_differ_for_uids_that_share_a_prefix():
    sequential = [f"{i:032x}" for i in range(10_000)]
    ids = {group_id(u) for u in sequential}
    assert len(ids) == len(sequential) and all(0 <= g < 2**63 for g in ids)


def test_eval_sets_in_every_accepted_form(tmp_path):
    from curate.core.config import ConfigError
    from curate.io.image_sets import find_beside_input, read_image_set

    pool = tmp_path / "pool"
    (pool / "eval" / "sub").mkdir(parents=True)
    (pool / "eval" / "b.jpg").write_bytes(b"jpeg b")
    (pool / "eval" / "sub" / "a.PNG").write_bytes(b"png a")
    (pool / "eval" / "notes.txt").write_text("not an image")
    found = find_beside_input("eval", pool / "urls.parquet")  # relative: beside the input first
    assert found == pool / "eval"
    table = read_image_set(found)
    assert table.to_pydict() == {"name": ["b.jpg", "sub/a.PNG"], "image": [b"jpeg b", b"png a"]}

    hf = tmp_path / "hf.parquet"  # Hugging Face datasets' Image feature: a {bytes, path} struct
    pq.write_table(pa.table({"image": [{"bytes": b"x", "path": "p.jpg"}], "path": ["p.jpg"]}), hf)
    assert read_image_set(hf).to_pydict() == {"name": ["p.jpg"], "image": [b"x"]}

    vectors = tmp_path / "vectors.parquet"
    pq.write_table(pa.table({"image_embedding": [[1.0, 0.0], [0.0, 1.0]]}), vectors)
    assert read_image_set(vectors)["name"].to_pylist() == ["0", "1"]

    with pytest.raises(ConfigError, match="no such file"):
        find_beside_input("missing", pool / "urls.parquet")
    with pytest.raises(ConfigError, match="needs one of the columns"):
        pq.write_table(pa.table({"text": ["a"]}), tmp_path / "text.parquet")
        read_image_set(tmp_path / "text.parquet")
    with pytest.raises(ConfigError, match="not a folder or a readable Parquet"):
        (tmp_path / "junk.parquet").write_bytes(b"junk")
        read_image_set(tmp_path / "junk.parquet")
    with pytest.raises(ConfigError, match="no image files"):
        (tmp_path / "empty").mkdir()
        read_image_set(tmp_path / "empty")
