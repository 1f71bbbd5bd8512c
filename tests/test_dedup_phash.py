"""Perceptual-hash dedup: the hash against imagehash, the pair search against brute force, the
survivor rule against the semantic stage's, and the stage on the demo pool's real downloads,
judged by its ground-truth manifest."""

from __future__ import annotations

import io
import itertools
import shutil
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_clip_stage import DOWNLOAD, _recipe, downloaded  # noqa: F401  (a module fixture, reused)

from curate.core.config import ConfigError
from curate.core.recipe import recipe_from_data
from curate.dedup.decisions import survivor_order
from curate.dedup.phash import absorb_by_hash, bands, near_pairs, phashes
from curate.dedup.semdedup import absorb_on_graph
from curate.demo import load_manifest
from curate.runner import run_recipe


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _imagehash(data: bytes) -> int:
    bits = imagehash.phash(Image.open(io.BytesIO(data))).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def test_the_hash_is_imagehashs_phash(demo_pool):
    """Bit for bit where no JPEG is decoded in the DCT domain (PNG); about 2 bits apart on
    average for JPEGs, which are decoded straight to 64 px or more."""
    paths = sorted((demo_pool / "eval" / "images").glob("*.jpg"))[:40]
    pictures = [Image.open(p).convert("RGB") for p in paths]
    pngs = [_encoded(p, "PNG") for p in pictures]
    codes, ok = phashes(pngs)
    assert ok.all() and codes.dtype == np.uint64
    assert codes.tolist() == [_imagehash(d) for d in pngs]
    jpegs = [p.read_bytes() for p in paths]
    codes, ok = phashes(jpegs)
    distance = [bin(c ^ _imagehash(d)).count("1") for c, d in zip(codes.tolist(), jpegs)]
    assert ok.all() and np.mean(distance) <= 2.5  # measured 1.9 (max 10) on these 40


def test_an_image_that_cannot_be_decoded_is_left_unhashed(demo_pool):
    good = (demo_pool / "eval" / "images" / "000000.jpg").read_bytes()
    _, ok = phashes([good, good[:200], b"<html>", b""])
    assert ok.tolist() == [True, False, False, False]


