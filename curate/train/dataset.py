"""Training samples streamed from the shard stage's Parquet shards, one row group at a time.

The unit of work is a Parquet row group (1,000 rows of the shard stage, images
included): a worker reads one, shuffles its rows, decodes and augments them,
and only then reads the next, so memory holds one row group per worker however
large the shards are. Each epoch permutes the row groups from (seed, epoch) and
deals them to the DataLoader's workers round-robin, so every (epoch, row group)
goes to exactly one worker and no row repeats within an epoch — what open_clip's
WebDataset pipeline gets from splitting shards by worker (``open_clip_train/data.py``,
``split_by_worker``), at row-group rather than file grain.

Samples are open_clip's train transform for the model (``image_transform_v2``,
``is_train=True``) cut before ``ToTensor``: a worker ships the random crop as
uint8 pixels, a quarter of float32's bytes through shared memory and pinned
memory, and the trainer applies ``ToTensor``'s /255 and ``Normalize`` on the
device (``normalise``) — the split the clip stage makes for the same reason
(``curate.clip.model.Preprocess``), with the same arithmetic, so the floats are
open_clip's.

With ``draft`` (``TrainConfig.jpeg_draft``) a JPEG is decoded at the smallest
DCT scale (1/2, 1/4, 1/8) still at least the model's input size on both sides
(Pillow's ``draft``), before the crop: a 512 px download costs a quarter of the
decoding work, and the random crop, which keeps 90–100 % of the area, is
resized from about the model's size rather than from 512 px.

With ``on_device`` (``TrainConfig.decode``: ``gpu``, what ``auto`` means on
CUDA) a worker leaves each JPEG the device can decode as it is
(``curate.clip.embed.device_decodable``): it reads only the header, draws the
random crop box exactly as ``RandomResizedCrop`` would (the same draws from the
same generator, so the same boxes as decoding on the CPU), and ships the bytes
and the box. ``DeviceCrops`` then decodes the batch's JPEGs on the training
device (TorchCodec's batched nvJPEG on a GPU) and cuts each box with
torchvision's ``resized_crop``, the function ``RandomResizedCrop`` calls. The
workers are left reading Parquet and tokenizing; the pixels differ from
Pillow's only by rounding in the resize.

Everything random comes from seeded generators, never from process state:
row order within a group from (seed, epoch, group), and the augmentation
(open_clip's ``RandomResizedCrop`` draws from torch's global generator) from a
torch seed drawn from the same generator at the start of each group. The
samples a group yields therefore depend on (seed, epoch, group) alone, not on
the worker that reads it nor on what that worker read before.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import Compose, RandomResizedCrop, ToTensor

from curate.clip.embed import decode_jpegs, device_decodable
from curate.core.config import ConfigError
from curate.core.layout import SHARDS
from curate.io.image_guard import DEFAULT_MAX_PIXELS

SHARD_GLOB = "shard-*.parquet"
#: The columns a sample needs; the shards' other columns are never read.
COLUMNS = ("uid", "caption", "image")


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # the row group's number in its file
    rows: int


def find_shards(folder: Path) -> list[Path]:
    """The Parquet shards in ``folder``, or in ``folder/shards`` when given a run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"shards {folder}: no such folder")
    if not any(folder.glob(SHARD_GLOB)) and (folder / SHARDS).is_dir():
        folder = folder / SHARDS
    files = sorted(folder.glob(SHARD_GLOB))
    if not files:
        if any(folder.glob("shard-*.tar")):
            raise ConfigError(
                f"shards {folder}: WebDataset shards; the trainer reads Parquet shards "
                "(the shard stage's default format: parquet)"
            )
        raise ConfigError(f"shards {folder}: no {SHARD_GLOB} files (is it a run's shards/?)")
    return files


def row_groups(files: list[Path]) -> list[RowGroup]:
    """Every row group of ``files``, after checking the shards can be trained on at all."""
    groups = []
    for path in files:
        meta = pq.read_metadata(path)
        names = meta.schema.to_arrow_schema().names
        missing = [c for c in COLUMNS if c not in names]
        if "image" in missing:
            raise ConfigError(
                f"shard {path} has no image column: the run that wrote it had no download "
                "stage, so there are no images to train on (add a download stage before "
                "the shard stage, as pipelines/download_basic.yaml does)"
            )
        if missing:
            raise ConfigError(f"shard {path} lacks the column(s) {', '.join(missing)}")
        for i in range(meta.num_row_groups):
            if meta.row_group(i).num_rows:
                groups.append(RowGroup(str(path), i, meta.row_group(i).num_rows))
    if not groups:
        raise ConfigError(f"the shards in {files[0].parent} hold no rows: the run kept nothing")
    return groups


def crop_steps(preprocess_cfg: dict) -> Compose:
    """open_clip's train transform for a model up to ``ToTensor``: PIL in, PIL RGB crop out."""
    steps = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=True).transforms
    return Compose(steps[: next(i for i, t in enumerate(steps) if isinstance(t, ToTensor))])


def device_crop(crop: Compose) -> RandomResizedCrop | None:
    """The train transform's ``RandomResizedCrop`` when it is all there is to the transform
    (then the device can apply it), else None."""
    first, *rest = crop.transforms
    if isinstance(first, RandomResizedCrop) and all(type(t).__name__ == "MaybeConvertMode"
                                                    for t in rest):  # fmt: skip
        return first
    return None


@dataclass(frozen=True)
class Encoded:
    """A JPEG a worker left for the training device, and the crop box it drew for it."""

    data: bytes
    box: tuple[int, int, int, int]  # top, left, height, width in the full image
    where: str  # the shard and uid, for errors


