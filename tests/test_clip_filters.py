"""CLIP-score filters: unit boundaries, and uid-for-uid parity with DataComp through the runner.

The oracle is DataComp's code transcribed (mlfoundations/datacomp
``baselines/apply_filter.py``): ``get_threshold`` (``n = int(len(df) * fraction)``,
``threshold = -np.sort(-df[key].values)[n]``) over the whole pool, then
``load_uids_with_clip_score_helper`` (``df[df[key] >= threshold]``) file by file.
It reads with pandas when pandas is installed, else with pyarrow into the same
NumPy arrays (float32 scores, NaN for null: what pandas gives).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.core.config import ConfigError, build
from curate.core.filtering import apply_filters
from curate.core.layout import ledger_files
from curate.core.operators import FILTERS, FitContext, load_registry
from curate.core.recipe import load_recipe
from curate.engine.local import LocalEngine
from curate.filters.clip_score import ARTIFACT, ClipScore, ClipScoreTopFraction
from curate.runner import run_recipe

try:
    import pandas as pd
except ImportError:  # the oracle then reads with pyarrow into the same NumPy arrays
    pd = None

load_registry()
F32 = np.float32
NAN = float("nan")

# --- the oracle: DataComp's code --------------------------------------------------------------


def read_columns(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    """``pd.read_parquet(path, columns=...)`` as NumPy columns (pandas itself when installed)."""
    if pd is not None:
        df = pd.read_parquet(path, columns=columns)
        return {c: df[c].values for c in columns}
    table = pq.read_table(path, columns=columns)
    return {c: table[c].to_numpy() for c in columns}  # float32 stays float32, null -> NaN


def get_threshold(paths: list[Path], key: str, fraction: float):
    """DataComp's ``get_threshold``: the whole pool's ``key`` column, sorted descending."""
    values = np.concatenate([read_columns(p, [key])[key] for p in paths])
    n = int(len(values) * fraction)
    threshold = -np.sort(-values)[n]
    return threshold


def load_uids_with_clip_score_helper(path: Path, key: str, threshold) -> set[str]:
    """DataComp's per-parquet helper (without gcld3), uids as hex instead of (u8, u8) pairs."""
    df = read_columns(path, ["uid", key])
    return set(df["uid"][df[key] >= threshold].tolist())


def load_uids_with_clip_score(paths: list[Path], key: str, threshold, fraction) -> set[str]:
    if threshold is None:
        threshold = get_threshold(paths, key, fraction)
    out = set()
    for path in paths:
        out |= load_uids_with_clip_score_helper(path, key, threshold)
    return out


# --- unit tests on small hand-made ledgers ------------------------------------------------------


def ledger(scores, dtype=None, keep=None, column="clip_score") -> pa.Table:
    n = len(scores)
    dtype = dtype or pa.float32()
    return pa.table(
        {
            "uid": pa.array([f"{i:032x}" for i in range(n)]),
            column: pa.array(scores, dtype),
            "keep": pa.array([True] * n if keep is None else keep, pa.bool_()),
            "dropped_by": pa.nulls(n, pa.string()),
        }
    )


def write_parts(folder: Path, table: pa.Table, parts: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    files = []
    for i in range(parts):
        files.append(folder / f"part-{i:05d}.parquet")
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), files[-1])
    return files


def fitted(flt, files: list[Path], tmp_path: Path):
    stats = tmp_path / "stats"
    stats.mkdir(parents=True, exist_ok=True)
    flt.fit(FitContext(files, stats, engine=LocalEngine()))
    flt.load(stats)
    return flt


def decide(flt, table: pa.Table) -> list[int]:
    """Indices of the rows kept, the filter seeing only alive rows (as the filter stage runs it)."""
    out = apply_filters(table, [flt], {})
    return np.flatnonzero(out["keep"].to_numpy(zero_copy_only=False)).tolist()