def test_a_resized_reencoded_copy_is_a_few_bits_away(demo_pool):
    image = Image.open(demo_pool / "eval" / "images" / "000001.jpg").convert("RGB")
    copy = image.resize((image.width * 2 // 3, image.height * 2 // 3))
    (a, b), _ = phashes([_encoded(image, "JPEG"), _encoded(copy, "JPEG", quality=60)])
    assert bin(int(a) ^ int(b)).count("1") <= 4


def test_bands_cover_the_64_bits():
    for d in range(17):
        widths = [w for _, w in bands(d)]
        assert len(widths) == d + 1 and sum(widths) == 64 and max(widths) - min(widths) <= 1


@pytest.mark.parametrize("max_distance", [0, 2, 5, 9])
def test_pairs_are_every_pair_within_the_distance_once(max_distance):
    rng = np.random.default_rng(max_distance)
    base = rng.integers(0, 2**63, 50, dtype=np.uint64)
    copies = [base]
    for _ in range(5):  # copies with 0–11 bits flipped: pairs near and far from the limit
        x = base.copy()
        for bit in rng.integers(0, 64, (int(rng.integers(0, 12)), len(base))):
            x ^= np.left_shift(np.uint64(1), bit.astype(np.uint64))
        copies.append(x)
    hashes = np.unique(np.concatenate(copies))
    found = []
    for band in range(max_distance + 1):
        a, b = near_pairs(hashes, max_distance, band)
        found += [tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())]
    assert len(found) == len(set(found))  # each pair once, by its first shared band
    brute = {
        tuple(sorted((u, v)))
        for u, v in itertools.combinations(hashes.tolist(), 2)
        if bin(u ^ v).count("1") <= max_distance
    }
    assert set(found) == brute and (max_distance == 0 or brute)


def test_survivors_follow_the_semantic_stages_rule():
    """absorb_by_hash, walked by hash, equals absorb_on_graph on the rows' graph."""
    rng = np.random.default_rng(1)
    for trial in range(30):
        n = int(rng.integers(2, 40))
        hashes = rng.choice(np.arange(8, dtype=np.uint64), n)  # few hashes: many shared
        uids = [f"{i:032x}" for i in rng.permutation(1000)[:n]]
        scores = rng.choice([0.1, 0.2, 0.3, np.nan], n)
        pairs = {
            tuple(sorted(p)) for p in rng.choice(8, (int(rng.integers(0, 6)), 2)) if p[0] != p[1]
        }
        edges = (
            np.array([a for a, _ in pairs], np.uint64),
            np.array([b for _, b in pairs], np.uint64),
        )
        near = {(int(a), int(b)) for a, b in pairs} | {(int(b), int(a)) for a, b in pairs}
        graph = [
            (uids[i], uids[j])
            for i, j in itertools.combinations(range(n), 2)
            if hashes[i] == hashes[j] or (int(hashes[i]), int(hashes[j])) in near
        ]
        order = [uids[i] for i in survivor_order(uids, scores)]
        assert absorb_by_hash(uids, scores, hashes, edges) == absorb_on_graph(order, graph), trial


def _phash_run(start: Path, folder: Path, served_pool, engine="local") -> tuple[Path, object]:
    run = folder
    shutil.copytree(start, run)
    recipe = _recipe({"stage": "dedup_phash"}, name="phash_test")
    return run, run_recipe(recipe, served_pool.urls_path, run, engine=engine)


@pytest.mark.slow
def test_the_demo_pools_planted_duplicates(downloaded, tmp_path, served_pool, ray_local):  # noqa: F811
    run, result = _phash_run(downloaded, tmp_path / "run", served_pool)
    stage = result.stages[2]
    ledger = pq.read_table(run / "ledger").to_pylist()
    assert (
        stage.rows_in
        == len(ledger)
        == sum(r["keep"] for r in ledger) + sum(not r["keep"] for r in ledger)
    )
    rows = {r["uid"]: r for r in load_manifest(served_pool.pool_dir)["rows"]}
    picture = {uid: r["duplicate_of"] or uid for uid, r in rows.items()}
    dropped = [r for r in ledger if r["dropped_by"] == "dedup_phash"]
    survivor = {r["dup_group"]: r["uid"] for r in ledger if r["keep"] and r["dup_group"]}
    assert dropped and all(r["dup_group"] in survivor for r in dropped)
    right = [r for r in dropped if picture[r["uid"]] == picture[survivor[r["dup_group"]]]]
    considered = [r for r in ledger if r["keep"] or r["dropped_by"] == "dedup_phash"]
    copies = Counter(picture[r["uid"]] for r in considered)
    should = sum(n - 1 for n in copies.values())
    precision, recall = len(right) / len(dropped), len(right) / should
    print(f"dedup_phash: {len(dropped)} dropped, {len(right)} right, {should} to find")
    exact = [r for r in considered if rows[r["uid"]]["defect"] == "exact_duplicate"]
    assert exact and all(r["dup_group"] is not None for r in exact)  # the same bytes: all found
    # Measured at the default 2 bits: precision 0.81, recall 0.83. The demo's flat drawings
    # collide more than photographs do: distinct scenes share a hash (README, dedup_phash).
    assert precision >= 0.75 and recall >= 0.75
    counters = stage.counters
    assert counters["dropped"] == len(dropped) and counters["hashed"] > 0

    # The same decisions on a Ray cluster, and with the pool in 9 ledger files (pairs and
    # groups across files; 9 partitions per band).
    data = {"name": "split", "stages": [{"stage": "ingest", "rows_per_file": 60}, DOWNLOAD,
                                        {"stage": "dedup_phash"}]}  # fmt: skip
    split = tmp_path / "split"
    run_recipe(recipe_from_data(data, {}, "inline"), served_pool.urls_path, split, engine="ray")
    decided = ["uid", "keep", "dropped_by", "dup_group"]
    first = pq.read_table(run / "ledger", columns=decided).sort_by("uid")
    assert pq.read_table(split / "ledger", columns=decided).sort_by("uid") == first
    again, _ = _phash_run(downloaded, tmp_path / "again", served_pool, engine="ray")
    assert pq.read_table(again / "ledger").sort_by("uid") == pq.read_table(run / "ledger").sort_by(
        "uid"
    )


def test_it_needs_downloaded_images(tmp_path):
    data = {"name": "x", "stages": [{"stage": "ingest"}, {"stage": "dedup_phash"}]}
    pool = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/a.jpg"], "caption": ["a"]}), pool)
    with pytest.raises(ConfigError, match="dedup_phash: needs downloaded images"):
        run_recipe(recipe_from_data(data, {}, "inline"), pool, tmp_path / "run", engine="local")
