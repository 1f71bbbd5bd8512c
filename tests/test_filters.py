"""Every filter and annotator at its boundaries, in-process, with the real fastText model."""

from __future__ import annotations

import itertools
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from curate.annotators import text_count
from curate.annotators.language import LanguageAnnotator
from curate.annotators.text import TextAnnotator
from curate.annotators.text_count import TextCountAnnotator
from curate.core.config import ConfigError, build
from curate.core.filtering import apply_filters
from curate.core.operators import ANNOTATORS, FILTERS, FitContext, Fitted, load_registry
from curate.engine.local import LocalEngine
from curate.filters import rare_tokens
from curate.filters.alt_text_frequency import AltTextFrequency
from curate.filters.aspect_ratio import AspectRatio
from curate.filters.boilerplate import PATTERNS, Boilerplate
from curate.filters.caption_valid import CaptionValid
from curate.filters.caption_words import CaptionWords
from curate.filters.image_size import ImageSize
from curate.filters.language import Language
from curate.filters.rare_tokens import RareTokens
from curate.filters.score_threshold import ScoreThreshold

load_registry()
FILTER_SETS = Path(__file__).resolve().parent.parent / "filters"
SIZE = pa.int32()


def ledger(n: int | None = None, **columns) -> pa.Table:
    """A ledger batch: the given columns plus uid, keep=True and dropped_by=null."""
    n = n if n is not None else len(next(iter(columns.values())))
    base = {
        "uid": pa.array([f"{i:032x}" for i in range(n)]),
        "caption": pa.array(["a caption"] * n),
        "caption_error": pa.nulls(n, pa.string()),
        "keep": pa.array([True] * n),
        "dropped_by": pa.nulls(n, pa.string()),
    }
    for name, values in columns.items():
        base[name] = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.table(base)


def sizes(pairs) -> dict:
    w, h = zip(*pairs, strict=True)
    return {"original_width": pa.array(w, SIZE), "original_height": pa.array(h, SIZE)}


def mask(flt, batch) -> list[bool]:
    """The filter's decisions as Python bools, null counted as a drop (as apply_filters does)."""
    out = flt.keep(batch)
    if not isinstance(out, np.ndarray):
        out = pc.fill_null(out, False).to_numpy(zero_copy_only=False)
    assert len(out) == batch.num_rows
    return [bool(x) for x in out]


def annotated(batch: pa.Table, *annotators) -> pa.Table:
    for annotator in annotators:
        for name, values in annotator.annotate(batch).items():
            batch = batch.append_column(name, values)
    return batch


def write_ledger(path: Path, captions: list) -> Path:
    pq.write_table(ledger(caption=pa.array(captions, pa.string())), path)
    return path


# --- caption_valid ---------------------------------------------------------------


def test_caption_valid_drops_only_null_and_undecodable():
    batch = ledger(
        caption=pa.array(["ok", None, "", "bad \ufffd bytes \ufffd", "fine"]),
        caption_error=pa.array([None, None, None, None, "invalid utf-8"]),
    )
    assert mask(CaptionValid(), batch) == [True, False, True, True, False]


# --- image_size --------------------------------------------------------------------


@pytest.mark.parametrize(
    "min_side, expected",
    [
        (200, [False, True, True, False, True, False, False, False, False]),
        (201, [False, False, True, False, False, False, False, False, False]),
    ],
)
def test_image_size_boundaries(min_side, expected):
    pairs = [(199, 500), (200, 500), (201, 201), (500, 199), (200, 200), (0, 500), (0, 0)]
    batch = ledger(
        original_width=pa.array([w for w, _ in pairs] + [None, 500], SIZE),
        original_height=pa.array([h for _, h in pairs] + [500, None], SIZE),
    )
    assert mask(ImageSize(min_side=min_side), batch) == expected


# --- aspect_ratio --------------------------------------------------------------------

