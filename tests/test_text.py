"""curate.text.words must count words exactly like Python's str.split() (DataComp's rule)."""

from __future__ import annotations

import itertools
import sys

import pyarrow as pa
import pytest

from curate.text.words import bigrams, word_counts, words

#: Every code point Python treats as whitespace, found by asking Python.
PY_WHITESPACE = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]


def test_python_whitespace_set_is_what_we_think():
    # The Unicode whitespace that arrow must also split on, including the odd ones.
    for ch in "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u200a\u2028\u2029\u3000":
        assert ch in PY_WHITESPACE
    assert "\u200b" not in PY_WHITESPACE  # zero-width space is not whitespace to Python
    assert "\ufeff" not in PY_WHITESPACE


def test_word_counts_equal_str_split_for_every_code_point():
    code_points = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    captions = [f"a{chr(c)}b" for c in code_points]
    counts = word_counts(pa.array(captions)).to_numpy()
    expected = [len(s.split()) for s in captions]
    wrong = [hex(c) for c, n, e in zip(code_points, counts, expected, strict=True) if n != e]
    assert wrong == []
    assert sum(n == 2 for n in counts) == len(PY_WHITESPACE)


@pytest.mark.parametrize("ws", PY_WHITESPACE, ids=lambda ch: f"U+{ord(ch):04X}")
def test_leading_trailing_and_runs_of_each_whitespace(ws):
    captions = [
        f"{ws}two words",
        f"two words{ws}",
        f"{ws}{ws}two{ws}{ws}{ws}words{ws}",
        ws,
        ws * 3,
        f"one{ws}",
        f"a{ws}b{ws}c",
    ]
    counts = word_counts(pa.array(captions)).to_pylist()
    assert counts == [len(s.split()) for s in captions]
    assert words(pa.array(captions)).to_pylist() == [s.split() for s in captions]


def test_empty_null_and_mixed_whitespace():
    captions = ["", None, " \t\n\u3000\x85 ", "x", " a\u2028b\xa0c\x1fd ", None, "end"]
    counts = word_counts(pa.array(captions))
    assert counts.type == pa.int32()
    assert counts.to_pylist() == [None if s is None else len(s.split()) for s in captions]
    assert words(pa.array(captions)).to_pylist() == [
        [] if s is None else s.split() for s in captions
    ]


def test_chunked_input_and_lowercase():
    chunked = pa.chunked_array([["Hello World"], [None, "ÀB  cD"]])
    assert word_counts(chunked).to_pylist() == [2, None, 2]
    assert words(chunked, lower=True).to_pylist() == [["hello", "world"], [], ["àb", "cd"]]


def test_bigrams_stay_within_a_row():
    captions = ["a b c", "", "d", None, "e f", " g  h "]
    grams = bigrams(words(pa.array(captions))).to_pylist()
    expected = []
    for s in captions:
        toks = (s or "").split()
        expected.append([f"{x} {y}" for x, y in itertools.pairwise(toks)])
    assert grams == expected == [["a b", "b c"], [], [], [], ["e f"], ["g h"]]


def test_bigrams_of_no_tokens():
    assert bigrams(words(pa.array(["", None, "   "]))).to_pylist() == [[], [], []]