def top_fraction(scores, fraction, tmp_path, dtype=None, keep=None, parts=1):
    table = ledger(scores, dtype, keep)
    flt = fitted(
        ClipScoreTopFraction(fraction=fraction), write_parts(tmp_path / "l", table, parts), tmp_path
    )
    return decide(flt, table), json.loads((tmp_path / "stats" / ARTIFACT).read_text())


def oracle_top_fraction(scores, fraction, dtype=np.float32, keep=None) -> list[int] | None:
    """DataComp on the alive rows; None where DataComp raises IndexError (n == len)."""
    values = np.array([NAN if s is None else s for s in scores], dtype)
    alive = np.ones(len(values), bool) if keep is None else np.array(keep)
    pool = values[alive]
    n = int(len(pool) * fraction)
    if n >= len(pool):
        with pytest.raises(IndexError):
            _ = -np.sort(-pool)[n]
        return None
    threshold = -np.sort(-pool)[n]
    return np.flatnonzero(alive & (values >= threshold)).tolist()


A = F32(0.3)
UP, DOWN = np.nextafter(A, F32(1)), np.nextafter(A, F32(0))

TOP_CASES = {
    # name: (scores, fraction, kept indices)
    "ties at the cut are all kept": ([0.5, 0.4, 0.4, 0.4, 0.1], 0.2, [0, 1, 2, 3]),
    "null and NaN count in len and sort last": ([0.9, NAN, None, 0.5, 0.3], 0.4, [0, 3, 4]),
    "n lands on NaN: nothing kept": ([0.9, NAN, None, 0.5], 0.5, []),
    "n lands on the first NaN exactly": ([0.2, 0.1, NAN, NAN], 0.5, []),
    "n lands on the last score": ([0.2, 0.1, NAN, NAN], 0.25, [0, 1]),
    "int() truncates: 100 * 0.29 is 28": ([*range(100, 0, -1)], 0.29, [*range(29)]),
    "last bit of float32": ([UP, A, DOWN, A, 0.9], 0.4, [0, 1, 3, 4]),
    "last bit, cut on the larger": ([UP, A, DOWN, 0.9], 0.25, [0, 3]),
    "negative scores, signed zeros": ([-0.1, -0.5, -0.5, 0.0, -0.0, -math.inf], 0.5, [*range(5)]),
    "signed zeros tie": ([-0.0, 0.0, 0.0, -1.0], 0.25, [0, 1, 2]),
    "infinities": ([math.inf, math.inf, 1.0, -math.inf], 0.25, [0, 1]),
    "cut on -inf keeps every score": ([1.0, -math.inf, NAN], 0.34, [0, 1]),
    "one row": ([0.2], 0.5, [0]),
    "one null row": ([None], 0.5, []),
    "all null": ([None, None, None], 0.5, []),
    "all NaN": ([NAN, NAN], 0.5, []),
}  # fmt: skip


@pytest.mark.parametrize("name", TOP_CASES)
@pytest.mark.parametrize("dtype", [pa.float32(), pa.float64()], ids=str)
def test_top_fraction_boundaries_match_datacomp(name, dtype, tmp_path):
    scores, fraction, expected = TOP_CASES[name]
    got, _ = top_fraction(scores, fraction, tmp_path, dtype)
    assert got == expected
    assert got == oracle_top_fraction(scores, fraction, dtype.to_pandas_dtype())


@pytest.mark.parametrize(
    "dtype", [pa.float32(), pa.float64(), pa.int64(), pa.int16(), pa.uint32()], ids=str
)
def test_top_fraction_over_signs_infinities_and_integers(dtype, tmp_path):
    """The radix select orders every value of the column's type as a sort would: negative
    and positive, -0.0 and 0.0, the infinities, integers of any width and signedness."""
    rng = np.random.default_rng(7)
    if pa.types.is_floating(dtype):
        scores = [*rng.normal(0, 3, 997).tolist(), -0.0, 0.0, math.inf, -math.inf, NAN, None]
    else:
        low = 0 if pa.types.is_unsigned_integer(dtype) else -(2 ** (dtype.bit_width - 1))
        scores = rng.integers(low, 2 ** (dtype.bit_width - 1) - 1, 1000).tolist()
    for i, fraction in enumerate((0.001, 0.1, 0.37, 0.5, 0.999)):
        got, _ = top_fraction(scores, fraction, tmp_path / str(i), dtype, parts=3)
        assert got == oracle_top_fraction(scores, fraction, dtype.to_pandas_dtype()), fraction


