"""DataComp's image-based filter and its intersection with the CLIP-score top 30 %.

A DataComp-style pool (metadata parquet + .npz ``l14_img``) with planted
structure: unit vectors around six far-apart directions, reference vectors near
two of them, and captions that DataComp's caption filter drops (French, one
word). The recipes run through the runner; their decisions are checked against
the planted truth and against DataComp's rule computed here directly with
numpy and faiss.
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.config import ConfigError, build
from curate.core.filtering import apply_filters
from curate.core.operators import FILTERS, FitContext, load_registry
from curate.core.recipe import load_recipe
from curate.core.schema import stable_uid
from curate.engine.local import LocalEngine
from curate.filters.datacomp_image import ASSIGNMENTS, CENTROIDS, FIT_JSON, REFERENCE
from curate.runner import run_recipe

load_registry()
DIM = 16
DIRECTIONS = 6
TARGETS = (0, 3)  # the directions the reference set is near
K = 24  # clusters: several per direction, so k-means has no bad local optimum to fall into
ENGLISH = [
    "a photo of a small dog playing in the park",
    "a red car parked on a quiet street at night",
    "a bowl of fresh fruit on a wooden kitchen table",
    "two cats sleeping on a sofa in the afternoon sun",
]
FRENCH = "un petit chien qui joue dans le parc avec un ballon rouge"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_pool(folder: Path, n: int = 600, n_files: int = 1, seed: int = 0) -> dict:
    """DataComp metadata whose l14_img vectors cluster around DIRECTIONS directions; the truth."""
    rng = np.random.default_rng(seed)
    directions = unit(rng.normal(size=(DIRECTIONS, DIM)))
    label = np.arange(n) % DIRECTIONS
    vectors = unit(directions[label] + rng.normal(scale=0.08, size=(n, DIM))).astype(np.float16)
    text = [ENGLISH[i % len(ENGLISH)] for i in range(n)]
    for i in range(n):
        if i % 10 == 7:
            text[i] = FRENCH  # fastText: fr
        elif i % 10 == 3:
            text[i] = "dog"  # one token, three characters
    scores = rng.random(n, dtype=np.float32)
    scores[rng.choice(n, 12, replace=False)] = np.nan
    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(n)]
    uids = [stable_uid(u, t) for u, t in zip(urls, text)]
    table = pa.table(
        {
            "uid": uids,
            "url": urls,
            "text": text,
            "clip_l14_similarity_score": pa.array(scores, pa.float32()),
        }
    )
    folder.mkdir(parents=True)
    for i, (lo, hi) in enumerate(itertools.pairwise(np.linspace(0, n, n_files + 1).astype(int))):
        pq.write_table(table.slice(lo, hi - lo), folder / f"{i:07d}.parquet")
        part = vectors[lo:hi]
        np.savez(folder / f"{i:07d}.npz", l14_img=part, l14_txt=part, b32_img=part, b32_txt=part)
    passes = np.array([t in ENGLISH for t in text])
    return {"uids": np.array(uids), "label": label, "vectors": vectors, "scores": scores,
            "caption": passes}  # fmt: skip


def write_reference(path: Path, truth: dict, seed: int = 1) -> np.ndarray:
    """Near copies of the pool's rows around TARGETS, as a Parquet of float32 vectors."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(np.isin(truth["label"], TARGETS))
    ref = truth["vectors"][rows].astype(np.float32) + rng.normal(scale=1e-3, size=(len(rows), DIM))
    ref = ref.astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(ref.ravel()), DIM)
    pq.write_table(pa.table({"name": [f"ref{i}" for i in rows], "embedding": column}), path)
    return ref


def recipe(name: str, reference: Path, *more: str):
    image = "image_based.datacomp_image"
    return load_recipe(name, [f"{image}.reference={reference}", f"{image}.clusters={K}", *more])


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, dict, Path, np.ndarray]:
    root = tmp_path_factory.mktemp("image_based")
    truth = write_pool(root / "pool")
    ref = write_reference(root / "in1k.parquet", truth)
    return root / "pool", truth, root / "in1k.parquet", ref


@pytest.fixture(scope="module")
def image_run(pool, tmp_path_factory) -> Path:
    folder, _, reference, _ = pool
    run = tmp_path_factory.mktemp("image_based") / "run"
    run_recipe(recipe("datacomp_image", reference), folder, run, engine="local")
    return run


def ledger(run: Path) -> dict[str, dict]:
    columns = ["uid", "keep", "dropped_by"]
    return {r["uid"]: r for r in pq.read_table(run / "ledger", columns=columns).to_pylist()}


