"""The two halves of CLIP embedding: decode on CPU workers, embed on the model's worker.

The unit of work is a *chunk*: ``batch_size`` consecutive rows to embed, which
may span image shards. A decode task turns a chunk into uint8 crops and token
ids; the model's worker embeds each chunk as one batch. With ``on_device`` the
decode task ships baseline JPEGs undecoded instead, and the model's worker
decodes them on its own device (nvJPEG on a GPU, ``DeviceDecoder``): Pillow on
the CPUs is what bounds a GPU's throughput otherwise. Chunks, not whatever
batches Ray Data happens to form, are the batches the model sees, because a
CLIP forward pass is not batch-invariant (a row's embedding moves by ~1e-6 with its batch-mates on
CPU): fixing the batches makes in-process and Ray runs give identical bytes.

Everything here is plain functions and a callable class so the same code runs
in this process (``--engine local``) and inside Ray Data's ``map_batches``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.clip.model import Preprocess, ResolvedModel, load_model, tokenizer_for
from curate.io.image_guard import DEFAULT_MAX_PIXELS, image_problem

#: Captions are cut to this many characters per context token before tokenizing (after
#: collapsing whitespace, as open_clip does): a 1 MB alt-text cannot stall a worker,
#: and no caption short enough to matter changes.
CHARS_PER_TOKEN = 64
#: The EXIF tag saying how to turn the image upright.
ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode worker needs: the model's preprocessing and tokenizer, by value.

    ``jpeg_draft``: Pillow decodes a JPEG at the smallest DCT scale (1/2, 1/4, 1/8)
    still at least the model's input size on both sides, then resizes as usual:
    faster, and not the exact pixels of open_clip's preprocessing (the README gives
    the measured score difference). ``on_device``: JPEGs the model's device can decode
    (``device_decodable``) are shipped as bytes for it to decode.
    """

    resolved: ResolvedModel
    preprocess: Preprocess
    max_pixels: int = DEFAULT_MAX_PIXELS
    jpeg_draft: bool = False
    on_device: bool = False


@lru_cache(maxsize=4)
def _tools(spec: DecodeSpec):
    """Transform and tokenizer, built once per worker process."""
    return spec.preprocess.pil_steps(), tokenizer_for(spec.resolved)


