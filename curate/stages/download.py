"""The download stage: the ledger's urls through img2dataset, results joined back by uid.

img2dataset does the downloading, resizing, face blurring and writing (one engine
task per shard of urls: a Ray task, or on the local engine a process that dies
with this one), with
the crawl policy of ``curate.download.crawler`` built in: public addresses only unless
allowed, http(s) only, bounded size and time, robots.txt (fetched once per host
here, on the driver), decompression bombs refused before decoding. img2dataset
itself sends the user-agent token and honours X-Robots-Tag opt-outs.

Images stay beside the ledger, in img2dataset's Parquet shards under
``RUN/images/`` (uid, image bytes, sizes, sha256), never in ledger files. That
folder outlives a killed run: img2dataset skips shards whose stats file exists,
so a re-run fetches only what did not finish. It is wiped when the url list or a
download parameter changes.

In the ledger, ``status`` is ``success`` or the failure's kind
(``curate.download.errors``), ``error_message`` the text; a failed row is
dropped by this stage. Rows dropped earlier are not downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.config import ConfigError, Count, NonNegative, Positive, Range, params_of
from curate.core.layout import IMAGES
from curate.core.progress import FinishedRows, Progress
from curate.core.runfolder import remove_tree, scratch
from curate.core.schema import alive_mask, read_alive, set_column
from curate.core.stage import Stage, StageContext, register_stage
from curate.download import robots
from curate.download.errors import SUCCESS, failure_kind
from curate.download.netguard import guarded_opener
from curate.io.image_guard import DEFAULT_MAX_PIXELS
from curate.io.images import images_by_file, write_index

RESULT_COLUMNS = (
    "uid",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)
SIZE_COLUMNS = ("width", "height", "original_width", "original_height")
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@register_stage("download")
@dataclass
class DownloadStage(Stage):
    image_size: Count = 512
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = (
        "keep_ratio_largest"
    )
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: Annotated[int, Range(0, 100)] = 95  # png: the compression level, 0 to 9
    processes_count: Count | None = None  # multiprocessing distributor; None: one per CPU
    thread_count: Count = 32
    timeout: Positive = 10.0  # seconds
    retries: NonNegative = 0
    number_sample_per_shard: Count = 10_000
    user_agent_token: str = "curate"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: list(OPT_OUT_DIRECTIVES)
    )
    respect_robots_txt: bool = True
    allow_private_networks: bool = False
    blur_faces: bool = True  # when the ledger has face_bboxes (DataComp metadata)
    max_bytes: Count = 32 * 1024 * 1024
    max_image_pixels: Count = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ValueError("for png, encode_quality is the compression level, 0 to 9")

    def columns_after(self, columns: set[str]) -> set[str]:
        if "url" not in columns:
            raise ConfigError(f"stage {self.name}: needs a url column")
        return columns | set(RESULT_COLUMNS)

    def outputs(self) -> tuple[str, ...]:
        return (IMAGES,)

    def run(self, ctx: StageContext) -> int:
        images = ctx.run_dir / IMAGES
        files = ctx.input_files
        bbox = self._bbox_column(files)
        n = self.number_sample_per_shard
        # Shard ids leave room for every ledger file's shards: file i's are i*stride + j, so
        # each ledger file's images are in shards of its own, named in ledger order.
        stride = max([math.ceil(r / n) for r in _file_rows(files)], default=0) + 1
        width = len(str(len(files) * stride))
        with scratch(ctx.out_dir, "_urls-") as urls:
            jobs = [(f, i, i * stride, n, bbox, urls) for i, f in enumerate(files)]
            listed = ctx.engine.map_items(_list_urls, jobs, f"{self.name}: urls")
            digest = hashlib.sha256(json.dumps([d for d, _, _, _ in listed]).encode()).hexdigest()
            self._prepare(images, digest, {"stride": stride, "width": width}, ctx.run_dir)
            shards = [shard for _, _, shard_list, _ in listed for shard in shard_list]
            write_index(images, [[f"{k:0{width}d}" for k, _ in s] for _, _, s, _ in listed])
            rows = sum(r for _, r, _, _ in listed)
            if rows:
                finished = FinishedRows(images, "*_stats.json", _shard_rows)
                # Made before _quiet swaps sys.stderr for a buffer: it draws on the real one.
                shown = Progress(self.name, rows, done=finished(), enabled=ctx.progress)
                origins = sorted(set().union(*(o for _, _, _, o in listed)))
                with shown, _quiet(not ctx.verbose), shown.poll(finished):
                    self._download(shards, origins, bbox, width, images, ctx)
        shard_names = images_by_file(images)
        jobs = [(f, ctx.out_dir / f.name, images, names, self.name)
                for f, names in zip(files, shard_names)]  # fmt: skip
        counts: dict[str, int] = {}
        for found in ctx.engine.map_items(_join_file, jobs, f"{self.name}: join"):
            for kind, count in found.items():
                counts[kind] = counts.get(kind, 0) + count
        attempted = sum(counts.values())
        ctx.counters.update(
            attempted=attempted,
            success=counts.get(SUCCESS, 0),
            success_rate=round(counts.get(SUCCESS, 0) / attempted, 4) if attempted else None,
            failures={k: v for k, v in sorted(counts.items()) if k != SUCCESS},
        )
        return sum(_file_rows([ctx.out_dir / p.name for p in files]))

    def _bbox_column(self, files: list[Path]) -> str | None:
        """DataComp's face boxes, blurred when the stage says so."""
        schema = pq.read_schema(files[0]) if files else pa.schema([])
        return "face_bboxes" if self.blur_faces and "face_bboxes" in schema.names else None

    def _prepare(self, images: Path, digest: str, layout: dict, run_dir: Path) -> None:
        """Keep finished shards only if they were made from this url list with these settings."""
        stamp = images / "_params.json"
        expected = json.dumps({"digest": digest, **layout, **self._download_params()})
        if not (stamp.exists() and stamp.read_text() == expected):
            remove_tree(images, run_dir)
            images.mkdir(parents=True)
            stamp.write_text(expected)

    def _download_params(self) -> dict:
        skip = ("processes_count", "thread_count")  # how fast, not what: resume across them
        return params_of(self, skip)

    def _download(
        self,
        shards: list[tuple[int, str]],
        origins: list[str],
        bbox: str | None,
        width: int,
        images: Path,
        ctx: StageContext,
    ) -> None:
        from img2dataset.writer import ParquetSampleWriter

        from curate.download.crawler import CheckedResizer, CrawlPolicy, PoliteDownloader

        work = images / "_work"  # outside the *.parquet glob of the image shards
        work.mkdir(exist_ok=True)
        robots_file = None
        if self.respect_robots_txt:  # fetched here once per origin, for every process
            robots_file = work / "robots.json"
            opener = guarded_opener(self.allow_private_networks, self.max_bytes, self.timeout)
            texts = robots.prefetch_origins(origins, opener, self.timeout, self.user_agent_token)
            robots_file.write_text(json.dumps(texts))
        policy = CrawlPolicy(
            allow_private_networks=self.allow_private_networks,
            max_bytes=self.max_bytes,
            timeout=self.timeout,
            agent=self.user_agent_token,
            robots_file=str(robots_file) if robots_file else None,
        )
        resizer = CheckedResizer(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            blurrer=_blurrer() if bbox else None,
            max_pixels=self.max_image_pixels,
        )
        downloader = PoliteDownloader(
            policy,
            sample_writer_class=ParquetSampleWriter,
            resizer=resizer,
            thread_count=self.thread_count,
            save_caption=False,
            extract_exif=False,
            output_folder=str(images),
            column_list=["url", "uid"] + ([bbox] if bbox else []),
            timeout=self.timeout,
            number_sample_per_shard=self.number_sample_per_shard,
            oom_shard_count=width,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=self.encode_format,
            retries=self.retries,
            user_agent_token=self.user_agent_token,
            disallowed_header_directives=self.disallowed_header_directives or None,
            blurring_bbox_col=bbox,
        )
        # A shard is done when img2dataset wrote both its files: one whose Parquet file is
        # gone (found damaged and removed by a re-run) is fetched again.
        todo = [(k, path) for k, path in shards if not _finished(images, k, width)]
        # One task per shard (a process each on the local engine, which die with this one).
        # A shard that fails is tried once more, as img2dataset's distributors do.
        processes = self.processes_count or os.cpu_count() or 1
        for _ in range(2):
            done = ctx.engine.map_items(downloader, todo, self.name, processes=processes)
            todo = [shard for ok, shard in done if ok is False]
            if not todo:
                break