def stats(run: Path) -> Path:
    (folder,) = (run / "stages").glob("*_image_based/_stats/filter-datacomp_image")
    return folder


# --- DataComp's rule, computed directly ---------------------------------------------------------


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """image_based_clustering.train_kmeans with a CPU index."""
    clustering = faiss.Clustering(x.shape[1], k)
    clustering.niter, clustering.seed, clustering.max_points_per_centroid = 20, seed, 10_000_000
    clustering.train(np.ascontiguousarray(x, np.float32), faiss.IndexFlatL2(x.shape[1]))
    return faiss.vector_float_to_array(clustering.centroids).reshape(k, x.shape[1])


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """get_centroid_ids_gpu: argmax of the inner product, in float32."""
    return np.argmax(x.astype(np.float32) @ centroids.T, axis=1)


def image_based(truth: dict, ref: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DataComp's image-based decision per row, with k-means on the rows ``train`` marks
    (in uid order, as the filter feeds them); and the centroids."""
    order = np.argsort(truth["uids"][train])
    centroids = kmeans(truth["vectors"][train][order].astype(np.float32), K)
    targets = np.unique(nearest(ref, centroids))
    return np.isin(nearest(truth["vectors"], centroids), targets), centroids


# --- the image-based recipe ----------------------------------------------------------------------


def test_rows_near_the_reference_are_kept_the_rest_dropped(pool, image_run):
    _, truth, _, ref = pool
    rows = ledger(image_run)
    caption = truth["caption"]
    target = np.isin(truth["label"], TARGETS)
    reasons = [rows[u]["dropped_by"] for u in truth["uids"]]
    kept = np.array([rows[u]["keep"] for u in truth["uids"]])
    assert kept.tolist() == (caption & target).tolist()
    assert {reasons[i] for i in np.flatnonzero(caption & ~target)} == {"datacomp_image"}
    assert {reasons[i] for i in np.flatnonzero(~caption)} == {"caption_words", "language"}
    assert reasons[3] == "caption_words" and reasons[7] == "language"

    expected, centroids = image_based(truth, ref, caption)  # k-means on the captioned rows
    assert kept.tolist() == (caption & expected).tolist()
    folder = stats(image_run)
    assert np.array_equal(np.load(folder / CENTROIDS), centroids)
    about = json.loads((folder / FIT_JSON).read_text())
    assert about["embeddings"] == "l14_img" and about["clusters"] == K
    assert about["trained_on"] == about["alive"] == about["assigned"] == caption.sum()
    assert about["kept"] == kept.sum() and about["reference_items"] == len(ref)
    assigned = pq.read_table(folder / ASSIGNMENTS).to_pydict()
    index = {u: i for i, u in enumerate(truth["uids"])}
    clusters = nearest(truth["vectors"], centroids)
    assert assigned["cluster"] == [clusters[index[u]] for u in assigned["uid"]]
    assert pq.read_table(folder / REFERENCE).num_rows == len(ref)


# --- the intersection with the CLIP score ---------------------------------------------------------


def test_intersect_keeps_image_based_and_top_30_percent_of_the_whole_pool(pool, tmp_path):
    folder, truth, reference, ref = pool
    run = tmp_path / "run"
    run_recipe(recipe("datacomp_image_clip", reference), folder, run, engine="local")
    rows = ledger(run)

    scores, caption = truth["scores"], truth["caption"]
    n = int(len(scores) * 0.3)  # get_threshold, over the whole pool
    top = scores >= -np.sort(-scores)[n]
    image, centroids = image_based(truth, ref, caption)  # centroids: before the score cut
    expected = top & caption & image
    kept = np.array([rows[u]["keep"] for u in truth["uids"]])
    assert kept.tolist() == expected.tolist()
    assert 0 < expected.sum() < (top & caption).sum() < caption.sum()
    reasons = np.array([rows[u]["dropped_by"] for u in truth["uids"]], dtype=object)
    assert set(reasons[caption & ~top]) == {"clip_score_top_fraction"}
    assert set(reasons[caption & top & ~image]) == {"datacomp_image"}

    folder_stats = stats(run)
    assert np.array_equal(np.load(folder_stats / CENTROIDS), centroids)
    about = json.loads((folder_stats / FIT_JSON).read_text())
    assert about["also_dropped_by"] == {"clip_score_top_fraction": (caption & ~top).sum()}
    assert about["trained_on"] == caption.sum() and about["alive"] == (caption & top).sum()
    # Without kmeans_also_dropped_by, k-means would see only the rows above the cut.
    _, narrow = image_based(truth, ref, caption & top)
    assert not np.array_equal(narrow, centroids)


@pytest.mark.slow
def test_identical_on_ray_and_across_file_boundaries(pool, image_run, tmp_path, ray_local):
    _, _, reference, _ = pool
    folder = tmp_path / "pool3"
    write_pool(folder, n_files=3)
    run = tmp_path / "ray"
    run_recipe(recipe("datacomp_image", reference), folder, run, engine="ray")
    columns = ["uid", "keep", "dropped_by"]
    on_ray = pq.read_table(run / "ledger", columns=columns).sort_by("uid")
    local = pq.read_table(image_run / "ledger", columns=columns).sort_by("uid")
    assert on_ray.equals(local.cast(on_ray.schema))
    assert np.array_equal(np.load(stats(run) / CENTROIDS), np.load(stats(image_run) / CENTROIDS))


def test_given_centroids_skip_kmeans(pool, image_run, tmp_path):
    """DataComp's own centroids (a .npy): the same decisions as the k-means that made them."""
    folder, _, reference, _ = pool
    np.save(tmp_path / "centroids.npy", np.load(stats(image_run) / CENTROIDS))
    image = "image_based.datacomp_image"
    overrides = [f"{image}.centroids={tmp_path / 'centroids.npy'}", f"{image}.clusters=null"]
    run = tmp_path / "run"
    run_recipe(load_recipe("datacomp_image", [f"{image}.reference={reference}", *overrides]),
               folder, run, engine="local")  # fmt: skip
    assert ledger(run) == ledger(image_run)
    assert "trained_on" not in json.loads((stats(run) / FIT_JSON).read_text())


# --- a clip stage's embeddings, images as the reference, and errors ------------------------------


def hand_run(tmp_path: Path, vectors: np.ndarray, alive: list[bool]) -> tuple[Path, Path]:
    """RUN/embeddings/ as the clip stage leaves it, and a ledger with clip_score."""
    uids = [f"{i:032x}" for i in range(len(vectors))]
    emb = tmp_path / "run" / "embeddings"
    emb.mkdir(parents=True)
    x = vectors.astype(np.float16)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table({"uid": uids, "image_embedding": column}), emb / "part-00000.parquet")
    table = pa.table(
        {
            "uid": uids,
            "clip_score": pa.array(np.zeros(len(uids)), pa.float32()),
            "keep": alive,
            "dropped_by": pa.array([None if a else "earlier" for a in alive], pa.string()),
        }
    )
    pq.write_table(table, tmp_path / "ledger.parquet")
    return tmp_path / "run", tmp_path / "ledger.parquet"


