"""The bundled synthetic web pool: every defect is real, the ground truth is exact, bytes repeat.

Most tests read the session's ``demo_pool`` (500 rows, seed 0) and check the
manifest against the files themselves: decoded sizes, bytes, pixels, what the
loopback server answers, and what the real fastText model says of captions.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import curate.demo.pool as pool_module
from curate.annotators.language import _predict, load_model
from curate.cli import main
from curate.core.config import ConfigError
from curate.core.schema import stable_uid
from curate.demo import (
    DEFECTS,
    VOCABULARY,
    DefectRates,
    defect_counts,
    generate_pool,
    load_manifest,
    write_url_list,
)
from curate.demo.plan import COPIES, plan_pool
from curate.demo.scene import HEAD_COLOURS, TAIL_COLOURS
from curate.demo.vocab import RGB, SHAPES
from curate.filters.boilerplate import boilerplate_mask
from curate.io.eval_tasks import read_tasks

ENTRY_KEYS = {
    "uid", "path", "caption", "defect", "language", "duplicate_of", "caption_of",
    "width", "height", "concepts", "background",
}  # fmt: skip


@pytest.fixture(scope="module")
def manifest(demo_pool: Path) -> dict:
    return load_manifest(demo_pool)


def rows_with(manifest: dict, *defects: str | None) -> list[dict]:
    return [row for row in manifest["rows"] if row["defect"] in defects]


def decode(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def thumb(path: Path, side: int = 16) -> np.ndarray:
    """Box-averaged thumbnail: fine stripes and dots average out, layout and colours stay."""
    image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BOX)
    return np.asarray(image, np.float32)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


# --- determinism --------------------------------------------------------------------


def test_same_seed_same_bytes_another_seed_other_bytes(tmp_path):
    a = tree(generate_pool(tmp_path / "a", size=150, seed=5, eval_size=24))
    b = tree(generate_pool(tmp_path / "b", size=150, seed=5, eval_size=24))
    c = tree(generate_pool(tmp_path / "c", size=150, seed=6, eval_size=24))
    assert a == b
    assert "manifest.json" in a and "eval/labels.parquet" in a and "eval/suite.yaml" in a
    files = ("pairs.parquet", "manifest.json", "images/000000.jpg", "eval/labels.parquet")
    for name in (*files, "eval/shape/test/0.tar", "eval/retrieval.parquet"):
        assert c.get(name) != a[name], name


def test_worker_processes_write_the_same_bytes(tmp_path, monkeypatch):
    serial = generate_pool(tmp_path / "serial", size=60, seed=2, eval_size=12, workers=1)
    monkeypatch.setattr(pool_module, "PARALLEL_FROM", 0)
    monkeypatch.setattr(pool_module, "CHUNK", 16)
    parallel = generate_pool(tmp_path / "parallel", size=60, seed=2, eval_size=12, workers=2)
    assert tree(serial) == tree(parallel)


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "pool").mkdir()
    with pytest.raises(FileExistsError):
        generate_pool(tmp_path / "pool", size=10)
    assert not (tmp_path / "pool.partial").exists()


@pytest.mark.parametrize(
    "args", [{"size": 0}, {"size": -5}, {"size": 10, "seed": -1}, {"size": 10, "eval_size": -1}]
)
def test_sizes_and_seeds_out_of_range_are_refused(tmp_path, args):
    with pytest.raises(ConfigError, match="a pool needs size ≥ 1, eval_size ≥ 0 and seed ≥ 0"):
        generate_pool(tmp_path / "pool", **args)
    assert list(tmp_path.iterdir()) == []


# --- the manifest -------------------------------------------------------------------


def test_manifest_matches_pairs_and_uids_hash_path_and_caption(demo_pool, manifest):
    rows = manifest["rows"]
    assert manifest["seed"] == 0 and manifest["size"] == len(rows) == 500
    assert manifest["vocabulary"] == {k: list(v) for k, v in VOCABULARY.items()}
    assert manifest["defects"] == list(DEFECTS)
    pairs = pq.read_table(demo_pool / "pairs.parquet")
    assert pairs.column_names == ["uid", "path", "caption"]
    assert pairs.to_pylist() == [{k: r[k] for k in ("uid", "path", "caption")} for r in rows]
    uids = [r["uid"] for r in rows]
    assert len(set(uids)) == len(uids)
    for row in rows:
        assert set(row) == ENTRY_KEYS
        assert re.fullmatch(r"[0-9a-f]{32}", row["uid"])
        assert row["uid"] == stable_uid(row["path"], row["caption"])
        assert row["defect"] is None or row["defect"] in DEFECTS
        assert (row["language"] is not None) == (row["defect"] == "non_english")
        duplicate = row["defect"] in ("exact_duplicate", "near_duplicate")
        assert (row["duplicate_of"] is not None) == duplicate
        assert (row["caption_of"] is not None) == (row["defect"] == "mismatched")


def test_every_defect_count_is_its_rate_times_the_size(manifest):
    counts = defect_counts(manifest)
    expected = DefectRates().counts(500)
    assert {k: v for k, v in counts.items() if k != "clean"} == expected
    assert all(n > 0 for n in expected.values())
    assert counts["clean"] == 500 - sum(expected.values()) > 300


def test_rates_are_validated():
    with pytest.raises(ValueError, match="not in"):
        DefectRates(tiny=1.5)
    with pytest.raises(ValueError, match=r"more than 0\.9"):
        DefectRates(mismatched=0.5, boilerplate=0.5)


# --- images -------------------------------------------------------------------------


def test_clean_images_are_jpegs_of_moderate_size_as_recorded(demo_pool, manifest):
    for row in rows_with(manifest, None):
        image = decode(demo_pool / row["path"])
        w, h = image.size
        assert image.format == "JPEG" and (w, h) == (row["width"], row["height"])
        assert min(w, h) >= 224 and max(w, h) <= 512 and max(w, h) / min(w, h) <= 2


def test_tiny_images_are_thumbnails_and_banners_strips_of_their_scene(demo_pool, manifest):
    """Both fail DataComp's size rules and show less of their caption than a clean image."""
    tiny, banners = rows_with(manifest, "tiny"), rows_with(manifest, "banner")
    assert tiny and banners
    for row in tiny:
        w, h = decode(demo_pool / row["path"]).size
        assert (w, h) == (row["width"], row["height"]) and 32 <= min(w, h) <= 96
    for row in banners:
        image = decode(demo_pool / row["path"])
        w, h = image.size
        assert (w, h) == (row["width"], row["height"])
        assert 200 <= h <= 260 and 3.1 < w / h <= 4.6