def test_top_fraction_artifact_records_the_decision(tmp_path):
    got, art = top_fraction([0.5, 0.4, 0.4, NAN, None], 0.2, tmp_path / "a")
    assert got == [0, 1, 2]
    assert art["alive_rows"] == 5 and art["scored_rows"] == 3 and art["n"] == 1
    assert art["decision"] == "threshold" and float.fromhex(art["threshold"]) == float(F32(0.4))
    _, art = top_fraction([0.5, NAN, None], 0.5, tmp_path / "b")
    assert (art["n"], art["decision"], art["threshold"]) == (1, "keep_none", None)
    _, art = top_fraction([0.5, NAN], 1.0, tmp_path / "c")
    assert (art["n"], art["decision"]) == (2, "keep_all")


@pytest.mark.parametrize("dtype", [pa.float32(), pa.float64()], ids=str)
def test_fraction_one_keeps_every_scored_row_where_datacomp_raises(dtype, tmp_path):
    scores = [0.5, None, -1.0, NAN, 0.5, -math.inf]
    got, art = top_fraction(scores, 1.0, tmp_path, dtype)
    assert got == [0, 2, 4, 5] and art["decision"] == "keep_all"
    assert oracle_top_fraction(scores, 1.0) is None  # DataComp: IndexError


def test_pool_is_the_stages_alive_rows_across_files(tmp_path):
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, NAN, 0.1]
    keep = [False, True, True, False, True, True, True, True, True, True]
    got, art = top_fraction(scores, 0.25, tmp_path, keep=keep, parts=3)
    assert art["alive_rows"] == 8 and art["n"] == 2  # rows 0 and 3 are not in the pool
    assert got == [1, 2, 4] == oracle_top_fraction(scores, 0.25, keep=keep)


def test_empty_pool_and_no_files(tmp_path):
    got, art = top_fraction([0.5, 0.4], 0.5, tmp_path / "a", keep=[False, False])
    assert got == [] and art["alive_rows"] == 0 and art["decision"] == "keep_all"
    flt = fitted(ClipScoreTopFraction(fraction=0.5), [], tmp_path / "b")
    assert decide(flt, ledger([0.5])) == [0]  # nothing fitted: no pool to cut


def test_float32_threshold_is_exact_on_a_large_pool_of_near_ties(tmp_path):
    """Values a few ulps apart around the cut, in many files: DuckDB's sort = NumPy's."""
    rng = np.random.default_rng(3)
    ulps = rng.integers(-3, 4, 20_000).astype(np.int32)
    values = (np.array(F32(0.28)).view(np.int32) + ulps).view(F32)  # 7 neighbouring floats
    values[rng.random(len(values)) < 0.05] = np.nan
    scores = values.tolist()
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.94, 0.96):
        got, art = top_fraction(scores, fraction, tmp_path / str(fraction), parts=4)
        assert got == oracle_top_fraction(scores, fraction), fraction
        if art["decision"] == "threshold":
            assert len(got) > art["n"] + 1  # many ties at the cut


# --- clip_score: a fixed threshold ----------------------------------------------------------


def test_threshold_compares_in_float32_as_datacomp_does():
    below = np.nextafter(F32(0.26), F32(0))
    scores = [F32(0.26), below, np.nextafter(F32(0.26), F32(1)), None, NAN, math.inf]
    assert float(F32(0.26)) < 0.26  # float32(0.26) is below 0.26, yet DataComp keeps it
    table = ledger(scores)
    assert decide(ClipScore(min=0.26), table) == [0, 2, 5]
    values = np.array([NAN if s is None else s for s in scores], F32)
    assert np.flatnonzero(values >= 0.26).tolist() == [0, 2, 5]  # df[key] >= 0.26
    if pd is not None:
        assert np.flatnonzero(pd.Series(values) >= 0.26).tolist() == [0, 2, 5]
    # A float64 column compares in float64: float32(0.26)'s exact value is below 0.26 there.
    wide = ledger([0.26, np.nextafter(0.26, 0), float(F32(0.26))], pa.float64())
    assert decide(ClipScore(min=0.26), wide) == [0]