def collate(samples: list) -> dict:
    """A batch: the workers' crops (N × H × W × 3 uint8) and the JPEGs left to the device,
    each with its place in the batch, and the token ids."""
    images, tokens = zip(*samples)
    made = [i for i, image in enumerate(images) if torch.is_tensor(image)]
    return {
        "size": len(images),
        "made": made,
        "pixels": torch.stack([images[i] for i in made]) if made else None,
        "encoded": [(i, image) for i, image in enumerate(images) if not torch.is_tensor(image)],
        "tokens": torch.stack(tokens),
    }


class DeviceCrops:
    """A collated batch → its crops (N × H × W × 3 uint8) on ``device``: the workers' crops
    copied there, the JPEGs they left decoded there and cut with their boxes."""

    def __init__(self, crop: Compose, device: torch.device):
        self.device = device
        self.resize = device_crop(crop)

    def __call__(self, batch: dict) -> torch.Tensor:
        if not batch["encoded"]:
            return batch["pixels"].to(self.device, non_blocking=True)
        height, width = self.resize.size
        crops = torch.empty((batch["size"], height, width, 3), dtype=torch.uint8,
                            device=self.device)  # fmt: skip
        if batch["made"]:
            crops[batch["made"]] = batch["pixels"].to(self.device, non_blocking=True)
        places, encoded = zip(*batch["encoded"])
        images = decode_jpegs([e.data for e in encoded], self.device)
        cut = [self._cut(item, image) for item, image in zip(encoded, images)]
        crops[list(places)] = torch.stack(cut).permute(0, 2, 3, 1)
        return crops

    def _cut(self, item: Encoded, image: torch.Tensor | None) -> torch.Tensor:
        """The item's box of its image, resized as ``RandomResizedCrop`` resizes; an image the
        device refused is decoded by Pillow first."""
        from torchvision.transforms import functional

        if image is None:
            pixels = rgb_pixels(item.data, item.where)
            image = torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)
        size, interpolation = list(self.resize.size), self.resize.interpolation
        return functional.resized_crop(image, *item.box, size, interpolation, antialias=True)


def rgb_pixels(data: bytes, where: str, steps: Compose | None = None, draft: int = 0):
    """An image's bytes through Pillow, converted to RGB and through ``steps`` if given, as a
    uint8 array (H, W, 3); ``draft``: JPEGs decoded at the smallest DCT scale ≥ ``draft``
    pixels. Undecodable bytes raise ValueError naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if draft and image.format == "JPEG":
                image.draft(image.mode, (draft, draft))
            image = image.convert("RGB")
            return np.array(steps(image) if steps else image, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types; name the row either way
        raise ValueError(f"{where}: bad image: {exc}") from exc


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 crops (N, H, W, 3) → ``ToTensor`` + ``Normalize``'s floats (N, 3, H, W).

    ``mean`` and ``std`` are float32 (1, 3, 1, 1) tensors on ``pixels``' device.
    """
    return pixels.permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)


class ShardDataset(IterableDataset):
    """(uint8 crop (H, W, 3), token ids) pairs of one epoch, this worker's row groups only.

    Set ``epoch`` before creating each epoch's DataLoader iterator: workers are
    started per epoch (``persistent_workers=False``) and copy it then.
    """

    def __init__(
        self,
        groups: list[RowGroup],
        crop: Compose,
        tokenizer,
        seed: int,
        draft: int = 0,
        on_device: bool = False,
    ):
        self.groups, self.crop, self.tokenizer, self.seed = groups, crop, tokenizer, seed
        self.draft = draft  # decode JPEGs at the smallest DCT scale ≥ this many pixels; 0: full
        # leave JPEGs the device decodes to it (DeviceCrops), with the box drawn here
        self.resize = device_crop(crop) if on_device else None
        if on_device and self.resize is None:
            raise ConfigError(f"the train transform {crop} has no form for the device")
        self.epoch = 0

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    def assigned(self, worker: int, workers: int) -> list[int]:
        """The row groups ``worker`` of ``workers`` reads this epoch, in reading order."""
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.groups))
        return [int(g) for g in order[worker::workers]]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for group in self.assigned(worker, workers):
            yield from map(self.sample, self.group_rows(group))

    def group_rows(self, group: int):
        """A row group's rows (uid, caption, image bytes) in this epoch's order for it.

        Also seeds torch's global generator for the augmentations of these rows.
        With ``workers=0`` that generator is the training process's own; the
        trainer draws nothing from it once the model is built.
        """
        rng = np.random.default_rng((self.seed, self.epoch, group))
        where = self.groups[group]
        table = pq.ParquetFile(where.path).read_row_group(where.index, columns=list(COLUMNS))
        uids = table["uid"].to_pylist()
        captions = table["caption"].to_pylist()
        images = table["image"].combine_chunks().field("bytes").to_pylist()
        order = rng.permutation(len(uids))
        torch.manual_seed(int(rng.integers(2**63)))
        for i in order:
            yield {"uid": uids[i], "caption": captions[i] or "", "image": images[i],
                   "path": where.path}  # fmt: skip

    def sample(self, row: dict):
        """Decode, crop and tokenize one row; or, for the device, draw its crop box."""
        tokens = self.tokenizer([row["caption"]])[0]
        where = f"shard {row['path']}: row {row['uid']}"
        if self.resize is not None and device_decodable(row["image"], DEFAULT_MAX_PIXELS):
            with Image.open(io.BytesIO(row["image"])) as image:  # the header only
                box = self.resize.get_params(image, self.resize.scale, self.resize.ratio)
            return Encoded(row["image"], tuple(box), where), tokens
        pixels = rgb_pixels(row["image"], where, self.crop, self.draft)
        return torch.from_numpy(pixels), tokens