def _row_positions(pf: pq.ParquetFile, rows: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The row groups holding ``rows`` and each row's index in those groups read together."""
    meta = pf.metadata
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = sorted(set(group_of.tolist()))
    offset, first = 0, {}
    for g in groups:
        first[g] = offset
        offset += meta.row_group(g).num_rows
    positions = np.array([first[g] + r - starts[g] for g, r in zip(group_of, rows)], np.int64)
    return groups, positions


def decode_image(
    data: bytes | None, steps, max_pixels: int, draft: int = 0
) -> tuple[bytes, str | None]:
    """An image's bytes through the byte guard, Pillow and ``steps`` (PIL image in, crop out):
    the crop as raw uint8 bytes, or ``b""`` and why it could not be had. ``draft``: a JPEG
    is decoded at the smallest DCT scale still at least ``draft`` pixels on both sides."""
    if data is None:
        return b"", "decode: no image bytes"
    problem = image_problem(data, max_pixels)
    if problem:
        return b"", problem
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette chatter
            with Image.open(io.BytesIO(data)) as image:
                if draft and image.format == "JPEG":
                    image.draft(image.mode, (draft, draft))
                image.load()
                crop = steps(image)
        return np.asarray(crop, dtype=np.uint8).tobytes(), None
    except Exception as exc:
        return b"", f"decode: {type(exc).__name__}: {exc}"


def device_decodable(data: bytes | None, max_pixels: int) -> bool:
    """Whether ``data`` passes the byte guard and the model's device decodes it as Pillow
    would: a sequential 8-bit JPEG in YCbCr or greyscale with no EXIF rotation (TorchCodec
    turns the image upright; Pillow, hence open_clip, does not). CMYK and progressive
    JPEGs, rotated ones, every other format and bytes the guard refuses are left to
    Pillow on the CPUs."""
    from PIL import Image

    if not data or image_problem(data, max_pixels):
        return False
    with Image.open(io.BytesIO(data)) as image:
        return (
            image.format == "JPEG"
            and image.mode in ("RGB", "L")
            and not image.info.get("progressive")
            and image.getexif().get(ORIENTATION, 1) == 1
        )


def _clean_caption(text: str, context_length: int) -> str:
    return " ".join(text.split())[: CHARS_PER_TOKEN * context_length]


def read_image_bytes(todo: pa.Table) -> list[bytes | None]:
    """The downloaded bytes of each todo row, reading only the row groups that hold them."""
    out: list[bytes | None] = [None] * todo.num_rows
    shards = todo["shard"].to_pylist()
    rows = todo["row"].to_numpy()
    uids = todo["uid"].to_pylist()
    for shard in dict.fromkeys(shards):
        mine = np.array([i for i, s in enumerate(shards) if s == shard])
        pf = pq.ParquetFile(shard)
        column = todo["column"][int(mine[0])].as_py()
        groups, positions = _row_positions(pf, rows[mine])
        images = pf.read_row_groups(groups, columns=["uid", column]).take(positions)
        for i, found, data in zip(mine, images["uid"].to_pylist(), images[column].to_pylist()):
            # A row that moved under us would embed the wrong image: refuse it.
            out[i] = data if found == uids[i] else ValueError(f"images/ row holds uid {found}")
    return out


def decode_chunk(item: pa.Table, spec: DecodeSpec) -> pa.Table:
    """One chunk (a one-row table naming it) → one row holding the whole decoded chunk.

    One row, not one per image: Ray Data may slice blocks between rows, never
    inside one, so the chunk reaches its model worker whole. ``pixels`` is the
    crops decoded here back to back (uint8, S × S × 3 each), ``encoded`` the bytes
    left for the model's device to decode (null for the other rows), ``tokens``
    the int32 token ids of every caption, ``errors`` null for rows whose image
    decoded or is left to the device.
    """
    (work,) = item.to_pylist()
    steps, tokenizer = _tools(spec)
    draft = spec.preprocess.size if spec.jpeg_draft else 0
    todo = pq.read_table(work["todo"]).slice(work["start"], work["stop"] - work["start"])
    crops, errors, encoded = [], [], []
    for data in read_image_bytes(todo):
        shipped = None
        if isinstance(data, Exception):
            crop, error = b"", f"decode: {data}"
        elif spec.on_device and device_decodable(data, spec.max_pixels):
            crop, error, shipped = b"", None, data
        else:
            crop, error = decode_image(data, steps, spec.max_pixels, draft)
        crops.append(crop)
        errors.append(error)
        encoded.append(shipped)
    captions = todo["caption"].to_pylist()
    context = tokenizer.context_length
    texts = ["" if c is None else _clean_caption(c, context) for c in captions]
    tokens = np.asarray(tokenizer(texts), dtype=np.int32)
    return pa.table(
        {
            "chunk": [work["chunk"]],
            "file": [work["file"]],
            "uids": [todo["uid"].to_pylist()],
            "errors": pa.array([errors], pa.list_(pa.string())),
            "has_text": [[c is not None for c in captions]],
            "pixels": pa.array([b"".join(crops)], pa.large_binary()),
            "encoded": pa.array([encoded], pa.list_(pa.large_binary())),
            "tokens": pa.array([tokens.tobytes()], pa.large_binary()),
            "context": [context],
        }
    )


def _fixed_list(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """fp16 fixed_size_list<D> column, null where not ``valid``."""
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1], mask=pa.array(~valid))


def decode_jpegs(blobs: list[bytes], device) -> list:
    """Each JPEG as a full-size RGB uint8 tensor (3 × H × W) on ``device``, by TorchCodec
    (one batched nvJPEG call on a GPU); None for one the decoder refuses."""
    from torchcodec.decoders import decode_jpeg

    try:
        return decode_jpeg(blobs, mode="RGB", device=device)
    except RuntimeError:  # one bad image fails the batch: find it
        images = []
        for blob in blobs:
            try:
                images.append(decode_jpeg(blob, mode="RGB", device=device))
            except RuntimeError:
                images.append(None)
        return images


class DeviceDecoder:
    """JPEG bytes → uint8 crops (N × 3 × S × S) on ``device``: TorchCodec's ``decode_jpeg``
    (nvJPEG on a GPU, a batch per call; torchvision's own decoders are deprecated since
    0.29 in its favour), then open_clip's own resize and crop steps, which torchvision
    applies to tensors as to PIL images (bicubic, antialiased).

    An image the device cannot decode is decoded by Pillow instead, here, exactly as a
    decode task would; one Pillow cannot decode either comes back as its reason, as
    on the CPU path. Never raises for bad bytes.
    """

    def __init__(self, preprocess: Preprocess, device):
        self.steps = preprocess.pil_steps()  # tensor-ready; MaybeConvertMode passes tensors
        self.size = preprocess.size
        self.device = device

    def __call__(self, blobs: list[bytes]) -> list:
        """A crop (3 × S × S uint8 tensor on the device) or the reason, for each blob."""
        images = decode_jpegs(blobs, self.device)
        return [self.steps(image) if image is not None else self._on_cpu(blob)
                for image, blob in zip(images, blobs)]  # fmt: skip

    def _on_cpu(self, data: bytes):
        import torch

        crop, error = decode_image(data, self.steps, DEFAULT_MAX_PIXELS)
        if error:
            return error
        pixels = torch.frombuffer(bytearray(crop), dtype=torch.uint8).view(self.size, self.size, 3)
        return pixels.permute(2, 0, 1).to(self.device)