def test_laion_threshold_0_28_boundaries():
    t = F32(0.28)
    scores = [t, np.nextafter(t, F32(0)), np.nextafter(t, F32(1)), 0.28, -0.5, None, NAN]
    assert decide(ClipScore(min=0.28, column="s"), ledger(scores, column="s")) == [0, 2, 3]


@pytest.mark.parametrize(
    "bound, expected",
    [(-math.inf, [0, 1, 2, 3, 4]), (math.inf, [3]), (-0.0, [0, 1, 2, 3]), (1e39, [3])],
)
def test_threshold_extremes(bound, expected):
    scores = [0.0, -0.0, 0.5, math.inf, -math.inf, None, NAN]
    assert decide(ClipScore(min=bound), ledger(scores)) == expected


def test_null_scores_do_not_crash_any_filter(tmp_path):
    table = ledger([None, None], pa.float32())
    assert decide(ClipScore(min=0.0), table) == []
    assert top_fraction([None, None], 0.5, tmp_path)[0] == []


def test_parameters_are_validated():
    for fraction in (0, 0.0, -0.1, 1.0000001, 2, NAN):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            build(ClipScoreTopFraction, {"fraction": fraction}, "f")
    with pytest.raises(ConfigError, match="fraction must be in"):
        build(FILTERS["clip_score_top_fraction"], {"fraction": 30}, "f")
    with pytest.raises(ConfigError, match="expected a number"):
        build(FILTERS["clip_score_top_fraction"], {"fraction": "30%"}, "f")
    with pytest.raises(ConfigError, match="missing required key 'min'"):
        build(FILTERS["clip_score"], {}, "f")
    with pytest.raises(ValueError, match="NaN"):
        build(ClipScore, {"min": NAN}, "f")
    with pytest.raises(ValueError, match="column"):
        ClipScore(min=0.2, column="")
    flt = build(FILTERS["clip_score_top_fraction"], {"fraction": 1}, "f")
    assert flt.fraction == 1.0 and flt.needs == ("clip_score",)
    assert build(FILTERS["clip_score"], {"min": 0.28, "column": "x"}, "f").needs == ("x",)


def test_a_non_numeric_column_fails_clearly(tmp_path):
    table = ledger(["a", "b"], pa.string())
    with pytest.raises(TypeError, match="'clip_score' holds string"):
        ClipScore(min=0.1).keep(table)
    with pytest.raises(TypeError, match="'clip_score' holds string"):
        fitted(ClipScoreTopFraction(fraction=0.5), write_parts(tmp_path, table), tmp_path)


# --- parity through the runner on a DataComp-style metadata pool -----------------------------

N_FILES, ROWS_PER_FILE = 3, 1500
B32, L14 = "clip_b32_similarity_score", "clip_l14_similarity_score"
FRACTION = "clip_score_top_fraction.fraction"
CAPTIONS = [
    "a photo of a dog on the beach",
    "a red car parked in front of a house",
    "un chien sur la plage avec son ballon",
    "ein Hund am Strand mit seinem Ball",
    "un perro en la playa con su pelota",
    "two cats sleeping on a wooden table",
    "IMG_1234.jpg",
    "ok",
    "",
]