def _file_rows(files: list[Path]) -> list[int]:
    return [pq.ParquetFile(f).metadata.num_rows for f in files]


def _finished(images: Path, shard: int, width: int) -> bool:
    name = f"{shard:0{width}d}"
    return (images / f"{name}_stats.json").is_file() and (images / f"{name}.parquet").is_file()


def _list_urls(job: tuple) -> tuple[str, int, list[tuple[int, str]], set[str]]:
    """One ledger file's alive urls as img2dataset shards (Arrow files of ``n`` rows, ids
    from ``first``); returns the file's url-list digest, rows, shards and origins."""
    path, index, first, n, bbox, folder = job
    table = read_alive(path, ["url", "uid"] + ([bbox] if bbox else []))
    table = table.filter(pc.is_valid(table["url"]))
    digest = hashlib.sha256()
    for uid, url in zip(table["uid"].to_pylist(), table["url"].to_pylist()):
        digest.update(f"{uid}\t{url}\n".encode("utf-8", "surrogatepass"))
    shards = []
    for j, start in enumerate(range(0, table.num_rows, n)):
        shard = Path(folder) / f"{index:05d}-{j:05d}.arrow"
        with pa.ipc.new_file(shard, table.schema) as writer:
            writer.write_table(table.slice(start, n))
        shards.append((first + j, str(shard)))
    origins = {o for o in map(robots.origin_of, table["url"].to_pylist()) if o}
    return digest.hexdigest(), table.num_rows, shards, origins