def test_a_banner_cuts_off_most_of_the_objects_its_caption_names():
    rows = plan_pool(2_000, DefectRates(), np.random.default_rng(0))
    whole = cut = 0
    for row in rows:
        if row.defect == "banner":
            _, scene, _, top, height = row.job
            for o in scene.objects:
                inside = top <= o.y - o.radius and o.y + o.radius <= top + height
                whole, cut = whole + inside, cut + (not inside)
    assert cut > 2 * whole, (cut, whole)


def test_duplicates_over_weight_a_few_scenes(manifest):
    copies = rows_with(manifest, "exact_duplicate", "near_duplicate")
    sources = Counter(r["duplicate_of"] for r in copies)
    assert len(sources) == -(-len(copies) // (COPIES - 1))  # ~COPIES rows per scene
    assert max(sources.values()) >= COPIES - 1


def test_exact_duplicates_are_the_same_bytes_of_a_clean_row(demo_pool, manifest):
    by_uid = {r["uid"]: r for r in manifest["rows"]}
    for row in rows_with(manifest, "exact_duplicate"):
        source = by_uid[row["duplicate_of"]]
        assert source["defect"] is None and source["path"] != row["path"]
        assert (demo_pool / row["path"]).read_bytes() == (demo_pool / source["path"]).read_bytes()
        assert row["concepts"] == source["concepts"]


def test_near_duplicates_differ_in_bytes_but_their_source_is_the_closest_image(demo_pool, manifest):
    by_uid = {r["uid"]: r for r in manifest["rows"]}
    clean = rows_with(manifest, None)
    thumbs = np.stack([thumb(demo_pool / r["path"]) for r in clean])
    index = {r["uid"]: i for i, r in enumerate(clean)}
    near = rows_with(manifest, "near_duplicate")
    assert near
    for row in near:
        source = by_uid[row["duplicate_of"]]
        data, source_data = (
            (demo_pool / row["path"]).read_bytes(),
            (demo_pool / source["path"]).read_bytes(),
        )
        assert data != source_data
        distance = np.abs(thumbs - thumb(demo_pool / row["path"])).mean(axis=(1, 2, 3))
        assert distance[index[source["uid"]]] < 20  # of 255
        assert distance.argmin() == index[source["uid"]]
        assert min(row["width"], row["height"]) >= 200


def test_broken_corrupt_and_html_rows_hold_no_image(demo_pool, manifest):
    for row in rows_with(manifest, "broken_url"):
        assert not (demo_pool / row["path"]).exists()
    for row in rows_with(manifest, "corrupt"):
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError
            decode(demo_pool / row["path"])
    for row in rows_with(manifest, "html"):
        assert row["path"].endswith(".jpg")
        assert (
            (demo_pool / row["path"])
            .read_bytes()
            .lstrip()
            .lower()
            .startswith((b"<!doctype", b"<html"))
        )
    for row in rows_with(manifest, "broken_url", "corrupt", "html"):
        assert row["concepts"] is row["width"] is row["background"] is None


# --- captions -----------------------------------------------------------------------


def words(caption: str) -> int:
    return len(caption.split())


def test_caption_lengths_and_boilerplate(manifest):
    clean_like = rows_with(manifest, None, "tiny", "banner", "exact_duplicate", "near_duplicate")
    assert all(4 <= words(r["caption"]) <= 15 for r in clean_like)
    assert all(1 <= words(r["caption"]) <= 2 for r in rows_with(manifest, "short_caption"))
    assert all(words(r["caption"]) > 20 for r in rows_with(manifest, "long_caption"))
    boilerplate = [r["caption"] for r in rows_with(manifest, "boilerplate")]
    assert all(words(c) <= 2 for c in boilerplate)
    assert all(boilerplate_mask(pa.array(boilerplate)).to_pylist())
    assert Counter(boilerplate).most_common(1)[0][1] >= 5  # the same alt-text on many rows
    assert not any(boilerplate_mask(pa.array([r["caption"] for r in clean_like])).to_pylist())


def test_mismatched_captions_belong_to_another_image_with_no_shape_in_common(manifest):
    by_uid = {r["uid"]: r for r in manifest["rows"]}
    for row in rows_with(manifest, "mismatched"):
        donor = by_uid[row["caption_of"]]
        assert donor["defect"] is None and row["caption"] == donor["caption"]
        assert not {c["shape"] for c in row["concepts"]} & {c["shape"] for c in donor["concepts"]}


def test_fasttext_reads_english_as_english_and_translations_as_not(manifest):
    model = load_model()
    english = rows_with(
        manifest, None, "mismatched", "long_caption", "exact_duplicate", "near_duplicate"
    )
    labels, _ = _predict(model, [r["caption"] for r in english])
    assert labels.count("__label__en") / len(labels) >= 0.98
    foreign = rows_with(manifest, "non_english")
    assert {r["language"] for r in foreign} == {"fr", "de", "es"}
    labels, _ = _predict(model, [r["caption"] for r in foreign])
    assert sum(label != "__label__en" for label in labels) / len(labels) >= 0.95


# --- concepts -----------------------------------------------------------------------


def test_the_head_shape_is_in_most_clean_images_and_the_tail_in_few(manifest):
    clean = rows_with(manifest, None)
    share = {s: sum(any(c["shape"] == s for c in r["concepts"]) for r in clean) / len(clean)
             for s in SHAPES}  # fmt: skip
    assert share[SHAPES[0]] > 0.5
    assert max(share[s] for s in SHAPES[-3:]) < share[SHAPES[0]] / 8


def test_object_colours_follow_a_long_tail_and_backgrounds_do_not(manifest):
    clean = rows_with(manifest, None)
    objects = Counter(c["colour"] for row in clean for c in row["concepts"])
    total = sum(objects.values())
    assert sum(objects[c] for c in HEAD_COLOURS) / total > 0.75, objects
    assert all(objects[c] / total < 0.03 for c in TAIL_COLOURS), objects
    backgrounds = Counter(row["background"]["colour"] for row in clean)
    assert max(backgrounds.values()) < 3 * min(backgrounds.values()), backgrounds
    # a caption names the background's pattern, never its colour (no object has it)
    assert not any(row["background"]["colour"] in row["caption"].split() for row in clean)


def colour_share(image: Image.Image, colour: str, tolerance: float = 40) -> float:
    pixels = np.asarray(image.convert("RGB"), np.float32)
    return float((np.linalg.norm(pixels - RGB[colour], axis=-1) < tolerance).mean())


def test_clean_images_show_their_objects_colours(demo_pool, manifest):
    for row in rows_with(manifest, None)[:60]:
        image = decode(demo_pool / row["path"])
        for concept in row["concepts"]:
            assert colour_share(image, concept["colour"]) > 0.003, (row["path"], concept)


# --- the evaluation set -------------------------------------------------------------


def test_eval_labels_are_balanced_and_match_the_images(demo_pool, manifest):
    labels = pq.read_table(demo_pool / "eval" / "labels.parquet").to_pylist()
    assert len(labels) == 120
    assert set(labels[0]) == {"path", *VOCABULARY, "caption"}
    for attribute, names in VOCABULARY.items():
        assert {row[attribute] for row in labels} <= set(names)
    assert set(Counter(row["shape"] for row in labels).values()) == {120 // len(SHAPES)}
    assert set(Counter(row["colour"] for row in labels).values()) == {10, 11}  # 120 / 11
    pool_images = {(demo_pool / r["path"]).read_bytes()[:4096] for r in rows_with(manifest, None)}
    for row in labels:
        image = decode(demo_pool / "eval" / row["path"])
        assert min(image.size) >= 224 and max(image.size) <= 512
        assert colour_share(image, row["colour"]) > 0.005
        assert row["shape"] in row["caption"] and row["colour"] in row["caption"]
        if row["background"] == "plain":  # one colour fills most of the picture
            pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
            mode = np.median(pixels, axis=0)
            assert (np.linalg.norm(pixels - mode, axis=-1) < 12).mean() > 0.5
    eval_images = {(demo_pool / "eval" / r["path"]).read_bytes()[:4096] for r in labels}
    assert not eval_images & pool_images  # held out


def test_eval_tasks_split_the_colour_task_into_head_and_tail_colours(demo_pool):
    labels = pq.read_table(demo_pool / "eval" / "labels.parquet").to_pylist()
    tasks = {t.name: t for t in read_tasks(demo_pool / "eval")}
    assert list(tasks) == ["shape", "colour", "background", "colour_head", "colour_tail",
                           "retrieval"]  # fmt: skip
    colours = VOCABULARY["colour"]
    every = Counter(colours[s.truth] for s in tasks["colour"].samples())
    assert every == Counter(row["colour"] for row in labels)
    for name, group in (("colour_head", HEAD_COLOURS), ("colour_tail", TAIL_COLOURS)):
        assert tasks[name].classnames == tasks["colour"].classnames  # all 11 classes
        seen = Counter(colours[s.truth] for s in tasks[name].samples())
        assert seen == {c: n for c, n in every.items() if c in group}


# --- serving ------------------------------------------------------------------------


def test_the_server_fails_where_the_manifest_says(served_pool, manifest):
    base = served_pool.server.base_url
    urls = pq.read_table(served_pool.urls_path)
    assert urls.column_names == ["uid", "url", "caption"]
    assert urls["uid"].to_pylist() == [r["uid"] for r in manifest["rows"]]
    assert all(u.startswith(base + "/images/") for u in urls["url"].to_pylist())
    url = dict(zip(urls["uid"].to_pylist(), urls["url"].to_pylist()))
    expected = {
        None: (200, "image/jpeg"),
        "banner": (200, "image/jpeg"),
        "broken_url": (404, "text/plain"),
        "html": (200, "text/html; charset=utf-8"),
        "server_error": (500, "text/plain"),
    }
    for defect, (status, kind) in expected.items():
        for row in rows_with(manifest, defect)[:5]:
            got_status, got_kind, body = fetch(url[row["uid"]])
            assert (got_status, got_kind) == (status, kind), (defect, row["path"])
            if status == 200:
                assert body == (served_pool.pool_dir / row["path"]).read_bytes()
    status, _, body = fetch(url[rows_with(manifest, "corrupt")[0]["uid"]])
    assert status == 200 and body


def pairs_only(demo_pool: Path, folder: Path) -> Path:
    """A folder with the pool's pairs.parquet, so url lists written there leave the pool alone."""
    folder.mkdir()
    (folder / "pairs.parquet").write_bytes((demo_pool / "pairs.parquet").read_bytes())
    return folder


def test_url_list_follows_the_base_url(demo_pool, tmp_path):
    path = write_url_list(pairs_only(demo_pool, tmp_path / "p"), "http://127.0.0.1:9/")
    assert path == tmp_path / "p" / "urls.parquet"
    first = pq.read_table(path).slice(0, 1).to_pylist()[0]
    assert first["url"] == "http://127.0.0.1:9/images/000000.jpg"


# --- the command line ---------------------------------------------------------------


def test_cli_generate_prints_the_defect_summary(tmp_path, capsys):
    out = tmp_path / "cli_pool"
    assert main(["demo-pool", "generate", "--output", str(out), "--size", "80", "--seed", "3",
                 "--eval-size", "12"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    counts = defect_counts(load_manifest(out))
    for name, count in counts.items():
        assert re.search(rf"^{name}\s+{count}$", printed, re.MULTILINE), name
    assert main(["demo-pool", "generate", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_serve_prints_url_list_and_command_then_stops(demo_pool, tmp_path, monkeypatch, capsys):
    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("time.sleep", interrupt)  # Ctrl-C as soon as it starts waiting
    folder = pairs_only(demo_pool, tmp_path / "p")
    assert main(["demo-pool", "serve", str(folder)]) == 0
    printed = capsys.readouterr().out
    base = re.search(r"http://127\.0\.0\.1:\d+", printed).group(0)
    assert str(folder / "urls.parquet") in printed
    assert pq.read_table(folder / "urls.parquet")["url"][0].as_py().startswith(base + "/images/")
    assert "curate run pipelines/download_basic.yaml --input" in printed
    assert "--set download.allow_private_networks=true" in printed
    with pytest.raises(urllib.error.URLError):  # stopped
        urllib.request.urlopen(base + "/images/000000.jpg", timeout=2)


def test_cli_serve_refuses_a_folder_that_is_no_pool(tmp_path, capsys):
    assert main(["demo-pool", "serve", str(tmp_path)]) == 2
    assert "not a demo pool" in capsys.readouterr().err
