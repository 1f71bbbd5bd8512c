"""The download stage: real img2dataset, a real HTTP server on 127.0.0.1, every bad case a row.

Traffic goes to 127.0.0.1 only. Other address ranges are tested through the
pure decision function, without a request.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.core.recipe import load_recipe, recipe_from_data
from curate.demo.serve import LoopbackServer, Rule
from curate.download import netguard
from curate.download.errors import failure_kind
from curate.download.robots import RobotsRules
from curate.io.image_guard import image_problem
from curate.io.images import image_shards
from curate.report.build import write_report
from curate.runner import run_recipe

CAPTION = "a photo of a red square on a white background"


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` × ``height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def hostile_site(root: Path) -> dict[str, bytes]:
    """Bodies by url path: good images in every odd encoding, and every kind of broken one."""
    y, x = np.mgrid[0:300, 0:400]
    rgb = Image.fromarray(
        np.stack([x * 255 // 400, y * 255 // 300, (x + y) % 256], -1).astype("uint8")
    )
    jpeg = encode(rgb, "JPEG")
    png = encode(rgb, "PNG")
    bodies = {
        "/ok.jpg": jpeg,
        "/cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "/gray.jpg": encode(rgb.convert("L"), "JPEG"),
        "/png16.png": encode(
            Image.fromarray((np.random.default_rng(1).random((300, 400)) * 65535).astype("uint16")),
            "PNG",
        ),
        "/rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "/la.png": encode(rgb.convert("LA"), "PNG"),
        "/palette.png": encode(rgb.convert("P"), "PNG"),
        "/anim.gif": encode(
            rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.rotate(90).convert("P")]
        ),
        "/anim.webp": encode(rgb, "WEBP", save_all=True, append_images=[rgb.rotate(90)]),
        "/truncated.jpg": jpeg[: len(jpeg) * 9 // 10],
        "/truncated.png": png[: len(png) // 2],
        "/empty.jpg": b"",
        "/page.jpg": b"<!DOCTYPE html><html><body>Not found</body></html>",
        "/garbage.jpg": np.random.default_rng(2).bytes(5000),
        "/bomb.png": png_declaring(30_000, 30_000),
        "/big.jpg": encode(noise(900, 900, seed=3), "JPEG", quality=100),  # > max_bytes below
        "/optout.jpg": jpeg,
        "/optout_token.jpg": jpeg,
        "/optout_other_bot.jpg": jpeg,
        "/e500.jpg": jpeg,
        "/stall.jpg": jpeg,
        "/redirected.jpg": jpeg,
        "/private/secret.jpg": jpeg,
        "/face.jpg": encode(noise(300, 400, seed=4), "JPEG", quality=95),
    }
    for path, body in bodies.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_bytes(body)
    (root / "robots.txt").write_text("User-agent: curate\nDisallow: /private/\n")
    return bodies


SITE_RULES = {
    "/optout.jpg": Rule(headers={"X-Robots-Tag": "noai"}),
    "/optout_token.jpg": Rule(headers={"X-Robots-Tag": "curate: noimageai, nofollow"}),
    "/optout_other_bot.jpg": Rule(headers={"X-Robots-Tag": "otherbot: noai"}),
    "/e500.jpg": Rule(status=500),
    "/stall.jpg": Rule(delay=4.0),
    "/redirect.jpg": Rule(redirect="/redirected.jpg"),
}

EXPECTED = {
    "/ok.jpg": "success",
    "/cmyk.jpg": "success",
    "/gray.jpg": "success",
    "/png16.png": "success",
    "/rgba.png": "success",
    "/la.png": "success",
    "/palette.png": "success",
    "/anim.gif": "success",
    "/anim.webp": "success",
    "/optout_other_bot.jpg": "success",
    "/redirect.jpg": "success",
    "/face.jpg": "success",
    "/truncated.jpg": "decode",
    "/truncated.png": "decode",
    "/empty.jpg": "decode",
    "/page.jpg": "decode",
    "/garbage.jpg": "decode",
    "/bomb.png": "too_large",
    "/big.jpg": "too_large",
    "/optout.jpg": "opt_out",
    "/optout_token.jpg": "opt_out",
    "/e500.jpg": "http_500",
    "/missing.jpg": "http_404",
    "/stall.jpg": "timeout",
    "/private/secret.jpg": "robots",
}
FACE_BOX = [0.25, 0.25, 0.75, 0.75]


def download_recipe(**download):
    return recipe_from_data(
        {
            "name": "download_test",
            "stages": [
                {"stage": "ingest"},
                {"stage": "download", "allow_private_networks": True, **download},
            ],
        },
        {},
        "test",
    )


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """One download of the hostile site (local engine, two processes); the server's log."""
    root = tmp_path_factory.mktemp("site")
    hostile_site(root)
    work = tmp_path_factory.mktemp("hostile_run")
    with LoopbackServer(root, SITE_RULES) as server:
        urls = [server.base_url + path for path in EXPECTED]
        urls += ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "not a url", None]
        boxes = [[FACE_BOX] if url and url.endswith("/face.jpg") else None for url in urls]
        pq.write_table(
            pa.table(
                {
                    "url": urls,
                    "caption": [f"{CAPTION} {i}" for i in range(len(urls))],
                    "face_bboxes": pa.array(boxes, pa.list_(pa.list_(pa.float64()))),
                }
            ),
            work / "urls.parquet",
        )
        recipe = download_recipe(timeout=1.0, max_bytes=400_000, processes_count=2)
        started = time.perf_counter()
        result = run_recipe(recipe, work / "urls.parquet", work / "run", engine="local")
        seconds = time.perf_counter() - started
        requests = list(server.requests)
    ledger = pq.read_table(work / "run" / "ledger").to_pylist()
    return {
        "ledger": ledger,
        "by_url": {r["url"]: r for r in ledger},
        "base": server.base_url,
        "requests": requests,
        "run": work / "run",
        "seconds": seconds,
        "report": write_report(recipe, result),
    }