def _join_file(job: tuple) -> dict[str, int]:
    """One ledger file with its rows' download results (from its own image shards only)."""
    path, out, images, names, stage = job
    parts = [pq.read_table(Path(images) / f"{n}.parquet", columns=list(RESULT_COLUMNS))
             for n in names if (Path(images) / f"{n}.parquet").is_file()]  # fmt: skip
    results = pa.concat_tables(parts, promote_options="permissive") if parts else None
    counts: dict[str, int] = {}
    pq.write_table(_join(pq.read_table(path), results, stage, counts), out)
    return counts


def _blurrer():
    from img2dataset.blurrer import BoundingBoxBlurrer

    return BoundingBoxBlurrer()


def _shard_rows(stats: Path) -> int:
    """Rows of a shard img2dataset has finished, from its stats file."""
    return json.loads(stats.read_text())["count"]


def _join(ledger: pa.Table, results: pa.Table | None, stage: str, counts: dict) -> pa.Table:
    """Write download results onto a ledger file's alive rows; failures become drops."""
    alive = pa.array(alive_mask(ledger))
    n = ledger.num_rows
    if results is not None and results.num_rows:
        index = pc.index_in(ledger["uid"], value_set=results["uid"])
        found = results.take(index)
    else:
        found = pa.table({c: pa.nulls(n, pa.string()) for c in RESULT_COLUMNS})
    raw_status = found["status"].to_pylist()
    messages = found["error_message"].to_pylist()
    urls = ledger["url"].to_pylist()
    status, errors = [], []
    for is_alive, url, st, msg in zip(alive.to_pylist(), urls, raw_status, messages):
        if not is_alive:
            status.append(None)
            errors.append(None)
            continue
        if url is None:
            kind, msg = "invalid_url", "url is null"
        elif st is None:
            kind, msg = "failed", "no result from img2dataset (its shard failed)"
        else:
            kind = failure_kind(st, msg)
        counts[kind] = counts.get(kind, 0) + 1
        status.append(kind)
        errors.append(None if kind == SUCCESS else msg)
    status_arr = pa.array(status, pa.string())
    ledger = set_column(ledger, "status", status_arr)
    ledger = set_column(ledger, "error_message", pa.array(errors, pa.string()))
    for column in (*SIZE_COLUMNS, "sha256"):
        new = found[column]
        if column in ledger.column_names:  # DataComp metadata has sizes: keep them for dead rows
            new = pc.if_else(alive, new.cast(ledger[column].type), ledger[column])
        ledger = set_column(ledger, column, new)
    failed = pc.and_(alive, pc.not_equal(status_arr, SUCCESS))
    ledger = set_column(ledger, "keep", pc.and_(alive, pc.invert(failed)))
    dropped = pc.if_else(failed, pa.scalar(stage), ledger["dropped_by"])
    return set_column(ledger, "dropped_by", dropped)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """img2dataset prints per-shard chatter; keep it out of the user's terminal."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
