"""Where the clip stage decodes images: Pillow on the CPUs (exact, or JPEG draft), or the
model's device (``decode: gpu``), whose code runs here on the CPU through TorchCodec.

On a GPU the device decoder is nvJPEG; here it is libjpeg-turbo through the same
``decode_jpeg`` call, so these tests check the routing, the fallbacks and the
resize/crop arithmetic, and ``tests/test_clip_gpu.py`` checks nvJPEG itself.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.clip.embed import (
    DecodeSpec,
    DeviceDecoder,
    Embedder,
    decode_chunk,
    decode_image,
    device_decodable,
)
from curate.clip.model import Preprocess, load_model, resolve_model
from curate.io.image_guard import DEFAULT_MAX_PIXELS

#: Score bounds for curate-tiny with random weights (64 px input); the measured maxima on
#: these images were 1.1e-4 (device decode) and 3.3e-3 (draft).
DEVICE_SCORE_BOUND = 1e-3
DRAFT_SCORE_BOUND = 1e-2


def _photo(seed: int, width: int, height: int) -> np.ndarray:
    """Smooth gradients, shapes and noise: about as much detail as a downsized photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x * rng.uniform(100, 250), y * rng.uniform(80, 250), (x + y) * 90], -1)
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
    base[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


JPEGS = [_encode(_photo(i, w, h), quality=90)
         for i, (w, h) in enumerate([(683, 512), (512, 768), (900, 512), (300, 200), (512, 512),
                                     (64, 40), (1024, 700), (520, 515)])]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    """curate-tiny, random weights: (resolved, preprocess, embedder on CPU)."""
    resolved = resolve_model("curate-tiny", "random")
    preprocess = Preprocess.of(load_model(resolved))
    return resolved, preprocess, Embedder(resolved, preprocess, 128, "cpu", "fp32")


def _pillow_crop(data: bytes, preprocess: Preprocess, draft: int = 0) -> np.ndarray:
    crop, error = decode_image(data, preprocess.pil_steps(), DEFAULT_MAX_PIXELS, draft)
    assert error is None
    return np.frombuffer(crop, np.uint8).reshape(preprocess.size, preprocess.size, 3)


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_device_decoding_matches_pillow_within_rounding(size, resize_mode):
    """decode_jpeg + open_clip's steps on tensors against Pillow + the same steps: the
    decoders agree bit for bit; the two bicubic resizes round differently (measured: a
    mean of 0.06–0.19 levels, 4 at most, in a handful of pixels)."""
    preprocess = Preprocess(size, (0.5,) * 3, (0.5,) * 3, "bicubic", resize_mode)
    crops = DeviceDecoder(preprocess, "cpu")(JPEGS)
    for data, crop in zip(JPEGS, crops):
        ours = crop.permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(ours - _pillow_crop(data, preprocess).astype(int))
        assert diff.max() <= 4 and diff.mean() < 0.25 and np.quantile(diff, 0.999) <= 1


def _rotated(pixels: np.ndarray) -> bytes:
    """A JPEG whose EXIF says to turn it a quarter: Pillow (and open_clip) ignore that."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(pixels, exif=exif.tobytes())


def test_only_sequential_ycbcr_and_grey_jpegs_go_to_the_device():
    pixels = _photo(0, 200, 150)
    assert device_decodable(_encode(pixels), DEFAULT_MAX_PIXELS)
    assert device_decodable(_encode(pixels, mode="L"), DEFAULT_MAX_PIXELS)
    for refused in (
        _encode(pixels, mode="CMYK"),
        _encode(pixels, progressive=True),
        _rotated(pixels),
        _encode(pixels, "PNG"),
        _encode(pixels, "WEBP"),
        b"<html><body>not found</body></html>",
        b"",
        None,
        JPEGS[0][:200],  # a header cut short
    ):
        assert not device_decodable(refused, DEFAULT_MAX_PIXELS)
    assert not device_decodable(JPEGS[0], max_pixels=1000)  # the byte guard still applies


def test_bytes_the_device_refuses_fall_back_to_pillow_and_its_reason(tiny):
    """A JPEG whose header passes but whose body is broken: the device's decoder raises
    for the whole batch; each image is then tried alone, and the broken one through
    Pillow, whose reason is the row's, as on the CPU path."""
    _, preprocess, _ = tiny
    broken = JPEGS[0][:400] + b"\x00" * 50 + b"\xff\xd9"
    out = DeviceDecoder(preprocess, "cpu")([JPEGS[1], broken, JPEGS[2]])
    _, pillow_reason = decode_image(broken, preprocess.pil_steps(), DEFAULT_MAX_PIXELS)
    assert out[1] == pillow_reason and pillow_reason.startswith("decode:")
    assert out[0].shape == out[2].shape == (3, preprocess.size, preprocess.size)


def _chunk(tmp_path, images: list, spec: DecodeSpec) -> pa.Table:
    shard, todo = tmp_path / "00000.parquet", tmp_path / "todo.parquet"
    n = len(images)
    uids = [f"{i:032x}" for i in range(n)]
    pq.write_table(pa.table({"uid": uids, "jpg": pa.array(images, pa.binary())}), shard)
    pq.write_table(pa.table({"uid": uids, "caption": [f"picture {i}" for i in range(n)],
                             "shard": [str(shard)] * n, "column": ["jpg"] * n,
                             "row": list(range(n))}), todo)  # fmt: skip
    item = {"chunk": 0, "file": 0, "todo": str(todo), "start": 0, "stop": n}
    return decode_chunk(pa.Table.from_pylist([item]), spec)


def test_device_path_gives_the_cpu_paths_rows_and_close_scores(tmp_path, tiny):
    """A chunk mixing every kind of image: the same rows embedded, the same drops with the
    same reasons, and scores within the bound."""
    resolved, preprocess, embedder = tiny
    pixels = _photo(3, 320, 240)
    images = [*JPEGS, _encode(pixels, mode="CMYK"), _encode(pixels, progressive=True),
              _encode(pixels, "PNG"), _encode(pixels, mode="L"), JPEGS[0][:300], None,
              b"<!doctype html>", JPEGS[3][: len(JPEGS[3]) // 2], _rotated(pixels)]  # fmt: skip
    cpu = _chunk(tmp_path, images, DecodeSpec(resolved, preprocess))
    device = _chunk(tmp_path, images, DecodeSpec(resolved, preprocess, on_device=True))
    shipped = [i for i, b in enumerate(device["encoded"][0].as_py()) if b is not None]
    # the 8 JPEGs, the grey one, and the truncated one (its header is whole)
    assert shipped == [*range(8), 11, 15]
    # CMYK, progressive, PNG and the rotated JPEG
    assert len(device["pixels"][0].as_py()) == 4 * preprocess.size**2 * 3
    a, b = embedder(cpu).to_pylist(), embedder(device).to_pylist()
    assert [r["clip_error"] for r in a] == [r["clip_error"] for r in b]
    assert sum(r["clip_error"] is None for r in a) == 13  # the truncated JPEG included
    diff = [abs(x["clip_score"] - y["clip_score"]) for x, y in zip(a, b) if x["clip_score"]]
    assert max(diff) < DEVICE_SCORE_BOUND


def test_jpeg_draft_is_faster_pixels_within_its_bound(tmp_path, tiny):
    """Draft decoding changes JPEG pixels (bounded score change) and nothing else."""
    resolved, preprocess, embedder = tiny
    png = _encode(_photo(5, 700, 512), "PNG")
    images = [*JPEGS, png]
    exact = embedder(_chunk(tmp_path, images, DecodeSpec(resolved, preprocess))).to_pylist()
    draft = _chunk(tmp_path, images, DecodeSpec(resolved, preprocess, jpeg_draft=True))
    drafted = embedder(draft).to_pylist()
    diff = np.array([abs(x["clip_score"] - y["clip_score"]) for x, y in zip(exact, drafted)])
    assert diff.max() < DRAFT_SCORE_BOUND
    assert diff[-1] == 0  # a PNG is never drafted
    assert diff[0] > 0  # a 683 × 512 JPEG is decoded at 1/8 scale for a 64 px model
    small = _pillow_crop(JPEGS[5], preprocess, draft=preprocess.size)  # 64 × 40: no scale fits
    assert np.array_equal(small, _pillow_crop(JPEGS[5], preprocess))


def test_decode_gpu_without_a_gpu_is_refused():
    from curate.core.config import ConfigError
    from curate.stages.clip import ClipStage

    stage = ClipStage(model="curate-tiny", pretrained="random", device="cpu", decode="gpu")
    stage.name = "clip"
    with pytest.raises(ConfigError, match="decode: gpu needs"):
        stage.columns_after({"sha256"})
    stage.device = "auto"  # on a machine without a GPU, auto is the CPU: refused at run time
    with pytest.raises(ConfigError, match="runs on cpu, not a GPU"):
        stage._decode("cpu", Preprocess(64, (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest"))
    shortest = Preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", "shortest")
    longest = Preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", "longest")
    assert ClipStage(decode="auto")._decode("cpu", shortest) == "cpu"
    assert ClipStage(decode="auto")._decode("cuda", shortest) == "gpu"
    # open_clip's resize for `longest` reads PIL's size: such models decode on the CPUs
    assert ClipStage(decode="auto")._decode("cuda", longest) == "cpu"
    stage.decode = "gpu"
    with pytest.raises(ConfigError, match="resize_mode longest"):
        stage._decode("cuda", longest)


def test_shipped_bytes_travel_through_ray_data(tmp_path, tiny, ray_local):
    """The encoded column survives Ray Data's blocks: the same vectors as in process."""
    from curate.clip.pool import embed
    from curate.engine import open_engine

    resolved, preprocess, _ = tiny
    shard = tmp_path / "images.parquet"
    n = len(JPEGS) * 4
    uids = [f"{i:032x}" for i in range(n)]
    pq.write_table(pa.table({"uid": uids, "jpg": pa.array(JPEGS * 4, pa.binary())}), shard)
    pq.write_table(pa.table({"uid": uids, "caption": ["a photo"] * n, "shard": [str(shard)] * n,
                             "column": ["jpg"] * n, "row": list(range(n))}),
                   tmp_path / "todo.parquet")  # fmt: skip
    chunks = [{"chunk": k, "file": 0, "todo": str(tmp_path / "todo.parquet"), "start": s,
               "stop": min(s + 12, n)} for k, s in enumerate(range(0, n, 12))]  # fmt: skip
    tables = {}
    for name in ("local", "ray"):
        out = tmp_path / name
        out.mkdir()
        engine = open_engine(name)
        try:
            embed(engine, chunks, (resolved, preprocess, 128, "cpu", "fp32"), 1, out,
                  on_device=True)  # fmt: skip
        finally:
            engine.close()
        tables[name] = pq.read_table(out).sort_by("uid")
    assert tables["ray"].num_rows == n and tables["ray"]["clip_error"].null_count == n
    assert tables["ray"]["image_embedding"].equals(tables["local"]["image_embedding"])