def test_every_bad_case_is_a_row_with_its_reason(hostile_run):
    by_url, base = hostile_run["by_url"], hostile_run["base"]
    got = {path: by_url[base + path]["status"] for path in EXPECTED}
    assert got == EXPECTED
    for row in hostile_run["ledger"]:
        assert row["keep"] == (row["status"] == "success")
        assert row["dropped_by"] == (None if row["keep"] else "download")
        assert (row["error_message"] is None) == row["keep"]


def test_urls_that_are_not_http_are_refused_without_a_request(hostile_run):
    by_url = hostile_run["by_url"]
    assert by_url["file:///etc/passwd"]["status"] == "blocked"
    assert by_url["ftp://127.0.0.1/x.jpg"]["status"] == "blocked"
    assert by_url["not a url"]["status"] == "invalid_url"
    (null_row,) = [r for r in hostile_run["ledger"] if r["url"] is None]
    assert null_row["status"] == "invalid_url" and not null_row["keep"]


def test_decoded_images_have_sizes_hashes_and_bytes_beside_the_ledger(hostile_run):
    base, run = hostile_run["base"], hostile_run["run"]
    ok = hostile_run["by_url"][base + "/ok.jpg"]
    assert (ok["original_width"], ok["original_height"]) == (400, 300)
    assert (ok["width"], ok["height"]) == (400, 300)  # resize_only_if_bigger, 512 default
    assert len(ok["sha256"]) == 64
    images = pq.read_table(image_shards(run / "images"), columns=["uid", "jpg"]).to_pylist()
    stored = {r["uid"]: r["jpg"] for r in images if r["jpg"] is not None}
    successes = [r for r in hostile_run["ledger"] if r["status"] == "success"]
    assert {r["uid"] for r in successes} == set(stored)
    for row in successes:
        decoded = Image.open(io.BytesIO(stored[row["uid"]]))
        assert decoded.size == (row["width"], row["height"])
        # 8-bit JPEG: CMYK, alpha, palette and animations become RGB, greyscale stays L.
        assert decoded.format == "JPEG" and decoded.mode in ("RGB", "L")
    ledger_columns = pq.read_schema(next((run / "ledger").glob("*.parquet"))).names
    assert "jpg" not in ledger_columns


def test_robots_txt_is_fetched_once_and_disallowed_paths_never_requested(hostile_run):
    paths = [path for _, path, _ in hostile_run["requests"]]
    assert paths.count("/robots.txt") == 1  # two download processes, one fetch
    assert "/private/secret.jpg" not in paths
    agents = {agent for _, _, agent in hostile_run["requests"]}
    assert all("curate" in agent for agent in agents)  # identifiable, robots.txt included


def test_a_stalled_server_costs_its_timeout_not_the_run(hostile_run):
    row = hostile_run["by_url"][hostile_run["base"] + "/stall.jpg"]
    assert row["status"] == "timeout"
    assert "timed out" in row["error_message"]