def scores(rng: np.random.Generator, n: int, near: float) -> pa.Array:
    """float32 scores on a coarse grid (ties at every cut) with the hard cases mixed in."""
    values = (rng.integers(0, 40, n) / 100 + (near - 0.2)).astype(F32)
    t = F32(near)
    special = rng.random(n)
    picks = [
        (0.06, t),
        (0.09, np.nextafter(t, F32(0))),
        (0.12, np.nextafter(t, F32(1))),
        (0.14, F32(0.26)),
        (0.15, np.nextafter(F32(0.26), F32(0))),
        (0.16, F32(-0.05)),
        (0.165, F32(0.0)),
        (0.17, F32(-0.0)),
        (0.175, F32(np.inf)),
        (0.18, F32(-np.inf)),
        (0.23, F32(np.nan)),
    ]
    lo = 0.0
    for hi, value in picks:
        values[(special >= lo) & (special < hi)] = value
        lo = hi
    null = (special >= 0.23) & (special < 0.26)
    return pa.array(values, pa.float32(), mask=null)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, list[Path]]:
    """DataComp metadata parquets (no .npz): uid, url, text, sizes, B/32 and L/14 scores."""
    rng = np.random.default_rng(20230427)
    folder = tmp_path_factory.mktemp("clip_pool")
    files = []
    for f in range(N_FILES):
        n = ROWS_PER_FILE
        hi, lo = rng.integers(0, 2**64, (2, n), np.uint64, endpoint=False)
        table = pa.table(
            {
                "uid": [f"{int(a):016x}{int(b):016x}" for a, b in zip(hi, lo)],
                "url": [f"https://img{i % 7}.example.com/{f}/{i}.jpg" for i in range(n)],
                "text": [CAPTIONS[i] for i in rng.integers(0, len(CAPTIONS), n)],
                "original_width": pa.array(rng.integers(50, 2000, n), pa.int64()),
                "original_height": pa.array(rng.integers(50, 2000, n), pa.int64()),
                B32: scores(rng, n, 0.28),
                L14: scores(rng, n, 0.30),
            }
        )
        files.append(folder / f"{f:07d}.parquet")
        pq.write_table(table, files[-1])
    return folder, files


def kept_uids(run_dir: Path) -> set[str]:
    table = pq.ParquetDataset([str(f) for f in ledger_files(run_dir / "ledger")]).read()
    return set(table.filter(table["keep"])["uid"].to_pylist())


def run(recipe_name: str, folder: Path, run_dir: Path, *overrides: str, engine="local"):
    overrides = ("ingest.rows_per_file=1000", *overrides)  # a multi-file ledger
    run_recipe(load_recipe(recipe_name, list(overrides)), folder, run_dir, engine=engine)
    return kept_uids(run_dir)


def test_pool_has_the_hard_cases(pool):
    _, files = pool
    for key, near in ((B32, 0.28), (L14, 0.30)):
        values = np.concatenate([read_columns(p, [key])[key] for p in files])
        assert values.dtype == np.float32  # pandas keeps float32
        assert (values == F32(near)).sum() > 50
        assert (values == np.nextafter(F32(near), F32(0))).sum() > 50
        assert np.isnan(values).sum() > 250 and (values < 0).sum() > 50


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.3, 0.5, 0.77, 0.9])
def test_top_fraction_keeps_exactly_datacomps_uids(pool, tmp_path, fraction):
    folder, files = pool
    ours = run("datacomp_clip_score", folder, tmp_path, f"filter.{FRACTION}={fraction}")
    oracle = load_uids_with_clip_score(files, L14, None, fraction)
    assert ours == oracle
    total = N_FILES * ROWS_PER_FILE
    n = int(total * fraction)
    threshold = get_threshold(files, L14, fraction)
    assert not np.isnan(threshold) and len(oracle) > n + 1  # ties at the cut, all kept
    art = json.loads(next(tmp_path.glob("stages/01_filter/_stats/*/threshold.json")).read_text())
    assert float.fromhex(art["threshold"]) == float(threshold) and art["n"] == n