def fit(run: Path, ledger_file: Path, stats_dir: Path, **params):
    flt = build(FILTERS["datacomp_image"], params, "test")
    stats_dir.mkdir(parents=True)
    flt.fit(FitContext([ledger_file], stats_dir, 0, run, engine=LocalEngine()))
    flt = pickle.loads(pickle.dumps(flt))  # as shipped to a Ray worker
    flt.load(stats_dir)  # as each worker does, once
    return flt


def test_reference_images_are_embedded_with_the_pools_model(tmp_path):
    """A folder of images, embedded with the clip stage's model: pool rows holding exactly
    those images' vectors are kept; rows far from them are not."""
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from curate.clip.model_configs import register_model_configs
    from curate.clip.pool import embed_images, prepare_model

    register_model_configs()
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    model = open_clip.create_model("curate-tiny").eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    images = tmp_path / "reference"
    images.mkdir()
    for i, colour in enumerate(["red", "blue", "yellow"]):
        Image.new("RGB", (64, 48), colour).save(images / f"{i}.png")
    files = sorted(images.glob("*.png"))
    table = pa.table({"name": [p.name for p in files], "image": [p.read_bytes() for p in files]})
    prepared = prepare_model("curate-tiny", str(weights))
    seen = embed_images(table, tmp_path / "work", prepared, LocalEngine())["image_embedding"]
    mine = np.asarray(seen.to_pylist(), np.float32)
    away = unit(np.random.default_rng(0).normal(size=(12, mine.shape[1]))).astype(np.float32)
    run, ledger_file = hand_run(tmp_path, np.concatenate([mine, -mine, away]), [True] * 18)
    described = {"model": "curate-tiny", "pretrained": str(weights), "embed_dim": mine.shape[1]}
    (run / "embeddings" / "_model.json").write_text(json.dumps(described))

    flt = fit(run, ledger_file, tmp_path / "stats", reference=str(images), clusters=4)
    keep = flt.keep(pq.read_table(ledger_file).select(["uid"]))
    assert keep[:3].all() and not keep[3:6].any()
    about = json.loads((tmp_path / "stats" / FIT_JSON).read_text())
    assert about["embeddings"] == "clip" and about["reference_items"] == 3
    out = apply_filters(pq.read_table(ledger_file), [flt], {})
    assert set(out["dropped_by"].to_pylist()) <= {None, "datacomp_image"}