def test_faces_are_blurred_when_the_input_has_face_boxes(hostile_run, tmp_path):
    run = hostile_run["run"]
    face = hostile_run["by_url"][hostile_run["base"] + "/face.jpg"]
    images = pq.read_table(image_shards(run / "images"), columns=["uid", "jpg"]).to_pylist()
    stored = next(r["jpg"] for r in images if r["uid"] == face["uid"])
    pixels = np.asarray(Image.open(io.BytesIO(stored)).convert("L"), dtype=float)
    h, w = pixels.shape
    inside = pixels[int(h * 0.35) : int(h * 0.65), int(w * 0.35) : int(w * 0.65)]
    outside = pixels[: int(h * 0.15), : int(w * 0.15)]
    # Noise keeps its variance outside the box; the blur flattens it inside.
    assert inside.std() < outside.std() / 3


def test_the_manifest_counts_failures_by_kind(hostile_run):
    import json

    manifest = json.loads(
        next((hostile_run["run"] / "stages").glob("*_download/_SUCCESS")).read_text()
    )
    counters = manifest["counters"]
    assert counters["attempted"] == len(hostile_run["ledger"])
    assert counters["success"] == sum(1 for v in EXPECTED.values() if v == "success")
    assert counters["failures"]["decode"] == 5
    assert counters["failures"]["blocked"] == 2
    assert counters["success"] + sum(counters["failures"].values()) == counters["attempted"]


def test_the_report_gives_the_success_rate_and_failures_by_kind(hostile_run):
    download = hostile_run["report"]["download"]
    statuses = [r["status"] for r in hostile_run["ledger"]]
    assert download["attempted"] == len(statuses)
    assert download["success"] == statuses.count("success")
    assert download["success_rate"] == round(statuses.count("success") / len(statuses), 4)
    assert download["failures"] == {k: statuses.count(k) for k in set(statuses) - {"success"}}
    md = (hostile_run["run"] / "report.md").read_text()
    assert "## Download" in md and "| timeout | 1 |" in md and "| robots | 1 |" in md


def test_loopback_urls_are_never_requested_while_private_networks_are_blocked(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "a.jpg").write_bytes(encode(noise(300, 300), "JPEG"))
    with LoopbackServer(root) as server:
        urls = [f"{server.base_url}/a.jpg", f"http://localhost:{server.port}/a.jpg"]
        pq.write_table(
            pa.table({"url": urls, "caption": [CAPTION, CAPTION]}), tmp_path / "u.parquet"
        )
        recipe = download_recipe(allow_private_networks=False, processes_count=1)
        run_recipe(recipe, tmp_path / "u.parquet", tmp_path / "run", engine="local")
        assert server.requests == []  # not the image, not even robots.txt
    ledger = pq.read_table(tmp_path / "run" / "ledger").to_pylist()
    assert [r["status"] for r in ledger] == ["blocked", "blocked"]
    assert "loopback" in ledger[0]["error_message"]


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("169.254.169.254", "link-local"),  # the cloud metadata endpoint
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("192.0.2.1", "private"),  # documentation range
        ("::1", "loopback"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_decision_for_every_range(ip, reason):
    assert netguard.address_block_reason(ip) == reason


def test_a_redirect_to_a_blocked_address_is_refused_before_connecting(tmp_path, monkeypatch):
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    decisions = iter([None])  # the first connection is "public", every later one private

    def decide(ip: str) -> str | None:
        return next(decisions, "private")

    monkeypatch.setattr(netguard, "address_block_reason", decide)
    rules = {"/start.jpg": Rule(redirect="/secret.jpg")}
    with LoopbackServer(tmp_path, rules) as server:
        opener = netguard.guarded_opener(allow_private=False, max_bytes=10_000, timeout=2)
        with pytest.raises(OSError, match="blocked:"):
            opener.open(server.base_url + "/start.jpg", timeout=2)
        assert server.paths_requested() == ["/start.jpg"]


def test_a_body_that_trickles_past_the_timeout_is_cut(tmp_path):
    class Trickle:
        def __init__(self):
            self.headers = {}

        def read(self, amt):
            time.sleep(0.3)
            return b"x" * 10

        def close(self):
            pass

    body = netguard._BoundedBody(Trickle(), max_bytes=10_000, timeout=1.0)
    started = time.perf_counter()
    with pytest.raises(OSError, match="timed out"):
        body.read()
    assert time.perf_counter() - started < 2.0


def test_robots_rules_follow_rfc_9309_answers():
    rules = RobotsRules(
        "curate",
        {
            "http://a.test": "User-agent: curate\nDisallow: /no/\n\nUser-agent: *\nDisallow: /",
            "http://b.test": "allow-all",
            "http://c.test": "disallow-all",
        },
        fetch_opener=None,
        timeout=1,
    )
    assert rules.allowed("http://a.test/yes.jpg")
    assert not rules.allowed("http://a.test/no/x.jpg")
    assert rules.allowed("http://b.test/anything.jpg")
    assert not rules.allowed("http://c.test/x.jpg")


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        ("success", None, "success"),
        ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns"),
        ("failed_to_download", "<urlopen error timed out>", "timeout"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection"),
        ("failed_to_download", "Remote end closed connection without response", "connection"),
        ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "opt_out"),
        (
            "failed_to_download",
            "<urlopen error blocked: x resolves to a private address>",
            "blocked",
        ),
        (
            "failed_to_download",
            "<urlopen error robots.txt disallows http://x/ for curate>",
            "robots",
        ),
        ("failed_to_download", "unknown url type: 'not a url'", "invalid_url"),
        ("failed_to_download", "Invalid IPv6 URL", "invalid_url"),
        ("failed_to_download", "'ascii' codec can't encode character '\\xe4'", "invalid_url"),
        ("failed_to_resize", "Image decoding error", "decode"),
        ("failed_to_resize", "too large: declared size 30000x30000", "too_large"),
        ("failed_to_resize", "some new OpenCV complaint", "decode"),
        ("failed_to_download", "something nobody has seen", "failed"),
    ],
)
def test_failure_kinds(status, message, kind):
    assert failure_kind(status, message) == kind