RATIO_CASES = [
    ((600, 200), True, False),  # exactly 3.0
    ((200, 600), True, False),  # w/h = 1/3: ratio uses max/min, exactly 3.0 again
    ((30000001, 10000000), False, False),  # 3.0000001
    ((10000000, 30000001), False, False),
    ((599, 200), True, True),  # 2.995
    ((601, 200), False, False),
    ((300, 300), True, True),  # 1.0
    ((1, 3), True, False),  # 3.0 at the smallest scale
    ((0, 300), False, False),  # zero side: no ratio
    ((0, 0), False, False),
    ((-600, 200), False, False),
]


@pytest.mark.parametrize("pair, inclusive_keep, strict_keep", RATIO_CASES, ids=str)
def test_aspect_ratio_boundaries(pair, inclusive_keep, strict_keep):
    batch = ledger(**sizes([pair]))
    assert mask(AspectRatio(max_ratio=3.0, inclusive=True), batch) == [inclusive_keep]
    assert mask(AspectRatio(max_ratio=3.0, inclusive=False), batch) == [strict_keep]


def test_aspect_ratio_null_and_zero_without_warnings():
    batch = ledger(
        original_width=pa.array([None, 600, None, 0, 0, 400], SIZE),
        original_height=pa.array([200, None, None, 0, 7, 300], SIZE),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or invalid-value warnings
        got = mask(AspectRatio(max_ratio=math.inf), batch)
    assert got == [False, False, False, False, False, True]


def test_aspect_ratio_equals_datacomp_float64_formula():
    rng = np.random.default_rng(0)
    w = rng.integers(1, 2000, 5000)
    h = np.where(
        rng.random(5000) < 0.3, w * 3 + rng.integers(-1, 2, 5000), rng.integers(1, 2000, 5000)
    )
    oracle = (np.maximum(w, h) / np.minimum(w, h)) <= 3.0
    batch = ledger(**{"original_width": pa.array(w, SIZE), "original_height": pa.array(h, SIZE)})
    assert mask(AspectRatio(), batch) == oracle.tolist()
    assert 0 < oracle.sum() < len(oracle)


# --- caption_words -------------------------------------------------------------------


def words_batch(captions: list) -> pa.Table:
    return annotated(ledger(caption=pa.array(captions, pa.string())), TextAnnotator())


def test_caption_words_counts_split_words_with_unicode_whitespace():
    captions = [
        "two words",
        "three little words",
        " \u3000three\xa0little\u2028words\x85 ",
        "two\u200bjoined words",  # zero-width space is not whitespace: 2 words
        "\t\n",
        "",
        None,
    ]
    keep = mask(CaptionWords(min_words=3), words_batch(captions))
    assert keep == [False, True, True, False, False, False, False]


def test_caption_words_upper_bound_is_inclusive():
    captions = [" ".join(["w"] * n) for n in (2, 3, 20, 21)]
    assert mask(CaptionWords(min_words=3, max_words=20), words_batch(captions)) == [
        False,
        True,
        True,
        False,
    ]


def test_caption_chars_are_code_points():
    captions = [
        "abcde",  # 5
        "abcdef",  # 6
        "e\u0301abcd",  # e + combining accent: 6 code points, 5 graphemes
        "😀😀😀😀😀",  # 5 code points, 20 bytes
        "😀😀😀😀😀😀",  # 6
        "👨\u200d👩\u200d👧",  # one family emoji = 5 code points
        "日本語のテキ",  # 6 code points, 18 bytes
        "     x",  # whitespace counts as characters
    ]
    expected = [len(c) >= 6 for c in captions]
    assert expected == [False, True, True, False, True, False, True, True]
    assert mask(CaptionWords(min_chars=6), ledger(caption=pa.array(captions))) == expected
    assert mask(CaptionWords(max_chars=5), ledger(caption=pa.array(captions))) == [
        not e for e in expected
    ]


def test_caption_words_datacomp_rule():
    captions = ["a b", "a b c", "ab c d", "a  b c", "abc def ghi", "hi\nthere you", None]
    oracle = [c is not None and len(c.split()) > 2 and len(c) > 5 for c in captions]
    got = mask(CaptionWords(min_words=3, min_chars=6), words_batch(captions))
    assert got == oracle == [False, False, True, True, True, True, False]


def test_caption_words_needs_only_what_its_bounds_read():
    assert CaptionWords(min_chars=6).needs == ("caption",)
    assert set(CaptionWords(min_words=3).needs) == {"caption", "n_words"}
    with pytest.raises(ValueError, match="max_words"):
        CaptionWords(min_words=5, max_words=4)


# --- alt_text_frequency + text_count ------------------------------------------------------


@pytest.fixture
def frequency_pool(tmp_path: Path) -> list[Path]:
    """Three ledger files: "ten" 10 times and "eleven" 11 times, spread across files."""
    files = []
    parts = [
        ["ten"] * 4 + ["eleven"] * 3 + ["once a"] + [None] * 5,
        ["ten"] * 3 + ["eleven"] * 4 + ["Ten", "ten "],
        ["ten"] * 3 + ["eleven"] * 4 + ["twice", "twice", None],
    ]
    for i, captions in enumerate(parts):
        files.append(write_ledger(tmp_path / f"part-{i}.parquet", captions))
    return files


def fitted_counter(files: list[Path], tmp_path: Path) -> TextCountAnnotator:
    stats = tmp_path / "stats"
    stats.mkdir()
    annotator = TextCountAnnotator()
    annotator.fit(FitContext(files, stats, engine=LocalEngine()))
    annotator = pickle.loads(pickle.dumps(annotator))  # as shipped to a Ray worker
    annotator.load(stats)  # as each worker does, from the folder the stage declares
    return annotator


def test_text_count_counts_exact_captions_over_all_files(frequency_pool, tmp_path):
    annotator = fitted_counter(frequency_pool, tmp_path)
    artifact = pq.read_table(tmp_path / "stats" / text_count.ARTIFACT)
    assert dict(zip(*artifact.to_pydict().values(), strict=True)) == {
        "ten": 10,
        "eleven": 11,
        "twice": 2,
    }  # only captions seen more than once; nulls not counted
    batch = ledger(caption=pa.array(["ten", "eleven", "Ten", "ten ", "never seen", None, "twice"]))
    counts = annotator.annotate(batch)["text_count"]
    assert counts.type == pa.int32()
    assert counts.to_pylist() == [10, 11, 1, 1, 1, None, 2]


@pytest.mark.parametrize("max_count, expected", [(10, [True, False]), (11, [True, True])])
def test_alt_text_frequency_boundary(frequency_pool, tmp_path, max_count, expected):
    annotator = fitted_counter(frequency_pool, tmp_path)
    batch = annotated(ledger(caption=pa.array(["ten", "eleven"])), annotator)
    assert mask(AltTextFrequency(max_count=max_count), batch) == expected


def test_alt_text_frequency_through_apply_filters(frequency_pool, tmp_path):
    annotator = fitted_counter(frequency_pool, tmp_path)
    batch = pa.concat_tables(pq.read_table(f) for f in frequency_pool)
    out = apply_filters(
        batch, [CaptionValid(), AltTextFrequency(max_count=10)], {"text_count": annotator}
    )
    reasons = dict(zip(out["caption"].to_pylist(), out["dropped_by"].to_pylist(), strict=True))
    assert reasons["eleven"] == "alt_text_frequency"
    assert reasons["ten"] is None and reasons["twice"] is None
    assert reasons[None] == "caption_valid"
    # text_count was computed for rows alive at that point only.
    assert pc.all(pc.is_null(out.filter(pc.is_null(out["caption"]))["text_count"])).as_py()


def test_text_count_of_an_empty_pool(tmp_path):
    annotator = fitted_counter([], tmp_path)
    assert annotator.annotate(ledger(caption=pa.array(["x"])))["text_count"].to_pylist() == [1]


# --- rare_tokens -------------------------------------------------------------------------


def fitted_vocab(tmp_path: Path, captions: list, **params) -> RareTokens:
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = [
        write_ledger(tmp_path / "a.parquet", captions[: len(captions) // 2]),
        write_ledger(tmp_path / "b.parquet", captions[len(captions) // 2 :]),
    ]
    stats = tmp_path / "vocab"
    stats.mkdir()
    flt = RareTokens(**params)
    flt.fit(FitContext(files, stats, engine=LocalEngine()))
    flt = pickle.loads(pickle.dumps(flt))  # as shipped to a Ray worker
    flt.load(stats)
    return flt


def vocab_file(tmp_path: Path) -> Path:
    """The vocabulary ``fitted_vocab`` fitted."""
    return tmp_path / "vocab" / rare_tokens.ARTIFACT


# Unigram/bigram counts (lower-cased): cat 6, dog 6, "cat dog" 4, bird 3, fish 2,
# "bird fish" 2, "dog cat" 1, zebra 1.
POOL = ["cat dog"] * 4 + ["dog cat", "cat", "dog", "bird fish", "bird fish", "bird", "Zebra", None]


def oracle_vocabulary(captions: list, k: int) -> list[str]:
    """The K most frequent unigrams and bigrams, in Python, ties by string."""
    from collections import Counter

    counts = Counter()
    for caption in captions:
        toks = (caption or "").lower().split()
        counts.update(toks)
        counts.update(f"{a} {b}" for a, b in itertools.pairwise(toks))
    return [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 8, 100])
def test_rare_tokens_vocabulary_equals_python_oracle(tmp_path, k):
    fitted_vocab(tmp_path, POOL, vocab_size=k)
    assert pq.read_table(vocab_file(tmp_path))["gram"].to_pylist() == oracle_vocabulary(POOL, k)


def test_rare_tokens_vocabulary_boundaries(tmp_path):
    flt = fitted_vocab(tmp_path, POOL, vocab_size=4)
    vocab = pq.read_table(vocab_file(tmp_path)).to_pydict()
    # cat and dog tie at 6 (byte order decides), then "cat dog" 4, bird 3.
    assert vocab == {"gram": ["cat", "dog", "cat dog", "bird"], "n": [6, 6, 4, 3]}
    captions = ["cat dog", "CAT  Dog", "dog cat", "bird", "fish", "", None]
    # "dog cat": both unigrams known, the bigram is rare. Empty: no token is rare.
    assert mask(flt, ledger(caption=pa.array(captions))) == [
        True,
        True,
        False,
        True,
        False,
        True,
        False,
    ]


def test_rare_tokens_tie_at_the_cutoff_is_deterministic(tmp_path):
    # K=5: "bird fish" and "fish" tie at 2 for the last slot; "bird fish" < "fish".
    flt = fitted_vocab(tmp_path, POOL, vocab_size=5)
    assert pq.read_table(vocab_file(tmp_path))["gram"].to_pylist()[-1] == "bird fish"
    # A known bigram does not rescue a rare unigram.
    assert mask(flt, ledger(caption=pa.array(["bird fish", "fish", "bird"]))) == [
        False,
        False,
        True,
    ]
    flt = fitted_vocab(tmp_path / "l", POOL, vocab_size=6)
    assert mask(flt, ledger(caption=pa.array(["bird fish", "fish", "fish bird"]))) == [
        True,
        True,
        False,
    ]


def test_rare_tokens_case_sensitive_vocabulary(tmp_path):
    lower = fitted_vocab(tmp_path / "l", POOL, vocab_size=100)
    exact = fitted_vocab(tmp_path / "e", POOL, vocab_size=100, lowercase=False)
    batch = ledger(caption=pa.array(["zebra", "Zebra", "ZEBRA"]))
    assert mask(lower, batch) == [True, True, True]
    assert mask(exact, batch) == [False, True, False]


def test_rare_tokens_rejects_empty_vocabulary_size():
    with pytest.raises(ValueError):
        build(RareTokens, {"vocab_size": 0}, "rare_tokens")


# --- boilerplate ------------------------------------------------------------------------

BOILERPLATE = [
    "IMG_1234.jpg",
    "IMG_1234.JPEG",
    "DSC00042",
    "dscn0042",
    "IMG_20190512_123456 (2)",
    "image.png",
    "my holiday at the beach.webp",
    "Image",
    "  PHOTO!!  ",
    "picture",
    "Untitled",
    "placeholder",
    "thumbnail",
    "[logo]",
    "icon",
    "banner",
    "spacer",
    "null",
    "undefined",
    "click here",
    "Click   Here.",
    "clickhere",
    "Read more »",
    "download",
    "No Image Available",
    "image 3",
    "photo #2",
    "\u3000image\u3000",
    "https://example.com/a/b.html?x=1",
    "www.shop.com",
    "example.co.uk/item",
    "shop.example.com",
    "12345",
    "2019-05-12",
    "$ 19.99",
    "1920x1080",
    "800 × 600 px",
    "",
    "   \t ",
    "...",
]

REAL = [
    "a photo of a dog on a beach",
    "Logo design for a coffee shop",
    "Download the free app today",
    "Nike logo",
    "an icon of modern architecture",
    "Click here to see the image of the week",
    "photo of me",
    "image of the red planet",
    "www is where the web began",
    "3 dogs",
    "1920s fashion",
    "😀",
    "Untitled (Blue Square), oil on canvas",
]


@pytest.mark.parametrize("caption", BOILERPLATE)
def test_boilerplate_positives(caption):
    assert mask(Boilerplate(), ledger(caption=pa.array([caption]))) == [False]


@pytest.mark.parametrize("caption", REAL)
def test_boilerplate_negatives(caption):
    assert mask(Boilerplate(), ledger(caption=pa.array([caption]))) == [True]


def test_boilerplate_patterns_are_named_and_null_drops():
    names = [name for name, _ in PATTERNS]
    assert len(names) == len(set(names)) >= 5
    assert mask(Boilerplate(), ledger(caption=pa.array([None, "a photo of a cat"]))) == [
        False,
        True,
    ]


# --- score_threshold ---------------------------------------------------------------------


def test_score_threshold_nan_null_and_infinities():
    scores = pa.array([0.5, None, float("nan"), -math.inf, math.inf, 0.28, 0.2799], pa.float64())
    batch = ledger(clip_b32_similarity_score=scores)
    no_filter = ScoreThreshold(column="clip_b32_similarity_score", min=-math.inf)
    assert mask(no_filter, batch) == [True, False, False, True, True, True, True]
    laion = ScoreThreshold(column="clip_b32_similarity_score", min=0.28)
    assert mask(laion, batch) == [True, False, False, False, True, True, False]
    band = ScoreThreshold(column="clip_b32_similarity_score", min=0.28, max=0.5)
    assert mask(band, batch) == [True, False, False, False, False, True, False]
    assert no_filter.needs == ("clip_b32_similarity_score",)


def test_score_threshold_other_numeric_types():
    f32 = ledger(clip_score=pa.array([0.3, 0.29999998, None], pa.float32()))
    assert mask(ScoreThreshold(column="clip_score", min=0.3), f32) == [
        np.float32(0.3) >= 0.3,
        False,
        False,
    ]
    ints = ledger(n_words=pa.array([2, 3, None], pa.int32()))
    assert mask(ScoreThreshold(column="n_words", max=2), ints) == [True, False, False]


def test_score_threshold_compares_in_the_columns_dtype_as_clip_score_does():
    """float32(0.26) is slightly below 0.26: DataComp's pandas, comparing in float32, keeps
    it; so do score_threshold and its preset clip_score. A float64 comparison would not."""
    from curate.filters.clip_score import ClipScore

    assert float(np.float32(0.26)) < 0.26
    scores = pa.array([np.float32(0.26), np.nextafter(np.float32(0.26), 0), None], pa.float32())
    batch = ledger(clip_score=scores)
    expected = [True, False, False]
    assert mask(ScoreThreshold(column="clip_score", min=0.26), batch) == expected
    assert mask(ClipScore(min=0.26), batch) == expected
    upper = pa.array([np.float32(0.26), np.nextafter(np.float32(0.26), 1)], pa.float32())
    assert mask(ScoreThreshold(column="s", max=0.26), ledger(s=upper)) == [True, False]


def test_score_threshold_validates_its_bounds():
    with pytest.raises(ValueError, match="max"):
        ScoreThreshold(column="x", min=1.0, max=0.0)
    with pytest.raises(ConfigError, match="missing required key 'column'"):
        build(ScoreThreshold, {"min": 0.0}, "score_threshold")


# --- language ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def language() -> LanguageAnnotator:
    annotator = LanguageAnnotator()
    annotator.setup()
    return annotator


HOSTILE = [
    "",
    " ",
    "\r",
    "\r\n",
    "\x00",
    "a\x00b",
    "\t\x0b\x0c\x1c",
    "\u2028\u2029\x85",
    "😀🐶🏖️",
    "שלום עולם, מה שלומך היום",
    "مرحبا بالعالم كيف حالك اليوم",
    "x" * 1_000_000,
    "word " * 200_000,
    "\ufffd\ufffd\ufffd",
    "\U0010fffd",
]


def test_language_labels_and_types(language):
    batch = ledger(
        caption=pa.array(["a brown dog running on the beach", "le chat noir dort", None])
    )
    out = language.annotate(batch)
    assert out["lang"].type == pa.string() and out["lang_score"].type == pa.float32()
    assert out["lang"].to_pylist() == ["en", "fr", None]
    scores = out["lang_score"].to_pylist()
    assert 0.5 < scores[0] <= 1.0 and 0.5 < scores[1] <= 1.0 and scores[2] is None


def test_language_replaces_newlines_like_datacomp(language):
    from curate.annotators.language import load_model

    captions = ["a dog\non the beach", "un chien\nsur la plage\n", "\n\n"]
    got = language.annotate(ledger(caption=pa.array(captions)))
    for caption, lang, score in zip(
        captions, got["lang"].to_pylist(), got["lang_score"].to_pylist(), strict=True
    ):
        # fastText's own single-line path, as its Python wrapper calls it for one string.
        ((prob, label),) = load_model().f.predict(
            caption.replace("\n", " ") + "\n", 1, 0.0, "strict"
        )
        assert (lang, score) == (label.split("__label__")[1], pytest.approx(prob, rel=1e-6))


def test_language_survives_hostile_strings(language):
    out = language.annotate(ledger(caption=pa.array(HOSTILE)))
    langs = out["lang"].to_pylist()
    assert len(langs) == len(HOSTILE) and all(isinstance(x, str) and len(x) >= 2 for x in langs)
    assert langs[HOSTILE.index("שלום עולם, מה שלומך היום")] == "he"
    assert langs[HOSTILE.index("مرحبا بالعالم كيف حالك اليوم")] == "ar"
    assert np.isfinite(out["lang_score"].to_numpy()).all()


def test_language_row_that_fasttext_rejects_becomes_null(monkeypatch, language):
    import curate.annotators.language as module

    real = module.load_model()

    class Choosy:  # fastText's model, refusing one line
        class f:  # the attribute name fastText's wrapper uses
            @staticmethod
            def predict(text, k, threshold, on_unicode_error):
                if "poison" in text:
                    raise ValueError("fastText cannot read this")
                return real.f.predict(text, k, threshold, on_unicode_error)

    monkeypatch.setattr(module, "load_model", lambda: Choosy())
    batch = ledger(caption=pa.array(["a dog on a beach today", "poison pill", "le chien noir"]))
    out = module.LanguageAnnotator().annotate(batch)
    assert out["lang"].to_pylist() == ["en", None, "fr"]
    assert out["lang_score"].to_pylist()[1] is None
    batch = batch.append_column("lang", out["lang"]).append_column("lang_score", out["lang_score"])
    final = apply_filters(batch, [Language(languages=["en", "fr"])], {})
    assert final["dropped_by"].to_pylist() == [None, "language", None]


def test_language_filter_languages_and_min_score():
    batch = ledger(
        lang=pa.array(["en", "fr", "en", None, "de"]),
        lang_score=pa.array([0.9, 0.9, 0.2, None, 0.95], pa.float32()),
    )
    assert mask(Language(), batch) == [True, False, True, False, False]
    assert mask(Language(languages=["en", "fr"], min_score=0.5), batch) == [
        True,
        True,
        False,
        False,
        False,
    ]
    with pytest.raises(ValueError):
        Language(languages=[])


# --- apply_filters: order, reasons, accounting --------------------------------------------------


def test_first_failing_filter_is_recorded_in_set_order(language):
    batch = ledger(
        caption=pa.array(
            [
                "a brown dog running on the beach",  # kept
                "a brown dog running on the beach",  # too small and too wide: image_size
                "a brown dog running on the beach",  # too wide only
                "two words",  # caption_words
                "un chien brun qui court sur la plage",  # language
                None,  # caption_valid, though its size is also bad
                "a brown dog running on the beach",  # dropped by an earlier stage
            ]
        ),
        **sizes([(640, 480), (100, 900), (900, 200), (640, 480), (640, 480), (1, 1), (640, 480)]),
    )
    batch = batch.set_column(
        batch.schema.get_field_index("keep"), "keep", pa.array([True] * 6 + [False])
    )
    batch = batch.set_column(
        batch.schema.get_field_index("dropped_by"), "dropped_by", pa.array([None] * 6 + ["ingest"])
    )
    filters = [
        CaptionValid(),
        ImageSize(min_side=200),
        AspectRatio(),
        CaptionWords(min_words=3, min_chars=6),
        Language(),
    ]
    annotators = {"n_words": TextAnnotator(), "lang": language, "lang_score": language}
    out = apply_filters(batch, filters, annotators)
    reasons = out["dropped_by"].to_pylist()
    assert reasons == [
        None,
        "image_size",
        "aspect_ratio",
        "caption_words",
        "language",
        "caption_valid",
        "ingest",
    ]
    kept = out["keep"].to_pylist()
    assert kept == [r is None for r in reasons]
    assert len(kept) == sum(kept) + sum(r is not None for r in reasons)
    # Language ID ran only on rows alive when the language filter was reached.
    assert out["lang"].to_pylist() == ["en", None, None, None, "fr", None, None]


# --- registry and filter sets -------------------------------------------------------------------


def test_registry_has_the_documented_operators():
    assert set(FILTERS) >= {
        "caption_valid",
        "image_size",
        "aspect_ratio",
        "caption_words",
        "alt_text_frequency",
        "language",
        "rare_tokens",
        "boilerplate",
        "score_threshold",
    }
    assert {c: a.name for c, a in ANNOTATORS.items() if c in ("lang", "n_words", "text_count")} == {
        "lang": "language",
        "n_words": "text",
        "text_count": "text_count",
    }
    for cls in [*FILTERS.values(), *ANNOTATORS.values()]:
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20, cls
        assert (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip(), cls


def load_set(name: str) -> list:
    data = yaml.safe_load((FILTER_SETS / f"{name}.yaml").read_text())
    assert set(data) == {"description", "filters"} and len(data["description"]) > 80
    filters = []
    for entry in data["filters"]:
        ((fname, params),) = entry.items()
        filters.append(build(FILTERS[fname], params, fname))
        assert pickle.loads(pickle.dumps(filters[-1])) == filters[-1]
    return filters


def prepared(filters: list, ledger_file: Path, stats: Path) -> dict:
    """Fit and set up the filters and the annotators they need, as the filter stage does."""
    by_name = {}
    for flt in filters:
        for column in flt.needs:
            if column in ANNOTATORS:
                cls = ANNOTATORS[column]
                by_name.setdefault(cls.name, cls())
    for op in [*by_name.values(), *filters]:
        folder = stats / f"{type(op).__name__}"
        folder.mkdir(parents=True)
        if isinstance(op, Fitted):
            op.fit(FitContext([ledger_file], folder, engine=LocalEngine()))
            op.load(folder)
        else:
            op.setup()
    return {c: a for a in by_name.values() for c in a.provides}


SET_CAPTIONS = [
    "a brown dog running on the beach",
    "a red car parked in front of a house",
    "two words",
    "un chien brun qui court sur la plage",
    "IMG_1234.jpg",
    None,
    "a qwertyuiop zxcvbnm of a house",
    "",
] + ["stock photo of a happy family"] * 11


# What each shipped set must decide for SET_CAPTIONS (sizes below), by the papers' rules.
SET_REASONS = {
    "datacomp_basic": [None, "aspect_ratio", "caption_words", "language", "caption_words",
                       "caption_valid", None, "caption_words"] + [None] * 11,
    "align": [None, "image_size", "caption_words", None, "caption_words", "caption_valid",
              None, "caption_words"] + ["alt_text_frequency"] * 11,
    "no_filter": [None] * 19,  # DataComp's load_uids: every row
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SET_REASONS))
def test_every_filter_set_runs_and_accounts_for_every_row(name, tmp_path):
    filters = load_set(name)
    n = len(SET_CAPTIONS)
    batch = ledger(
        caption=pa.array(SET_CAPTIONS, pa.string()),
        original_width=pa.array([640] * n, SIZE),
        original_height=pa.array([480, 200] + [480] * (n - 2), SIZE),  # 640x200: ratio 3.2
        clip_b32_similarity_score=pa.array([0.3, None] + [0.25] * (n - 2)),
    )
    pq.write_table(batch, tmp_path / "ledger.parquet")
    annotators = prepared(filters, tmp_path / "ledger.parquet", tmp_path / "stats")
    out = apply_filters(batch, filters, annotators)
    reasons = out["dropped_by"].to_pylist()
    kept = out["keep"].to_pylist()
    assert reasons == SET_REASONS[name]
    assert out.num_rows == n == sum(kept) + sum(r is not None for r in reasons)
    assert kept == [r is None for r in reasons]
    # Every filter's mask has the batch's length, also for an empty batch.
    empty = out.slice(0, 0)
    for flt in filters:
        assert len(flt.keep(empty)) == 0


@pytest.mark.parametrize("name", sorted(SET_REASONS))
def test_filter_sets_decide_the_same_on_multi_chunk_batches(name, tmp_path):
    n = len(SET_CAPTIONS)
    batch = ledger(
        caption=pa.array(SET_CAPTIONS, pa.string()),
        original_width=pa.array([640] * n, SIZE),
        original_height=pa.array([480, 200] + [480] * (n - 2), SIZE),
        clip_b32_similarity_score=pa.array([0.3, None] + [0.25] * (n - 2)),
    )
    pq.write_table(batch, tmp_path / "ledger.parquet")
    filters = load_set(name)
    annotators = prepared(filters, tmp_path / "ledger.parquet", tmp_path / "stats")
    chunked = pa.concat_tables([batch.slice(0, 3), batch.slice(3, 5), batch.slice(8)])
    assert chunked["caption"].num_chunks == 3
    one = apply_filters(batch, filters, annotators)
    many = apply_filters(chunked, filters, annotators)
    assert many["dropped_by"].to_pylist() == one["dropped_by"].to_pylist() == SET_REASONS[name]
    assert pickle.loads(pickle.dumps(annotators)).keys() == annotators.keys()


def test_align_set_is_the_papers_rule():
    data = yaml.safe_load((FILTER_SETS / "align.yaml").read_text())
    params = {next(iter(e)): next(iter(e.values())) for e in data["filters"]}
    assert params["image_size"] == {"min_side": 201}
    assert params["aspect_ratio"] == {"max_ratio": 3.0, "inclusive": False}
    assert params["caption_words"] == {"min_words": 3, "max_words": 20}
    assert params["alt_text_frequency"] == {"max_count": 10}
    assert "rare_tokens" in params and "boilerplate" in params


def test_batches_without_survivors_get_the_same_columns(tmp_path):
    """A batch whose rows all die early still carries every annotator column (as nulls)."""
    filters = load_set("datacomp_basic")
    n = len(SET_CAPTIONS)
    sizes = dict(
        original_width=pa.array([640] * n, SIZE), original_height=pa.array([480] * n, SIZE)
    )
    alive = ledger(caption=pa.array(SET_CAPTIONS, pa.string()), **sizes)
    dead = ledger(
        caption=pa.array(SET_CAPTIONS, pa.string()),
        original_width=pa.array([10] * n, SIZE),
        original_height=pa.array([10] * n, SIZE),
    )
    pq.write_table(alive, tmp_path / "ledger.parquet")
    annotators = prepared(filters, tmp_path / "ledger.parquet", tmp_path / "stats")
    out_alive = apply_filters(alive, filters, annotators)
    out_dead = apply_filters(dead, filters, annotators)
    assert out_dead.schema == out_alive.schema
    assert not any(out_dead["keep"].to_pylist())
    assert set(out_dead["dropped_by"].to_pylist()) <= {"caption_valid", "image_size"}
    assert out_dead["lang"].null_count == n
