"""The two halves of CLIP embedding: decode on CPU workers, embed on the model's worker.

The unit of work is a *chunk*: ``batch_size`` consecutive rows of one image
shard. A decode task turns a chunk into uint8 crops and token ids; the model's
worker embeds each chunk as one batch. Chunks, not whatever batches Ray Data
happens to form, are the batches the model sees, because a CLIP forward pass is
not batch-invariant (a row's embedding moves by ~1e-6 with its batch-mates on
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

from curate.clip_model import Preprocess, ResolvedModel, load_model, tokenizer_for
from curate.image_guard import DEFAULT_MAX_PIXELS, image_problem

#: Captions are cut to this many characters per context token before tokenizing (after
#: collapsing whitespace, as open_clip does): a 1 MB alt-text cannot stall a worker,
#: and no caption short enough to matter changes.
CHARS_PER_TOKEN = 64

DECODED_SCHEMA_FIELDS = ("uid", "chunk", "chunk_rows", "pixels", "error", "tokens", "has_text")


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode worker needs: the model's preprocessing and tokenizer, by value."""

    resolved: ResolvedModel
    preprocess: Preprocess
    max_pixels: int = DEFAULT_MAX_PIXELS


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


def _decode_image(data: bytes | None, steps, max_pixels: int) -> tuple[bytes, str | None]:
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
                image.load()
                crop = steps(image)
        return np.asarray(crop, dtype=np.uint8).tobytes(), None
    except Exception as exc:
        return b"", f"decode: {type(exc).__name__}: {exc}"


def _clean_caption(text: str, context_length: int) -> str:
    return " ".join(text.split())[: CHARS_PER_TOKEN * context_length]


def decode_chunk(item: pa.Table, spec: DecodeSpec) -> pa.Table:
    """One chunk (a one-row table naming it) → one row per image: uint8 crop, tokens, error."""
    (work,) = item.to_pylist()
    steps, tokenizer = _tools(spec)
    todo = pq.read_table(work["todo"]).slice(work["start"], work["stop"] - work["start"])
    pf = pq.ParquetFile(work["shard"])
    groups, positions = _row_positions(pf, todo["row"].to_numpy())
    images = pf.read_row_groups(groups, columns=["uid", work["column"]]).take(positions)
    uids = todo["uid"].to_pylist()
    pixels, errors = [], []
    for uid, found, data in zip(uids, images["uid"].to_pylist(), images[work["column"]]):
        if found != uid:  # the images folder changed under us: never embed the wrong image
            crop, error = b"", f"decode: images/ row holds uid {found}, expected {uid}"
        else:
            crop, error = _decode_image(data.as_py(), steps, spec.max_pixels)
        pixels.append(crop)
        errors.append(error)
    captions = todo["caption"].to_pylist()
    context = tokenizer.context_length
    texts = ["" if c is None else _clean_caption(c, context) for c in captions]
    tokens = np.asarray(tokenizer(texts), dtype=np.int32)
    n = len(uids)
    return pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "chunk": pa.array(np.full(n, work["chunk"], np.int64)),
            "chunk_rows": pa.array(np.full(n, n, np.int32)),
            "pixels": pa.array(pixels, pa.binary()),
            "error": pa.array(errors, pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), context),
            "has_text": pa.array([c is not None for c in captions], pa.bool_()),
        }
    )


def _fixed_list(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """fp16 fixed_size_list<D> column, null where not ``valid``."""
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1], mask=pa.array(~valid))


class Embedder:
    """One model per instance (one per actor on Ray): chunks of decoded rows → embeddings.

    On CUDA the crops travel as uint8 through pinned memory and are normalised
    on the GPU under bf16/fp16 autocast; on CPU everything is float32.
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        chunks = batch["chunk"].to_numpy()
        starts = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]])
        parts = []
        for start, stop in zip(starts, np.r_[starts[1:], len(chunks)]):
            part = batch.slice(start, stop - start)
            if part.num_rows != part["chunk_rows"][0].as_py():
                raise RuntimeError(
                    f"chunk {chunks[start]} arrived split ({part.num_rows} of "
                    f"{part['chunk_rows'][0].as_py()} rows): results would depend on batching"
                )
            parts.append(self.embed_chunk(part))
        return pa.concat_tables(parts)

    def _to_device(self, array: np.ndarray):
        tensor = self.torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

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

    def embed_chunk(self, part: pa.Table) -> pa.Table:
        n = part.num_rows
        errors = part["error"]
        has_image = errors.is_null().to_numpy(zero_copy_only=False)
        has_text = part["has_text"].to_numpy(zero_copy_only=False)
        image = np.zeros((n, self.dim), np.float32)
        if has_image.any():
            pixels = [p for p, ok in zip(part["pixels"].to_pylist(), has_image) if ok]
            crops = np.frombuffer(bytearray(b"".join(pixels)), np.uint8).reshape(
                -1, self.size, self.size, 3
            )
            x = self._to_device(crops).permute(0, 3, 1, 2).float().div(255)
            image[has_image] = self._encode(
                self.model.encode_image, x.sub_(self.mean).div_(self.std)
            )
        text = np.zeros((n, self.dim), np.float32)
        if has_text.any():
            tokens = part["tokens"].combine_chunks().filter(pa.array(has_text)).flatten().to_numpy()
            tokens = tokens.reshape(int(has_text.sum()), -1).astype(np.int64)
            text[has_text] = self._encode(self.model.encode_text, self._to_device(tokens))
        both = has_image & has_text
        score = np.einsum("ij,ij->i", image, text).astype(np.float32)
        return pa.table(
            {
                "uid": part["uid"],
                "image_embedding": _fixed_list(image, has_image),
                "text_embedding": _fixed_list(text, has_text),
                "clip_score": pa.array(score, pa.float32(), mask=~both),
                "clip_error": errors,
            }
        )