def test_only_alive_rows_are_clustered_and_rows_without_vectors_drop(tmp_path):
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(40, 8))).astype(np.float32)
    x[5] = np.nan  # a vector nobody can judge
    alive = [i % 4 != 0 for i in range(40)]
    run, ledger_file = hand_run(tmp_path, x, alive)
    ref = tmp_path / "ref.parquet"
    pq.write_table(pa.table({"image_embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(x[:10].ravel()), 8)}), ref)  # fmt: skip
    flt = fit(run, ledger_file, tmp_path / "stats", reference=str(ref), clusters=3)
    about = json.loads((tmp_path / "stats" / FIT_JSON).read_text())
    assert about["trained_on"] == about["assigned"] == sum(alive) - 1
    assert about["no_embedding"] == 1 and about["reference_items"] == 9
    assigned = pq.read_table(tmp_path / "stats" / ASSIGNMENTS)["uid"].to_pylist()
    assert assigned == [f"{i:032x}" for i in range(40) if alive[i] and i != 5]
    assert not flt.keep(pa.table({"uid": [f"{5:032x}"]}))[0]

    # A seeded sample of 12 uids (less the one without a vector) trains k-means, the same
    # sample every time.
    for name in ("a", "b"):
        fit(run, ledger_file, tmp_path / name, reference=str(ref), clusters=3, max_train_rows=12)
    assert 10 <= json.loads((tmp_path / "a" / FIT_JSON).read_text())["trained_on"] <= 12
    assert np.array_equal(np.load(tmp_path / "a" / CENTROIDS), np.load(tmp_path / "b" / CENTROIDS))

    # Every row dropped before the stage: nothing to cluster, nothing kept.
    run, ledger_file = hand_run(tmp_path / "none", x, [False] * 40)
    fit(run, ledger_file, tmp_path / "c", reference=str(ref), clusters=3)
    about = json.loads((tmp_path / "c" / FIT_JSON).read_text())
    assert about["alive"] == about["kept"] == 0


@pytest.mark.parametrize(
    "params, message",
    [
        ({"clusters": 4}, "missing required key 'reference'"),
        ({"reference": "r.parquet"}, "exactly one of clusters"),
        ({"reference": "r.parquet", "clusters": 4, "centroids": "c.npy"}, "exactly one"),
        ({"reference": "r.parquet", "clusters": 0}, "clusters must be at least 1"),
        ({"reference": "", "clusters": 4}, "reference must name"),
    ],
)
def test_parameters_are_checked(params, message):
    with pytest.raises(ConfigError, match=message):
        build(FILTERS["datacomp_image"], params, "test")


def test_configuration_errors_are_clear(tmp_path):
    x = unit(np.random.default_rng(0).normal(size=(10, 8))).astype(np.float32)
    run, ledger_file = hand_run(tmp_path, x, [True] * 10)
    ref = tmp_path / "ref.parquet"
    column = pa.FixedSizeListArray.from_arrays(pa.array(x[:2, :4].ravel()), 4)
    pq.write_table(pa.table({"embedding": column}), ref)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (run, {"reference": "missing.parquet"}, "reference 'missing.parquet': no such file"),
        (tmp_path / "norun", {"reference": str(ref)}, "needs the pool's image embeddings"),
        (run, {"reference": str(ref), "embeddings": "l14"}, "needs the pool's image embeddings"),
        (run, {"reference": str(ref), "clusters": 11}, "only 10 rows .* set a smaller k"),
        (run, {"reference": str(ref)}, "4 dimensions, the pool's 8"),
        (run, {"reference": str(images)}, "set `model` and `pretrained`"),
        (run, {"reference": str(empty)}, "reference: .*: no image files"),
    ]
    for i, (where, params, message) in enumerate(cases):
        with pytest.raises(ConfigError, match=message):
            fit(where, ledger_file, tmp_path / f"s{i}", **{"clusters": 2, **params})