class Embedder:
    """One model per instance (one per actor on Ray): chunks of decoded rows → embeddings.

    On CUDA the crops travel as uint8 through pinned memory and are normalised
    on the GPU under bf16/fp16 autocast; on CPU everything is float32. JPEG bytes
    that a decode task left undecoded are decoded here, on the model's device.
    """

    def __init__(
        self, resolved: ResolvedModel, preprocess: Preprocess, dim: int, device: str, dtype: str
    ):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.model = load_model(resolved, device)
        self.size = preprocess.size
        self.dim = dim
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(preprocess.mean, device=self.device).view(shape)
        self.std = torch.tensor(preprocess.std, device=self.device).view(shape)
        self.autocast = dtype if self.device.type == "cuda" and dtype != "fp32" else None
        self._pinned = None
        self.decoder = DeviceDecoder(preprocess, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Decoded chunks (one per row) → one output row per image."""
        return pa.concat_tables([self.embed_chunk(chunk) for chunk in batch.to_pylist()])

    def _to_device(self, array: np.ndarray):
        """uint8 crops on the model's device; on CUDA through one reused pinned buffer."""
        torch = self.torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: only ever read
            tensor = torch.from_numpy(array)
        if self.device.type != "cuda":
            return tensor
        if self._pinned is None or self._pinned.numel() < tensor.numel():
            self._pinned = torch.empty(tensor.numel(), dtype=torch.uint8).pin_memory()
        staged = self._pinned[: tensor.numel()].view(tensor.shape).copy_(tensor)
        return staged.to(self.device, non_blocking=True)

    def _encode(self, fn, inputs):
        torch = self.torch
        with torch.inference_mode():
            if self.autocast:
                dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    out = fn(inputs)
            else:
                out = fn(inputs)
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu().numpy()

    def images(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops (N × S × S × 3) → unit image vectors (N × D, float32)."""
        return self._images(self._to_device(crops).permute(0, 3, 1, 2))

    def _images(self, crops) -> np.ndarray:
        """uint8 crops (N × 3 × S × S) on the device → unit image vectors (N × D, float32)."""
        x = crops.float().div(255)
        return self._encode(self.model.encode_image, x.sub_(self.mean).div_(self.std))

    def _crops(self, chunk: dict, errors: list):
        """Every row's crop (N × 3 × S × S uint8, on the device): those a decode task made,
        and those decoded here from the bytes it shipped. Rows whose image could not be
        had (here too) get their reason in ``errors``."""
        torch = self.torch
        n, size = len(errors), self.size
        crops = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=self.device)
        encoded = chunk["encoded"]
        made = [i for i in range(n) if errors[i] is None and encoded[i] is None]
        if made:
            pixels = np.frombuffer(chunk["pixels"], np.uint8).reshape(-1, size, size, 3)
            crops[made] = self._to_device(pixels).permute(0, 3, 1, 2)
        shipped = [i for i in range(n) if encoded[i] is not None]
        for i, crop in zip(shipped, self.decoder([encoded[i] for i in shipped])):
            if isinstance(crop, str):
                errors[i] = crop
            else:
                crops[i] = crop
        return crops

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids (N × context) → unit text vectors (N × D, float32)."""
        ids = self.torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        return self._encode(self.model.encode_text, ids)

    def embed_chunk(self, chunk: dict) -> pa.Table:
        errors = list(chunk["errors"])
        n = len(errors)
        crops = self._crops(chunk, errors)
        has_image = np.array([e is None for e in errors], bool)
        has_text = np.array(chunk["has_text"], bool)
        image = np.zeros((n, self.dim), np.float32)
        if has_image.any():
            image[has_image] = self._images(crops[np.flatnonzero(has_image).tolist()])
        text = np.zeros((n, self.dim), np.float32)
        if has_text.any():
            tokens = np.frombuffer(chunk["tokens"], np.int32).reshape(n, chunk["context"])
            text[has_text] = self.texts(tokens[has_text])
        both = has_image & has_text
        score = np.einsum("ij,ij->i", image, text).astype(np.float32)
        return pa.table(
            {
                "uid": pa.array(chunk["uids"], pa.string()),
                "image_embedding": _fixed_list(image, has_image),
                "text_embedding": _fixed_list(text, has_text),
                "clip_score": pa.array(score, pa.float32(), mask=~both),
                "clip_error": pa.array(errors, pa.string()),
                # The ledger file (by its place) the rows belong to: the clip stage joins
                # each file's scores from the embeddings files that hold them.
                "file": pa.array(np.full(n, chunk["file"], np.int32)),
            }
        )
