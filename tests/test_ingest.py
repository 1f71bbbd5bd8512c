"""The ingest stage on real files: Parquet, CSV and JSONL, well-formed and hostile.

Every error case asserts that the message names the file and the problem, since
that message is all a user running a 10^8-row job gets to fix their input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pools import random_hex, run_ingest, write_bytes

import curate.io.readers
import curate.stages.ingest
from curate.core.config import ConfigError, build
from curate.core.schema import LEDGER_SCHEMA, stable_uid
from curate.core.stage import StageContext
from curate.engine.local import LocalEngine
from curate.stages.ingest import IngestError, IngestStage

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def parquet(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def ingest_error(path: Path, tmp_path: Path, **params) -> str:
    with pytest.raises(IngestError) as info:
        run_ingest(path, tmp_path, **params)
    return str(info.value)


def assert_core(table: pa.Table) -> None:
    """The ledger contract every ingest output meets."""
    for name in ("uid", "url", "caption", "caption_error", "keep", "dropped_by"):
        assert table.schema.field(name).type == LEDGER_SCHEMA.field(name).type
    assert all(HEX32.match(u) for u in table["uid"].to_pylist())
    assert table["keep"].to_pylist() == [True] * table.num_rows
    assert table["dropped_by"].null_count == table.num_rows


# --- well-formed inputs


def test_parquet_defaults_compute_stable_uids_and_pass_columns_through(tmp_path):
    urls = [f"https://example.com/{i}.jpg" for i in range(5)]
    captions = ["a dog", "a cat", None, "", "a bird"]
    src = parquet(
        tmp_path / "in.parquet",
        {"url": urls, "caption": captions, "score": [0.5, 0.1, 0.2, 0.3, 0.4]},
    )
    table, rows, ctx = run_ingest(src, tmp_path)
    assert rows == 5 and table.num_rows == 5
    assert_core(table)
    assert table.column_names == [
        "uid",
        "url",
        "caption",
        "caption_error",
        "score",
        "keep",
        "dropped_by",
    ]
    assert table["uid"].to_pylist() == [stable_uid(u, c) for u, c in zip(urls, captions)]
    assert table["caption"].to_pylist() == captions  # null and empty captions are kept
    assert table["caption_error"].null_count == 5
    assert table["score"].to_pylist() == [0.5, 0.1, 0.2, 0.3, 0.4]
    assert ctx.counters["uids"] == "computed" and ctx.counters["rows"] == 5
    again, _, _ = run_ingest(src, tmp_path / "again")
    assert again["uid"].equals(table["uid"])  # stable across runs


def test_parquet_configured_columns_keep_input_uids_lowercased(tmp_path):
    uids = random_hex(np.random.default_rng(1), 3).to_pylist()
    src = parquet(
        tmp_path / "in.parquet",
        {
            "id": [uids[0].upper(), uids[1], uids[2]],
            "link": ["a", "b", "c"],
            "alt": ["x", "y", "z"],
        },
    )
    table, _, ctx = run_ingest(
        src, tmp_path, url_column="link", caption_column="alt", uid_column="id"
    )
    assert table["uid"].to_pylist() == uids
    assert table["url"].to_pylist() == ["a", "b", "c"]
    assert table["caption"].to_pylist() == ["x", "y", "z"]
    assert "id" not in table.column_names and "link" not in table.column_names
    assert ctx.counters["uids"] == "input"


def test_text_column_is_the_caption_when_there_is_no_caption_column(tmp_path):
    src = parquet(tmp_path / "in.parquet", {"url": ["u1", "u2"], "text": ["t1", "t2"]})
    table, _, _ = run_ingest(src, tmp_path)
    assert table["caption"].to_pylist() == ["t1", "t2"]
    assert "text" not in table.column_names


def test_ledger_columns_in_the_input_get_the_ledger_type(tmp_path):
    src = parquet(
        tmp_path / "in.parquet",
        {
            "url": ["a", "b"],
            "caption": ["x", "y"],
            "original_width": [640, None],
            "original_height": [480.0, 2_000_000_000.0],
            "lang": pa.array(["en", "fr"]).dictionary_encode(),
        },
    )
    table, _, _ = run_ingest(src, tmp_path)
    assert table.schema.field("original_width").type == pa.int32()
    assert table.schema.field("original_height").type == pa.int32()
    assert table.schema.field("lang").type == pa.string()
    assert table["original_width"].to_pylist() == [640, None]
    assert table["original_height"].to_pylist() == [480, 2_000_000_000]
    assert table["lang"].to_pylist() == ["en", "fr"]


def test_csv_defaults_and_configured_columns(tmp_path):
    src = write_bytes(tmp_path / "in.csv", b"url,caption,note\nhttp://a,a dog,x\nhttp://b,a cat,\n")
    table, rows, _ = run_ingest(src, tmp_path)
    assert rows == 2
    assert_core(table)
    assert table["url"].to_pylist() == ["http://a", "http://b"]
    assert table["note"].to_pylist() == ["x", None]  # CSV columns pass through as text
    other = write_bytes(tmp_path / "b" / "in.tsv", b"ID\tLINK\tALT\n" + b"A" * 32 + b"\tu\tc\n")
    table, _, _ = run_ingest(
        other, tmp_path / "b", url_column="LINK", caption_column="ALT", uid_column="ID"
    )
    assert table["uid"].to_pylist() == ["a" * 32]
    assert (table["url"][0].as_py(), table["caption"][0].as_py()) == ("u", "c")


def test_csv_hostile_but_valid_input_is_read_exactly(tmp_path):
    big = "word " * 200_000  # a 1 MB caption
    data = (
        b"\xef\xbb\xbfurl,caption,original_width\r\n"  # BOM and CRLF
        b'http://a,"two\r\nlines, quoted",640\r\n'  # quoted newline and comma
        b"http://b,nul\x00byte,\r\n"  # NUL byte, empty width
        b'http://c,"",12\r\n'  # quoted empty caption
        b"http://d,,12\r\n"  # unquoted empty caption: null
        b"http://e,NA,12\r\n"  # "NA" is text, not null
        + f"http://f,{big},1\r\n".encode()
        + b",no url,1\r\n"
        + b'http://g,a 12" pizza,1\r\n'  # a literal quote inside an unquoted field
    )
    table, rows, _ = run_ingest(write_bytes(tmp_path / "in.csv", data), tmp_path)
    assert rows == 8
    assert table["caption"].to_pylist() == [
        "two\r\nlines, quoted",
        "nul\x00byte",
        "",
        None,
        "NA",
        big,
        "no url",
        'a 12" pizza',
    ]
    assert table["url"].to_pylist()[-2] is None  # kept: download drops it with a reason
    assert table["original_width"].type == pa.int32()
    assert table["original_width"].to_pylist() == [640, None, 12, 12, 12, 1, 1, 1]
    assert table["caption_error"].null_count == 8


def test_zero_row_and_empty_files_give_an_empty_ledger(tmp_path):
    header_only = write_bytes(tmp_path / "a" / "in.csv", b"url,caption\n")
    table, rows, _ = run_ingest(header_only, tmp_path / "a")
    assert rows == 0 and table.num_rows == 0
    assert {"uid", "url", "caption", "keep"} <= set(table.column_names)
    folder = tmp_path / "b" / "pool"
    write_bytes(folder / "0.jsonl", b"")  # zero bytes: no rows, no columns
    write_bytes(folder / "1.jsonl", b'{"url": "u", "caption": "c"}\n')
    table, rows, _ = run_ingest(folder, tmp_path / "b")
    assert rows == 1 and table["url"].to_pylist() == ["u"]


def test_jsonl_defaults_types_and_hostile_lines(tmp_path):
    lines = [
        '\ufeff{"url": "http://a", "caption": "plain", "n": 1, "x": null}',  # BOM
        "",  # blank line
        '{"url": "http://b", "caption": "nul \\u0000 and tab\t", "n": 2.5, "x": null}',
        '{"url": "http://c", "caption": null, "n": null, "x": null, "later": [1, 2]}',
        '{"url": "", "caption": "", "extra": "only here", "later": "text"}',
    ]
    src = write_bytes(tmp_path / "in.jsonl", "\r\n".join(lines).encode() + b"\r\n")
    table, rows, _ = run_ingest(src, tmp_path)
    assert rows == 4
    assert_core(table)
    assert table["caption"].to_pylist() == ["plain", "nul \x00 and tab\t", None, ""]
    assert table["url"].to_pylist() == ["http://a", "http://b", "http://c", ""]
    assert table.schema.field("n").type == pa.float64()  # ints and floats: float64
    assert table["n"].to_pylist() == [1.0, 2.5, None, None]
    assert table.schema.field("x").type == pa.null()  # all-null column
    assert table["extra"].to_pylist() == [None, None, None, "only here"]
    assert table["later"].to_pylist() == [None, None, "[1, 2]", "text"]  # mixed: JSON text


def test_parquet_text_columns_of_every_arrow_text_type(tmp_path):
    bad_url = pa.array([b"http://ok", b"http://\xff", None], pa.binary())
    src = parquet(
        tmp_path / "in.parquet",
        {
            "url": bad_url,
            "caption": pa.array(["a", "b", "c"], pa.large_string()).dictionary_encode(),
            "note": pa.array(["x", None, "z"], pa.large_string()),
            "nothing": pa.nulls(3),
        },
    )
    table, _, _ = run_ingest(src, tmp_path)
    assert table["url"].to_pylist() == ["http://ok", None, None]
    assert table["caption"].to_pylist() == ["a", "b", "c"]
    assert table.schema.field("caption").type == pa.string()
    assert table.schema.field("note").type == pa.large_string()
    assert table["nothing"].null_count == 3
    all_null = parquet(tmp_path / "b.parquet", {"url": pa.nulls(1), "caption": pa.nulls(1)})
    table, rows, _ = run_ingest(all_null, tmp_path / "b")
    assert rows == 1 and table.to_pylist()[0] | {"uid": None} == {
        "uid": None,
        "url": None,
        "caption": None,
        "caption_error": None,
        "keep": True,
        "dropped_by": None,
    }
    assert table["uid"][0].as_py() == stable_uid(None, None)


def test_compressed_csv_and_a_1mb_jsonl_caption(tmp_path):
    import gzip

    src = write_bytes(tmp_path / "in.csv.gz", gzip.compress(b"url,caption\nu,c\n"))
    table, _, _ = run_ingest(src, tmp_path)
    assert table["caption"].to_pylist() == ["c"]
    big = "x" * 1_000_000
    js = write_bytes(tmp_path / "b" / "in.jsonl", json.dumps({"url": "u", "caption": big}).encode())
    table, _, _ = run_ingest(js, tmp_path / "b")
    assert table["caption"].to_pylist() == [big]


def test_jsonl_configured_columns(tmp_path):
    src = write_bytes(
        tmp_path / "in.ndjson", b'{"key": "' + b"F" * 32 + b'", "u": "x", "t": "y"}\n'
    )
    table, _, _ = run_ingest(src, tmp_path, url_column="u", caption_column="t", uid_column="key")
    assert table.to_pylist()[0] | {"keep": None} == {
        "uid": "f" * 32,
        "url": "x",
        "caption": "y",
        "caption_error": None,
        "keep": None,
        "dropped_by": None,
    }


# --- text that is not valid UTF-8: kept, flagged


def test_invalid_utf8_caption_in_csv_is_kept_and_flagged(tmp_path):
    data = b"url,caption\nhttp://a,caf\xe9 au lait\nhttp://b,fine\nhttp://\xff,bad url\n"
    table, rows, ctx = run_ingest(write_bytes(tmp_path / "in.csv", data), tmp_path)
    assert rows == 3
    assert table["caption"].to_pylist() == ["caf\ufffd au lait", "fine", "bad url"]
    assert table["caption_error"].to_pylist() == ["invalid utf-8", None, None]
    assert table["url"].to_pylist() == ["http://a", "http://b", None]  # unreadable url: null
    assert ctx.counters["invalid_utf8_captions"] == 1


def test_invalid_utf8_caption_in_parquet_is_kept_and_flagged(tmp_path):
    raw = pa.array([b"ok", b"bad \xc3\x28 bytes", None], pa.binary())
    for name, captions in {"string": raw.view(pa.string()), "binary": raw}.items():
        src = parquet(tmp_path / name / "in.parquet", {"url": ["a", "b", "c"], "caption": captions})
        table, _, _ = run_ingest(src, tmp_path / name)
        assert table.schema.field("caption").type == pa.string()
        assert table["caption"].to_pylist() == ["ok", "bad \ufffd( bytes", None]
        assert table["caption_error"].to_pylist() == [None, "invalid utf-8", None]


def test_surrogates_and_raw_bytes_in_jsonl_are_flagged(tmp_path):
    data = (
        b'{"url": "a", "caption": "lone \\ud800 surrogate"}\n'
        b'{"url": "b", "caption": "raw \xff byte"}\n'
        b'{"url": "c", "caption": "pair \\ud83d\\udc36 ok"}\n'
        b'{"url": "\\udfff", "caption": "bad url"}\n'
    )
    table, _, _ = run_ingest(write_bytes(tmp_path / "in.jsonl", data), tmp_path)
    captions = table["caption"].to_pylist()
    assert "\ufffd" in captions[0] and captions[0].startswith("lone ")
    assert captions[1] == "raw \ufffd byte"
    assert captions[2] == "pair 🐶 ok"
    assert table["caption_error"].to_pylist() == ["invalid utf-8", "invalid utf-8", None, None]
    assert table["url"].to_pylist() == ["a", "b", "c", None]


# --- rows in == rows out, parts, order, determinism


def test_a_large_file_is_read_in_pieces_of_row_groups(tmp_path):
    """Each piece (whole row groups, about rows_per_file rows) is a task of its own; rows,
    order, errors and duplicates come out as from one reader."""
    n = 30
    uids = [f"{i:032x}" for i in range(n)]
    table = pa.table({"uid": uids, "url": [f"u{i}" for i in range(n)], "caption": ["c"] * n})
    src = tmp_path / "big.parquet"
    pq.write_table(table, src, row_group_size=3)  # 10 row groups
    got, rows, _ = run_ingest(src, tmp_path, rows_per_file=7)
    assert rows == n and got["uid"].to_pylist() == uids
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == 5  # pieces of two row groups (6 rows): 10 groups, 5 tasks
    bad = table.set_column(0, "uid", pa.array([*uids[:25], "nope", *uids[26:]]))
    pq.write_table(bad, src, row_group_size=3)
    assert f"{src}: row 25: malformed uid 'nope'" in ingest_error(src, tmp_path, rows_per_file=7)
    twice = table.set_column(0, "uid", pa.array([*uids[:28], uids[2], uids[29]]))
    pq.write_table(twice, src, row_group_size=3)
    message = ingest_error(src, tmp_path, rows_per_file=7)
    assert f"{uids[2]} at {src} row 2, {src} row 28" in message


def test_rows_in_equal_rows_written_across_files_and_parts(tmp_path):
    folder = tmp_path / "pool"
    sizes = [7, 0, 13, 1]
    expected = []
    for i, n in enumerate(sizes):
        urls = [f"http://{i}/{j}" for j in range(n)]
        parquet(
            folder / f"{i:02d}.parquet",
            {"url": pa.array(urls, pa.string()), "caption": pa.array(["c"] * n, pa.string())},
        )
        expected += urls
    parquet(folder / "_ignored.parquet", {"url": ["junk"], "caption": ["junk"]})
    table, rows, ctx = run_ingest(folder, tmp_path, rows_per_file=5)
    assert rows == sum(sizes) == table.num_rows
    assert table["url"].to_pylist() == expected  # sorted files, input row order
    # Parts of at most rows_per_file rows, each from one input file (a task's), in input order.
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert [p.name for p in parts] == [
        "part-00000-00000-000.parquet",
        "part-00000-00000-001.parquet",
        "part-00002-00000-000.parquet",
        "part-00002-00000-001.parquet",
        "part-00002-00000-002.parquet",
        "part-00003-00000-000.parquet",
    ]
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [5, 2, 5, 5, 3, 1]
    assert ctx.counters["input_files"] == 4
    squeezed, _, _ = run_ingest(folder, tmp_path / "zstd", rows_per_file=5, compression="zstd")
    assert squeezed.equals(table)
    codec = pq.ParquetFile(tmp_path / "zstd" / "out" / parts[0].name).metadata
    assert codec.row_group(0).column(2).compression == "ZSTD"  # caption; uid stays plain
    assert codec.row_group(0).column(0).compression == "UNCOMPRESSED"
    first = [p.read_bytes() for p in parts]
    run_ingest(folder, tmp_path / "again", rows_per_file=5)
    again = sorted((tmp_path / "again" / "out").glob("part-*.parquet"))
    assert [p.read_bytes() for p in again] == first  # byte-identical reruns


def test_batches_are_cut_by_bytes_and_rows_still_line_up(tmp_path, monkeypatch):
    """Wide rows (1 MB captions) must not make batches of 65,536 rows: they are cut by bytes."""
    monkeypatch.setattr(curate.io.readers, "BATCH_BYTES", 2_000)
    n = 5000
    urls = [f"http://x/{i}" for i in range(n)]
    src = parquet(tmp_path / "in.parquet", {"url": urls, "caption": ["c" * 50] * n})
    source = curate.io.readers.open_source(src, "parquet")
    sizes = [b.num_rows for b in curate.io.readers.iter_batches(source, 1 << 16)]
    assert sizes == [1024] * 4 + [904]  # 1,024 rows is the floor
    lines = "".join(json.dumps({"url": u, "caption": "c" * 50}) + "\n" for u in urls)
    js = write_bytes(tmp_path / "in.jsonl", lines.encode())
    source = curate.io.readers.open_source(js, "jsonl")
    assert len(list(curate.io.readers.iter_batches(source, 1 << 16))) > 100
    for path in (src, js):
        table, rows, _ = run_ingest(path, tmp_path / path.suffix, rows_per_file=777)
        assert rows == n and table["url"].to_pylist() == urls


def test_plan_validates_before_anything_is_written(tmp_path):
    src = parquet(tmp_path / "in.parquet", {"link": ["a"], "caption": ["b"]})
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(tmp_path, out, [], None, input_path=src, engine=LocalEngine())
    with pytest.raises(IngestError, match="no url column 'url'"):
        IngestStage().plan(ctx)
    assert list(out.iterdir()) == []


# --- errors: each names the file and the problem


def test_missing_columns_list_what_the_file_has(tmp_path):
    src = parquet(tmp_path / "in.parquet", {"link": ["a"], "alt": ["b"]})
    message = ingest_error(src, tmp_path)
    assert str(src) in message and "no url column 'url'" in message and "link, alt" in message
    message = ingest_error(src, tmp_path, url_column="link")
    assert str(src) in message and "no caption column 'text'" in message
    csv = write_bytes(tmp_path / "in.csv", b"url,title\nu,t\n")
    message = ingest_error(csv, tmp_path, caption_column="alt")
    assert str(csv) in message and "no caption column 'alt'" in message and "url, title" in message
    message = ingest_error(csv, tmp_path, caption_column="title", uid_column="id")
    assert "no uid column 'id'" in message


def test_url_column_that_is_not_text(tmp_path):
    src = parquet(tmp_path / "in.parquet", {"url": [1, 2], "caption": ["a", "b"]})
    message = ingest_error(src, tmp_path)
    assert (
        str(src) in message and "url column 'url' must hold text" in message and "int64" in message
    )
    js = write_bytes(
        tmp_path / "in.jsonl", b'{"url": "a", "caption": "x"}\n{"url": 7, "caption": "y"}\n'
    )
    message = ingest_error(js, tmp_path)
    assert str(js) in message and "line 2 holds a JSON integer" in message
    js2 = write_bytes(tmp_path / "b.jsonl", b'{"url": "a", "caption": {"t": 1}}\n')
    assert "caption column 'caption' must hold text" in ingest_error(js2, tmp_path)


@pytest.fixture(params=[1, 7])
def uid_check(request, monkeypatch):
    """Run duplicate tests with every uid in one partition, and spread over seven."""
    monkeypatch.setattr(curate.stages.ingest, "uid_partitions", lambda pieces: request.param)
    return request.param


def test_duplicate_uids_within_a_file(tmp_path, uid_check):
    uid = "ab" * 16
    src = parquet(
        tmp_path / "in.parquet",
        {"uid": [uid, "cd" * 16, uid.upper()], "url": ["a", "b", "c"], "caption": ["x"] * 3},
    )
    message = ingest_error(src, tmp_path)
    assert "duplicate uids" in message and uid in message
    assert f"{src} row 0" in message and f"{src} row 2" in message


def test_duplicate_uids_across_files_name_both_files(tmp_path, uid_check):
    folder = tmp_path / "pool"
    uid = "0123456789abcdef" * 2
    a = parquet(
        folder / "a.parquet", {"uid": ["f" * 32, uid], "url": ["1", "2"], "caption": ["x", "y"]}
    )
    b = parquet(folder / "b.parquet", {"uid": [uid], "url": ["3"], "caption": ["z"]})
    message = ingest_error(folder, tmp_path, rows_per_file=1)
    assert uid in message and f"{a} row 1" in message and f"{b} row 0" in message


def test_duplicate_computed_uids_explain_the_repeated_pair(tmp_path, uid_check):
    src = write_bytes(tmp_path / "in.csv", b"url,caption\nu,c\nv,c\nu,c\n")
    message = ingest_error(src, tmp_path)
    assert (
        stable_uid("u", "c") in message and f"{src} row 0" in message and f"{src} row 2" in message
    )
    assert "same (url, caption) pair" in message


def test_many_duplicates_are_counted_and_a_few_shown(tmp_path, uid_check):
    uids = [f"{i % 5:032x}" for i in range(40)]  # 5 uids, 8 times each
    src = parquet(tmp_path / "in.parquet", {"uid": uids, "url": ["u"] * 40, "caption": ["c"] * 40})
    message = ingest_error(src, tmp_path, rows_per_file=7)
    assert "5 uid(s) occur more than once" in message
    assert f"{0:032x} at {src} row 0, {src} row 5, {src} row 10" in message
    assert f"{2:032x} at" in message and f"{3:032x} at" not in message  # three shown


def test_colliding_keys_are_settled_by_comparing_full_uids(tmp_path, monkeypatch):
    """Equal 64-bit keys are only candidates: with every key equal, the check stays exact."""
    monkeypatch.setattr(curate.io.uids, "uid_keys", lambda uids: np.zeros(len(uids), np.uint64))
    sequential = [f"{i:032x}" for i in range(1000)]
    src = parquet(
        tmp_path / "ok.parquet", {"uid": sequential, "url": ["u"] * 1000, "caption": ["c"] * 1000}
    )
    table, rows, _ = run_ingest(src, tmp_path)
    assert rows == 1000 and table["uid"].to_pylist() == sequential
    bad = parquet(
        tmp_path / "bad.parquet",
        {"uid": [*sequential, sequential[7]], "url": ["u"] * 1001, "caption": ["c"] * 1001},
    )
    message = ingest_error(bad, tmp_path)
    assert (
        f"1 uid(s) occur more than once: {sequential[7]} at {bad} row 7, {bad} row 1000" in message
    )


@pytest.mark.parametrize(
    ("uids", "problem"),
    [
        (["a" * 32, None], "row 1: null uid"),
        (["a" * 32, "a" * 31], "row 1: malformed uid"),
        (["g" * 32, "a" * 32], "row 0: malformed uid 'gggg"),
        (["a" * 32, "a" * 30 + "é"], "row 1: malformed uid"),
    ],
)
def test_null_and_malformed_uids(tmp_path, uids, problem):
    src = parquet(tmp_path / "in.parquet", {"uid": uids, "url": ["a", "b"], "caption": ["x", "y"]})
    message = ingest_error(src, tmp_path)
    assert str(src) in message and problem in message


def test_uids_that_are_not_text(tmp_path):
    src = parquet(
        tmp_path / "in.parquet", {"uid": [1, 2], "url": ["a", "b"], "caption": ["x", "y"]}
    )
    message = ingest_error(src, tmp_path)
    assert str(src) in message and "uid column 'uid' must hold text" in message


@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("trunc.parquet", None, "cannot read as Parquet"),
        ("garbage.parquet", b"\x00\xffnot a parquet file" * 20, "cannot read as Parquet"),
        ("rows.csv", b"url,caption\na,b\nc,d,e\n", "Row #3: Expected 2 columns, got 3"),
        ("quote.csv", b'url,caption\na,b\nc,"never closed\nd,e\n', "line 3: a quoted field opens"),
        ("bad.jsonl", b'{"url": "a", "caption": "b"}\n{"url": "a",\n', "line 2: not valid JSON"),
        ("list.jsonl", b'{"url": "a", "caption": "b"}\n[1]\n', "line 2: expected a JSON object"),
        ("array.json", b'[\n{"url": "a", "caption": "b"}\n]\n', "line 1: not valid JSON"),
        ("big.jsonl", b'{"url": "a", "caption": "b", "n": 123456789012345678901234}\n', "'n'"),
        ("nul.jsonl", b'{"url": "a", "caption": "b"}\x00\n', "line 1: not valid JSON"),
        ("dup.csv", b"url,caption,url\na,b,c\n", "column 'url' appears twice"),
    ],
)
def test_corrupt_files(tmp_path, name, data, problem):
    if data is None:  # a real parquet file cut in half
        whole = parquet(tmp_path / "whole.parquet", {"url": ["a"] * 100, "caption": ["b"] * 100})
        data = whole.read_bytes()[: whole.stat().st_size // 2]
    src = write_bytes(tmp_path / "in" / name, data)
    message = ingest_error(src, tmp_path)
    assert str(src) in message and problem in message


def test_corrupt_parquet_pages_fail_with_the_file_name(tmp_path):
    src = parquet(
        tmp_path / "in.parquet", {"url": [f"u{i}" for i in range(1000)], "caption": ["c"] * 1000}
    )
    data = bytearray(src.read_bytes())
    data[100:1500] = b"\x55" * 1400  # scribble over the column pages, keep the footer
    src.write_bytes(bytes(data))
    message = ingest_error(src, tmp_path)
    assert str(src) in message and "cannot read as Parquet" in message


def test_empty_folder_missing_path_and_unknown_extension(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no data here")
    message = ingest_error(tmp_path / "empty", tmp_path)
    assert str(tmp_path / "empty") in message and "has no input files" in message
    assert "no such file or folder" in ingest_error(tmp_path / "nope", tmp_path)
    odd = write_bytes(tmp_path / "pool.txt", b"url,caption\n")
    assert "cannot tell the format" in ingest_error(odd, tmp_path)
    table, _, _ = run_ingest(odd, tmp_path / "forced", format="csv")  # an explicit format reads it
    assert table.num_rows == 0


def test_folder_mixing_formats(tmp_path):
    write_bytes(tmp_path / "pool" / "a.csv", b"url,caption\nu,c\n")
    write_bytes(tmp_path / "pool" / "b.jsonl", b'{"url": "v", "caption": "d"}\n')
    message = ingest_error(tmp_path / "pool", tmp_path)
    assert "mixes formats (csv, jsonl)" in message
    table, _, _ = run_ingest(tmp_path / "pool", tmp_path / "only", format="jsonl")
    assert table["url"].to_pylist() == ["v"]


def test_sizes_that_do_not_fit_int32(tmp_path):
    src = parquet(
        tmp_path / "in.parquet",
        {"url": ["a", "b", "c"], "caption": ["x"] * 3, "original_width": [10, 3_000_000_000, 5]},
    )
    message = ingest_error(src, tmp_path)
    assert str(src) in message and "row 1" in message and "'original_width'" in message
    assert "3000000000" in message and "int32" in message
    csv = write_bytes(tmp_path / "in.csv", b"url,caption,original_height\na,b,12\nc,d,tall\n")
    message = ingest_error(csv, tmp_path)
    assert str(csv) in message and "row 1" in message and "'tall'" in message


@pytest.mark.parametrize("reserved", ["keep", "dropped_by", "caption_error"])
def test_reserved_columns(tmp_path, reserved):
    src = parquet(tmp_path / "in.parquet", {"url": ["a"], "caption": ["b"], reserved: [None]})
    message = ingest_error(src, tmp_path)
    assert str(src) in message and f"column {reserved!r} is reserved" in message


def test_conflicting_columns_across_files_and_names(tmp_path):
    folder = tmp_path / "pool"
    a = parquet(folder / "a.parquet", {"url": ["a"], "caption": ["b"], "w": [1]})
    b = parquet(folder / "b.parquet", {"url": ["c"], "caption": ["d"], "w": ["wide"]})
    message = ingest_error(folder, tmp_path)
    assert str(a) in message and str(b) in message and "column 'w'" in message
    both = parquet(tmp_path / "both.parquet", {"url": ["a"], "link": ["b"], "caption": ["c"]})
    assert "has a 'url' column and also url_column 'link'" in ingest_error(
        both, tmp_path, url_column="link"
    )


def test_columns_missing_from_some_files_are_null_there(tmp_path):
    folder = tmp_path / "pool"
    parquet(
        folder / "a.parquet", {"url": ["a"], "caption": ["b"], "w": pa.array([None], pa.null())}
    )
    parquet(
        folder / "b.parquet",
        {"url": ["c"], "caption": ["d"], "w": pa.array([3], pa.int16()), "extra": ["e"]},
    )
    table, _, _ = run_ingest(folder, tmp_path)
    assert table.schema.field("w").type == pa.int16()
    assert table["w"].to_pylist() == [None, 3]
    assert table["extra"].to_pylist() == [None, "e"]


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="rows_per_file"):
        build(IngestStage, {"rows_per_file": 0}, "stages[0]")
    with pytest.raises(ConfigError, match="url_column"):
        IngestStage(url_column="")
    with pytest.raises(ConfigError, match="compression"):
        IngestStage(compression="brotli")
    with pytest.raises(ConfigError, match="'xml' is not one of"):
        build(IngestStage, {"format": "xml"}, "stages[0]")
    stage = build(IngestStage, {"format": "csv", "rows_per_file": 10}, "stages[0]")
    assert (stage.format, stage.rows_per_file, stage.caption_column) == ("csv", 10, None)


def test_counters_are_json(tmp_path):
    src = parquet(tmp_path / "in.parquet", {"url": ["a"], "caption": ["b"]})
    _, _, ctx = run_ingest(src, tmp_path)
    assert json.loads(json.dumps(ctx.counters))["format"] == "parquet"


def test_nan_sizes_from_pandas_are_unknown_not_errors(tmp_path):
    # pandas stores an integer column with gaps as float64, the gaps as NaN.
    src = parquet(
        tmp_path / "in.parquet",
        {
            "url": ["a", "b", "c"],
            "caption": ["x"] * 3,
            "original_width": [640.0, float("nan"), None],
        },
    )
    table, _, _ = run_ingest(src, tmp_path)
    assert table["original_width"].type == pa.int32()
    assert table["original_width"].to_pylist() == [640, None, None]
    half = parquet(
        tmp_path / "half.parquet", {"url": ["a"], "caption": ["x"], "original_width": [200.5]}
    )
    assert "200.5" in ingest_error(half, tmp_path / "h")