def test_top_fraction_landing_on_nan_keeps_nothing_like_datacomp(pool, tmp_path):
    folder, files = pool
    total = N_FILES * ROWS_PER_FILE
    values = np.concatenate([read_columns(p, [L14])[L14] for p in files])
    fraction = 1 - np.isnan(values).sum() / total / 2  # n lands among the NaNs
    assert np.isnan(get_threshold(files, L14, fraction))
    assert load_uids_with_clip_score(files, L14, None, fraction) == set()
    assert run("datacomp_clip_score", folder, tmp_path, f"filter.{FRACTION}={fraction}") == set()


def test_fraction_one_keeps_every_scored_uid(pool, tmp_path):
    folder, files = pool
    with pytest.raises(IndexError):
        get_threshold(files, L14, 1.0)
    every_scored = load_uids_with_clip_score(files, L14, -math.inf, None)
    assert run("datacomp_clip_score", folder, tmp_path, f"filter.{FRACTION}=1.0") == every_scored


@pytest.mark.parametrize("threshold", [0.28, 0.26, 0.3])
def test_threshold_keeps_exactly_datacomps_uids(pool, tmp_path, threshold):
    """DataComp ``--name clip_score --arch b32 --threshold T``, as an inline recipe."""
    folder, files = pool
    recipe = tmp_path / "b32_threshold.yaml"
    recipe.write_text(
        "stages:\n  - stage: ingest\n  - stage: filter\n    filters:\n"
        f"      - clip_score: {{column: {B32}, min: {threshold}}}\n"
    )
    ours = run(str(recipe), folder, tmp_path / "run")
    assert ours == load_uids_with_clip_score(files, B32, threshold, None)
    values = np.concatenate([read_columns(p, [B32])[B32] for p in files])
    assert (values == F32(threshold)).sum() > 50  # rows exactly at the bound


def get_fasttext_language(text: str, model) -> str:
    """DataComp's get_fasttext_language; fastText's predict(str) minus its numpy-2-broken step."""
    text = text.replace("\n", " ")
    ((_, label),) = model.f.predict(text + "\n", 1, 0.0, "strict")
    return label.split("__label__")[1]


def test_datacomp_laion_recipe(pool, tmp_path):
    """The B/32 >= 0.28 rule exactly; English by fastText where DataComp runs gcld3."""
    from curate.annotators.language import load_model

    folder, files = pool
    ours = run("datacomp_laion", folder, tmp_path)
    model = load_model()
    oracle = set()
    for path in files:  # load_uids_with_clip_score_helper(..., gcld3_en_filter=True)
        df = read_columns(path, ["uid", "text", B32])
        english = np.array([get_fasttext_language(t, model) == "en" for t in df["text"]])
        oracle |= set(df["uid"][english & (df[B32] >= 0.28)].tolist())
    assert ours == oracle and 100 < len(oracle) < N_FILES * ROWS_PER_FILE // 2
    ledger = pq.ParquetDataset([str(f) for f in ledger_files(tmp_path / "ledger")]).read()
    reasons = set(ledger["dropped_by"].to_pylist())
    assert reasons == {None, "clip_score", "language"}
    assert pc.sum(pc.is_valid(ledger["lang"])).as_py() < ledger.num_rows  # cheap filter first


def test_missing_score_column_fails_before_the_filter_stage(pool, tmp_path):
    _, files = pool
    lacking = tmp_path / "pool"
    lacking.mkdir()
    pq.write_table(pq.read_table(files[0]).drop_columns([L14]), lacking / "0000000.parquet")
    with pytest.raises(ConfigError) as info:
        run_recipe(load_recipe("datacomp_clip_score"), lacking, tmp_path / "run", engine="local")
    message = str(info.value)
    assert "clip_score_top_fraction needs column(s) clip_l14_similarity_score" in message
    assert not (tmp_path / "run" / "stages" / "01_filter").exists()


def test_top_fraction_on_ray_keeps_the_same_uids(pool, tmp_path, ray_local):
    folder, files = pool
    ours = run("datacomp_clip_score", folder, tmp_path / "ray", engine="ray")
    assert ours == load_uids_with_clip_score(files, L14, None, 0.3)
    assert ours == run("datacomp_clip_score", folder, tmp_path / "local")
