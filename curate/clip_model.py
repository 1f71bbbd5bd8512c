"""Which CLIP model scores the pool, resolved once on the driver before any stage runs.

A recipe names a model three ways:

* an open_clip architecture and a pretrained tag (``ViT-B-32`` /
  ``laion2b_s34b_b79k``): the weights are fetched (or found in the cache) by
  open_clip on the driver, once, so a run without them fails at start-up with
  a message saying how to supply a local file — not after the download stage;
* an architecture and a local weights file (``.safetensors``, or a torch file
  read with ``weights_only=True``: tensors only, never arbitrary pickled
  objects);
* a folder in open_clip's ``local-dir`` layout (``open_clip_config.json`` +
  weights), which is what the bundled trainer writes and what a Hugging Face
  open_clip repository looks like once downloaded.

``pretrained: random`` gives randomly initialised weights, seeded, so every
worker builds the same model; scores from it are meaningless (tests and
throughput benchmarks only).

Workers receive a ``ResolvedModel`` naming only local files; they never download.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.config import ConfigError

RANDOM = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CONFIG_FILE = "open_clip_config.json"


@dataclass(frozen=True)
class ResolvedModel:
    """Everything a worker needs to build the model, with local paths only."""

    open_clip_name: str  # an architecture, or "local-dir:/abs/folder"
    weights: str | None  # a local file; None for a folder (open_clip finds it) or random
    quick_gelu: bool = False  # OpenAI's weights were trained with QuickGELU
    description: dict = field(default_factory=dict, compare=False)


def _architectures() -> list[str]:
    import open_clip

    from curate.model_configs import register_model_configs

    register_model_configs()
    return open_clip.list_models()


def _weights_help(model: str) -> str:
    return (
        f"Fetch the weights where there is internet access (for example "
        f"`python -c \"import open_clip; open_clip.create_model('{model}', pretrained='TAG')\"` "
        "fills the Hugging Face cache, which curate then uses offline), or point "
        "`pretrained:` at a local .safetensors / .bin / .pt weights file, or `model:` at a "
        f"folder holding {CONFIG_FILE} and the weights."
    )


def resolve_model(model: str, pretrained: str | None) -> ResolvedModel:
    """Check the model can be built and its weights are here (fetching them once if allowed)."""
    described = {"model": model, "pretrained": pretrained}
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(f"model {model!r}: a model folder must hold {CONFIG_FILE}")
        if pretrained not in (None, RANDOM):
            raise ConfigError(
                f"model {model!r} is a folder with its own weights; leave `pretrained` unset"
            )
        return ResolvedModel(f"local-dir:{folder.resolve()}", None, False, described)
    if Path(model).suffix in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"model {model!r} looks like a weights file: set `model:` to its architecture "
            "(e.g. ViT-B-32) and `pretrained:` to the file"
        )
    known = _architectures()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model {model!r}: not an open_clip architecture or a folder{hint}")
    if pretrained is None:
        raise ConfigError(
            f"model {model!r} needs weights: set `pretrained:` to an open_clip tag "
            f"({', '.join(_tags(model)) or 'none known'}), a local weights file, or 'random'"
        )
    if pretrained == RANDOM:
        return ResolvedModel(model, None, False, described)
    path = Path(pretrained).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        if not path.is_file():
            raise ConfigError(f"pretrained {pretrained!r}: no such weights file")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ConfigError(
                f"pretrained {pretrained!r}: expected a {' / '.join(WEIGHT_SUFFIXES)} weights file"
            )
        return ResolvedModel(model, str(path.resolve()), False, described)
    return _fetch_tag(model, pretrained, described)


def _tags(model: str) -> list[str]:
    import open_clip

    return open_clip.list_pretrained_tags_by_model(model)


def _fetch_tag(model: str, tag: str, described: dict) -> ResolvedModel:
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ConfigError(
            f"pretrained {tag!r}: not a tag of {model} (tags: {', '.join(_tags(model)) or 'none'}) "
            "and not a weights file"
        )
    try:
        weights = download_pretrained(cfg)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot get the weights of {model} / {tag}: {reason}. {_weights_help(model)}"
        ) from exc
    return ResolvedModel(model, weights, bool(cfg.get("quick_gelu", False)), described)


def load_model(resolved: ResolvedModel, device: str = "cpu"):
    """Build the model (eval mode, no gradients) from local files only."""
    import open_clip
    import torch

    from curate.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)  # `random` weights: the same model in every worker
    kwargs = {"force_quick_gelu": True} if resolved.quick_gelu else {}
    try:
        model = open_clip.create_model(
            resolved.open_clip_name,
            pretrained=resolved.weights,
            device=device,
            weights_only=True,
            **kwargs,
        )
    except Exception as exc:
        raise ConfigError(f"cannot load the model {resolved.description}: {exc}") from exc
    model.eval().requires_grad_(False)
    return model


def tokenizer_for(resolved: ResolvedModel):
    import open_clip

    from curate.model_configs import register_model_configs

    register_model_configs()
    return open_clip.get_tokenizer(resolved.open_clip_name)


@dataclass(frozen=True)
class Preprocess:
    """open_clip's eval transform split at the tensor: PIL steps on CPU, normalising on the device.

    Decode workers produce uint8 crops (4× smaller than float tensors to ship);
    the model's worker turns them into the normalised floats open_clip's own
    ``ToTensor`` + ``Normalize`` would give.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    fill_color: int = 0

    @classmethod
    def of(cls, model) -> Preprocess:
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ConfigError(f"non-square model input {tuple(size)} is not supported")
            size = size[0]
        return cls(
            int(size),
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg.get("interpolation", "bicubic"),
            cfg.get("resize_mode", "shortest"),
            cfg.get("fill_color", 0),
        )

    def pil_steps(self):
        """The transform up to (not including) ToTensor: PIL image in, PIL RGB crop out."""
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision.transforms import Compose, ToTensor

        full = image_transform_v2(
            PreprocessCfg(
                size=self.size,
                mean=self.mean,
                std=self.std,
                interpolation=self.interpolation,
                resize_mode=self.resize_mode,
                fill_color=self.fill_color,
            ),
            is_train=False,
        )
        steps = full.transforms
        cut = next(i for i, t in enumerate(steps) if isinstance(t, ToTensor))
        return Compose(steps[:cut])


def describe(resolved: ResolvedModel, embed_dim: int, preprocess: Preprocess) -> str:
    """What goes into embeddings/_model.json: enough to load the same model again."""
    return json.dumps(
        {**resolved.description, "embed_dim": embed_dim, "image_size": preprocess.size},
        indent=1,
    )


def embedding_matrix(column) -> np.ndarray:
    """A fixed_size_list embedding column as a (rows, D) array of its value type; null rows NaN."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    dense = column if valid.all() else column.filter(pa.array(valid))
    values = dense.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if valid.all():
        return values
    out = np.full((len(column), dim), np.nan, values.dtype)
    out[valid] = values
    return out


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise float vectors row by row in float32 (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)