def test_image_problem_reads_headers_only():
    assert image_problem(b"", 10**8).startswith("decode: empty")
    assert "HTML" in image_problem(b"  <html><body></body></html>", 10**8)
    assert image_problem(png_declaring(20_000, 20_000), 10**8).startswith("too large")
    assert image_problem(png_declaring(200, 200), 10**8) is None
    assert image_problem(png_declaring(200, 200), 100).startswith("too large")


def test_a_killed_download_resumes_without_refetching_finished_shards(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    for i in range(30):
        (root / f"{i}.jpg").write_bytes(encode(noise(240, 240, seed=i), "JPEG"))
    slow = {f"/{i}.jpg": Rule(delay=3.0) for i in range(20, 30)}  # the last shard is slow
    (tmp_path / "recipe.yaml").write_text(
        "name: resume\nstages:\n  - stage: ingest\n  - stage: download\n"
        "    allow_private_networks: true\n    number_sample_per_shard: 10\n"
        "    processes_count: 1\n"
    )
    with LoopbackServer(root, slow) as server:
        urls = [f"{server.base_url}/{i}.jpg" for i in range(30)]
        pq.write_table(pa.table({"url": urls, "caption": [CAPTION] * 30}), tmp_path / "u.parquet")
        command = [sys.executable, "-m", "curate.cli", "run", str(tmp_path / "recipe.yaml")]
        command += ["--input", str(tmp_path / "u.parquet"), "--output", str(tmp_path / "run")]
        proc = subprocess.Popen([*command, "--engine", "local", "--quiet"], start_new_session=True)
        images = tmp_path / "run" / "images"
        deadline = time.monotonic() + 120
        while len(list(images.glob("*_stats.json"))) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and img2dataset's processes
        proc.wait()
        assert len(list(images.glob("*_stats.json"))) == 2  # the slow third shard unfinished

        server.requests.clear()
        recipe = load_recipe(str(tmp_path / "recipe.yaml"))
        run_recipe(recipe, tmp_path / "u.parquet", tmp_path / "run", engine="local")
        fetched = sorted(p for p in server.paths_requested() if p.endswith(".jpg"))
    assert fetched == sorted(f"/{i}.jpg" for i in range(20, 30))
    ledger = pq.read_table(tmp_path / "run" / "ledger").to_pylist()
    assert [r["status"] for r in ledger] == ["success"] * 30


def test_finished_image_shards_are_kept_only_for_the_same_urls_and_settings(tmp_path):
    from curate.core.runfolder import claim

    with claim(tmp_path / "run"):  # images/ is deleted only inside a run folder
        _check_prepare(tmp_path / "run")


def _check_prepare(run: Path) -> None:
    from curate.stages.download import DownloadStage

    images = run / "images"
    urls, other = "digest of a url list", "digest of another"
    layout = {"stride": 2, "width": 1}
    stage = DownloadStage(image_size=256)
    stage._prepare(images, urls, layout, run)
    (images / "0_stats.json").write_text("{}")  # a finished shard
    stage._prepare(images, urls, layout, run)
    assert (images / "0_stats.json").exists()
    DownloadStage(image_size=256, thread_count=4)._prepare(images, urls, layout, run)  # speed
    assert (images / "0_stats.json").exists()
    DownloadStage(image_size=384)._prepare(images, urls, layout, run)
    assert not (images / "0_stats.json").exists()
    (images / "0_stats.json").write_text("{}")
    DownloadStage(image_size=384)._prepare(images, other, layout, run)  # another url list
    assert not (images / "0_stats.json").exists()
    (images / "0_stats.json").write_text("{}")
    DownloadStage(image_size=384)._prepare(images, other, {"stride": 3, "width": 1}, run)
    assert not (images / "0_stats.json").exists()  # other shard ids


def _children(pid: int) -> set[int]:
    """The live child pids of ``pid``, from every one of its threads."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:  # the thread or the process is gone
            continue
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def _started(pid: int) -> str | None:
    """The start time of a live (not zombie) process, None once it is dead or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return None if fields[0] in "ZX" else fields[19]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree in /proc")
def test_download_processes_die_with_a_killed_run(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    body = encode(noise(64, 64), "JPEG")
    for i in range(80):
        (root / f"{i}.jpg").write_bytes(body)
    # Every image answers after 1 s: a 20-url shard takes each process 10 s on 2 threads.
    slow = {f"/{i}.jpg": Rule(delay=1.0) for i in range(80)}
    (tmp_path / "recipe.yaml").write_text(
        "name: orphans\nstages:\n  - stage: ingest\n  - stage: download\n"
        "    allow_private_networks: true\n    number_sample_per_shard: 20\n"
        "    processes_count: 2\n    thread_count: 2\n    respect_robots_txt: false\n"
    )
    survivors: dict[int, str] = {}
    with LoopbackServer(root, slow) as server:
        urls = [f"{server.base_url}/{i}.jpg" for i in range(80)]
        pq.write_table(pa.table({"url": urls, "caption": [CAPTION] * 80}), tmp_path / "u.parquet")
        command = [sys.executable, "-m", "curate.cli", "run", str(tmp_path / "recipe.yaml")]
        command += ["--input", str(tmp_path / "u.parquet"), "--output", str(tmp_path / "run")]
        proc = subprocess.Popen(
            [*command, "--engine", "local", "--quiet"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Both download processes at work: requests from each of the first two shards.
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                shards = {int(p[1:-4]) // 20 for p in server.paths_requested() if p.endswith("jpg")}
                if {0, 1} <= shards:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be killed"
            tree = {pid: _started(pid) for pid in _descendants(proc.pid)}
            survivors = {pid: start for pid, start in tree.items() if start}
            assert len(survivors) >= 2, f"no download processes under the run: {tree}"

            os.kill(proc.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
            proc.wait()
            killed = time.monotonic()
            while survivors and time.monotonic() < killed + 5:
                survivors = {p: s for p, s in survivors.items() if _started(p) == s}
                time.sleep(0.05)
            assert not survivors, f"{len(survivors)} of {len(tree)} processes outlived the run"
            # Nothing escaped the tree we saw either: the server hears no more requests.
            time.sleep(0.5)  # a request already on its way when the processes died
            heard = len(server.requests)
            time.sleep(2)
            assert len(server.requests) == heard, "requests after the run was killed"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid, start in survivors.items():
                if _started(pid) == start:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            proc.wait()


# Workers retired by maxtasksperchild are replaced by the pool's worker-handler thread, not
# by the thread that made the pool: the parent-death signal must cover those too.
REPLACED_WORKERS = """
import os, sys, time
from curate.engine.processes import dying_pool
pool = dying_pool(2, maxtasksperchild=1)
first = {p.pid for p in pool._pool}
while first & {p.pid for p in pool._pool}:
    pool.map(abs, range(4), chunksize=1)
busy = [pool.apply_async(time.sleep, (120,)) for _ in range(2)]
time.sleep(0.5)
print(*{p.pid for p in pool._pool} - first, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree in /proc")
def test_replacement_pool_workers_die_with_their_parent():
    proc = subprocess.Popen(
        [sys.executable, "-c", REPLACED_WORKERS],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers: dict[int, str | None] = {}
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        workers = {pid: _started(pid) for pid in pids}
        assert len(workers) == 2 and all(workers.values())
        assert set(workers) <= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while workers and time.monotonic() < deadline:
            workers = {p: s for p, s in workers.items() if _started(p) == s}
            time.sleep(0.05)
        assert not workers, f"{len(workers)} pool workers outlived their parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
