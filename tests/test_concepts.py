"""Concept lists and MetaCLIP's substring matching; the DataComp-style concept_match filter."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.config import ConfigError, build
from curate.core.operators import FILTERS, load_registry
from curate.core.recipe import load_recipe, recipe_from_data
from curate.demo import load_manifest
from curate.demo.vocab import VOCABULARY
from curate.runner import run_recipe
from curate.text.concepts import Matcher, concept_file, load_concepts, matchable_captions

load_registry()


def matched(entries: list[str], captions: list, lowercase: bool = False) -> list[list[str]]:
    """Per caption, the entries found in it (list order)."""
    matcher = Matcher(entries, lowercase)
    offsets, ids = matcher.match(pa.array(captions, pa.string()))
    return [[matcher.names[i] for i in ids[a:b]] for a, b in itertools.pairwise(offsets)]


# --- MetaCLIP's rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "found"),
    [
        ("a cat on a mat", ["cat"]),
        ("cat", ["cat"]),  # the caption is padded: a match may start or end it
        ("concatenate the catalogue", []),  # inside a word: no word boundary
        ("cats and kittens", []),  # no stemming
        ("a cat, a dog.", ["cat", "dog"]),  # punctuation is spaced out
        ("cat!dog?", ["cat", "dog"]),
        ("cat;dog:cat`", ["cat", "dog"]),
        ("(cat) 'dog' cat-like", []),  # MetaCLIP does not space brackets, quotes or hyphens
        ("a cat\ton\na mat\r", ["cat"]),  # tabs and line breaks are spaces
        ("cat cat, cat. cat", ["cat"]),  # a concept counts once per caption
        ("a great white shark", ["great white shark", "white shark", "shark"]),
        ("a great  white shark", ["white shark", "shark"]),  # two spaces: not the same words
        ("great\twhite\nshark", ["great white shark", "white shark", "shark"]),
        ("a great white", []),
        ("Cat on a MAT", []),  # case-sensitive, as MetaCLIP
        ("", []),
        ("   ", []),
        (None, []),
    ],
)
def test_entries_match_as_whole_words_of_the_spaced_caption(caption, found):
    entries = ["cat", "dog", "great white shark", "white shark", "shark"]
    assert matched(entries, [caption]) == [found]


def test_lowercase_folds_entries_and_captions():
    assert matched(["Beagle", "tench"], ["a BEAGLE and a Tench"], lowercase=True) == [
        ["beagle", "tench"]
    ]
    # Entries equal after folding are one concept, named by the first.
    matcher = Matcher(["Beagle", "beagle", "BEAGLE"], lowercase=True)
    assert matcher.names == ["beagle"]


def test_an_entry_with_punctuation_is_spaced_like_the_caption():
    # MetaCLIP's key " St. Bernard " can never occur in a spaced caption; ours can.
    assert matched(["St. Bernard", "Yahoo!"], ["a St. Bernard, on Yahoo! News"]) == [
        ["St. Bernard", "Yahoo!"]
    ]
    assert matched(["St. Bernard"], ["a St Bernard"]) == [[]]


def test_rows_are_told_apart_whatever_their_characters():
    captions = ["é" * 50 + " cat", None, "a great", "white shark", "🐶 dog 🐶", "St.", "Bernard"]
    entries = ["cat", "dog", "great white shark", "St. Bernard"]
    # Matches map back to their row by characters, not bytes; none spans two captions.
    assert matched(entries, captions) == [["cat"], [], [], [], ["dog"], [], []]


def test_ids_are_in_list_order_whatever_the_order_in_the_caption():
    matcher = Matcher(["zebra", "ant", "cat"])
    offsets, ids = matcher.match(pa.array(["cat ant zebra", "ant", "x"]))
    assert offsets.tolist() == [0, 3, 4, 4]
    assert ids.tolist() == [0, 1, 2, 1]


def test_undecodable_captions_match_nothing():
    batch = pa.table(
        {
            "caption": ["a cat", "a cat \ufffd", None],
            "caption_error": [None, "invalid utf-8", None],
        }
    )
    assert matched(["cat"], matchable_captions(batch).to_pylist()) == [["cat"], [], []]


def test_chunked_and_sliced_captions_match_like_a_plain_array():
    captions = pa.chunked_array([["x", "a cat"], ["dog", "cat dog"]]).slice(1)
    matcher = Matcher(["cat", "dog"])
    offsets, ids = matcher.match(captions)
    assert offsets.tolist() == [0, 1, 2, 4] and ids.tolist() == [0, 1, 0, 1]
    empty_offsets, empty_ids = matcher.match(pa.array([], pa.string()))
    assert empty_offsets.tolist() == [0] and len(empty_ids) == 0


# MetaCLIP's reference implementation (facebookresearch/MetaCLIP metaclip/substr_matching.py),
# transcribed: the vectorised matcher must find exactly what this loop finds.
def metaclip_spacing(text):
    puncts_to_wrap = [",", ".", ";", ":", "?", "!", "`"]
    chars_to_space = ["\t", "\n", "\r"]
    spaced_text = f" {text} "
    for punct_to_wrap in puncts_to_wrap:
        spaced_text = spaced_text.replace(punct_to_wrap, f" {punct_to_wrap} ")
    for char_to_space in chars_to_space:
        spaced_text = spaced_text.replace(char_to_space, " ")
    return spaced_text


def metaclip_substr_matching(text, metadata):
    text = metaclip_spacing(text)
    return [i for i, entry in enumerate(metadata) if f" {entry} " in text]


def test_matches_are_exactly_metaclips_on_random_captions():
    entries = load_concepts("imagenet1k")
    entries = [e for e in entries if not any(c in e for c in ",.;:?!`")]  # see the test above
    rng = np.random.default_rng(0)
    pieces = [
        *rng.choice(entries, 40).tolist(),
        "a", "the", "of", "cat", "shark", "white", "great", "Tench", "tench", "é", "🐶",
        "(", ")", "-", "'",
        ",", ".", "!", "?", ";", ":", "`", "\t", "\n", "\r\n", " ", "  ",
    ]  # fmt: skip
    # Words glued together ("catshark") and spaced every way, punctuation anywhere.
    captions = ["".join(rng.choice(pieces, rng.integers(0, 25))) for _ in range(3000)]
    matcher = Matcher(entries)
    offsets, ids = matcher.match(pa.array(captions))
    ours = [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)]
    assert ours == [metaclip_substr_matching(c, entries) for c in captions]
    assert sum(map(bool, ours)) > 500  # the test has teeth: many captions match


def test_a_matcher_travels_without_its_automaton():
    matcher = Matcher(["cat", "dog"])
    before = matcher.match(pa.array(["a cat", "dog"]))
    data = pickle.dumps(matcher)
    assert b"ahocorasick" not in data
    after = pickle.loads(data).match(pa.array(["a cat", "dog"]))
    assert all((a == b).all() for a, b in zip(before, after))


# --- the lists ---------------------------------------------------------------------------


def test_bundled_imagenet_list_holds_matchable_class_names():
    entries = load_concepts("imagenet1k")
    assert len(entries) == len(set(entries)) == 1003
    assert entries[:3] == ["tench", "goldfish", "great white shark"]
    assert {"St. Bernard", "kite", "baluster", "handrail", "missile"} <= set(entries)
    assert not any("(" in e or " / " in e for e in entries)


def test_bundled_demo_list_is_the_vocabulary_the_captions_use(demo_pool):
    entries = load_concepts("demo")
    assert entries == [word for words in VOCABULARY.values() for word in words]
    clean = [r for r in load_manifest(demo_pool)["rows"] if r["defect"] is None]
    found = matched(entries, [r["caption"] for r in clean])
    assert set().union(*map(set, found)) == set(entries)  # every word is used by captions
    shapes = set(VOCABULARY["shape"])
    for row, names in zip(clean, found):
        objects = row["concepts"]
        # The caption names exactly the shapes drawn, and every object's colour.
        assert set(names) & shapes == {o["shape"] for o in objects}, row["caption"]
        assert {o["colour"] for o in objects} <= set(names), row["caption"]


def test_a_user_file_and_clear_errors(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes(b"cat\r\n\r\n  dog  \r\ncat\r\n")
    assert load_concepts(str(path)) == ["cat", "dog", "cat"]
    assert Matcher(load_concepts(str(path))).names == ["cat", "dog"]
    assert concept_file("demo").name == "demo.txt"
    with pytest.raises(ConfigError, match=r"no concept list 'nope'.*\(demo, imagenet1k\)"):
        load_concepts("nope")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_concepts(str(tmp_path / "blank.txt"))
    (tmp_path / "nul.txt").write_text("a\x00b\n")
    with pytest.raises(ConfigError, match="NUL"):
        load_concepts(str(tmp_path / "nul.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_concepts(str(tmp_path / "latin1.txt"))


def test_a_recipe_naming_a_missing_list_fails_at_load_time():
    stages = [{"stage": "ingest"}, {"stage": "balance", "concepts": "no_such_list", "t": 5}]
    with pytest.raises(ConfigError, match="inline:1: stage balance: no concept list"):
        recipe_from_data({"stages": stages}, {}, "inline")
    stages[1] = {"stage": "balance", "concepts": "demo", "t": 0}
    with pytest.raises(ConfigError, match="t must be at least 1"):
        recipe_from_data({"stages": stages}, {}, "inline")
    with pytest.raises(ConfigError, match="missing required key 'concepts'"):
        recipe_from_data({"stages": [{"stage": "ingest"}, {"stage": "balance"}]}, {}, "inline")
    filters = [{"concept_match": {"concepts": "nope"}}]
    with pytest.raises(ConfigError, match="filter concept_match: no concept list"):
        recipe_from_data({"stages": [{"stage": "ingest"}, {"stage": "filter", "filters": filters}]},
                         {}, "inline")  # fmt: skip


# --- DataComp's text-based filtering, by names ---------------------------------------------

TEXT_CAPTIONS = {
    "a great white shark near the reef": None,
    "Beagle puppy, 8 weeks old!": None,  # lower-cased, as WordNet's look-up
    "a Tench caught in the lake": None,
    "a brown dog running on a sandy beach": None,  # "beach" names class 978 (seashore)
    "a red car parked in front of a house": "concept_match",
    "the concatenate function": "concept_match",
    "un grand requin blanc près du récif": "concept_match",
    "le goldfish nage dans son bocal rond": "language",  # names a class, not English
    "ein Beagle spielt im Garten mit einem Ball": "language",
}


def test_concept_match_filter_keeps_captions_naming_a_class():
    flt = build(FILTERS["concept_match"], {}, "concept_match")
    assert pickle.loads(pickle.dumps(flt)) == flt
    batch = pa.table(
        {"caption": [*TEXT_CAPTIONS, None, "a tench"], "caption_error": [None] * 10 + ["bad"]}
    )
    keep = flt.keep(batch).tolist()
    assert keep == [r != "concept_match" for r in TEXT_CAPTIONS.values()] + [False, False]
    # Case-sensitive, the list's "Beagle" is found, its "tench" not in "a Tench".
    cased = build(FILTERS["concept_match"], {"lowercase": False}, "concept_match")
    assert cased.keep(batch).tolist()[:3] == [True, True, False]


def test_datacomp_text_recipe_runs_and_charges_each_drop(tmp_path: Path):
    pool = tmp_path / "pool.parquet"
    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(len(TEXT_CAPTIONS) + 1)]
    pq.write_table(pa.table({"url": urls, "caption": [*TEXT_CAPTIONS, None]}), pool)
    run_recipe(load_recipe("datacomp_text"), pool, tmp_path / "run", engine="local")
    ledger = pq.read_table(tmp_path / "run" / "ledger").to_pylist()
    reasons = {r["caption"]: r["dropped_by"] for r in ledger}
    assert reasons == {**TEXT_CAPTIONS, None: "caption_valid"}
    assert all(r["keep"] == (r["dropped_by"] is None) for r in ledger)
