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

Whichever way, the model holds what the file holds: open_clip builds the
architecture, then ``load_model`` loads the file checking every key, so a
missing tensor, a leftover one or a folder whose weights open_clip would skip
is an error, never a silently random (or half-random) model.

``pretrained: random`` gives randomly initialised weights, seeded, so every
worker builds the same model; scores from it are meaningless (tests and
throughput benchmarks only).

Workers receive a ``ResolvedModel`` naming only local files; they never download.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from curate.core.config import ConfigError

RANDOM = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CONFIG_FILE = "open_clip_config.json"


@dataclass(frozen=True)
class ResolvedModel:
    """Everything a worker needs to build the model, with local paths only."""

    open_clip_name: str  # an architecture, or "local-dir:/abs/folder"
    weights: str | None  # a local file; None only for random
    quick_gelu: bool = False  # OpenAI's weights were trained with QuickGELU
    description: dict = field(default_factory=dict, compare=False)


def _architectures() -> list[str]:
    import open_clip

    from curate.clip.model_configs import register_model_configs

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
        weights = folder_weights(folder)
        return ResolvedModel(f"local-dir:{folder.resolve()}", weights, False, described)
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


def folder_weights(folder: Path) -> str:
    """The weights file open_clip's local-dir loader reads in ``folder``; none is an error.

    open_clip reads only ``*.safetensors``, ``*.bin`` and ``*.pth`` there (its own
    names first) and, finding none, builds a randomly initialised model with only a
    logged warning: a folder holding, say, ``model.pt`` would score with random weights.
    """
    # The same choice as open_clip.create_model("local-dir:…"), so a folder loads alike in both.
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(folder)
    if found is None:
        skipped = sorted(f.name for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
        hint = f"; it skips {', '.join(skipped)}" if skipped else ""
        raise ConfigError(
            f"{folder}: no weights file open_clip reads (open_clip_model.safetensors, or "
            f"another *.safetensors / *.bin / *.pth file){hint}"
        )
    return str(Path(found).resolve())


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
    """Build the model (eval mode, no gradients) from local files only.

    open_clip builds the architecture alone (no weights, not even a text tower's
    base weights, which it would download); the file is then loaded here, every key
    checked, rather than trusting what ``create_model`` would load or skip.
    """
    import open_clip
    import torch

    from curate.clip.model_configs import register_model_configs

    register_model_configs()
    torch.manual_seed(0)  # `random` weights: the same model in every worker
    kwargs = {"force_quick_gelu": True} if resolved.quick_gelu else {}
    try:
        with no_random_init_warning():
            model = open_clip.create_model(
                resolved.open_clip_name,
                load_weights=False,
                pretrained_text=False,
                device=device,
                **kwargs,
            )
    except Exception as exc:
        raise ConfigError(f"cannot build the model {resolved.description}: {exc}") from exc
    if resolved.weights is not None:
        _load_weights(model, resolved)
    model.eval().requires_grad_(False)
    return model


@contextlib.contextmanager
def no_random_init_warning():
    """Hide open_clip's "No pretrained weights loaded" warning where no weights are wanted
    from it: ``load_model`` loads them next (or ``pretrained: random`` asked for none), the
    trainer starts from scratch."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip logs with logging.warning(), on the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_weights(model, resolved: ResolvedModel) -> None:
    """Load the weights file into ``model``: every tensor from the file, and nothing left over.

    open_clip's ``load_checkpoint`` reads safetensors, or torch files with
    ``weights_only=True``; unwraps ``state_dict`` and ``module.`` and resizes position
    embeddings. With ``strict=False`` it returns the missing and unexpected keys
    instead of raising one message that lists them all (hundreds, for a file of
    another architecture); a shape mismatch still raises. (It does fill a SigLIP
    ``logit_bias`` the file lacks with zero; no embedding depends on it.)
    """
    import open_clip

    path = resolved.weights
    where = f"cannot load the model {resolved.description} from {path}"
    try:
        keys = open_clip.load_checkpoint(model, path, strict=False, weights_only=True)
    except Exception as exc:  # unreadable, pickled objects, tensors of the wrong shape
        raise ConfigError(f"{where}: {_first_lines(exc)}") from exc
    wrong = [
        f"{len(names)} {kind} key{'s' if len(names) > 1 else ''} ({_some(names)})"
        for kind, names in (("missing", keys.missing_keys), ("unexpected", keys.unexpected_keys))
        if names
    ]
    if wrong:
        raise ConfigError(f"{where}: the file does not fit the architecture: {'; '.join(wrong)}")


def _some(names: list[str], shown: int = 3) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _first_lines(exc: Exception, shown: int = 3) -> str:
    """An exception's message cut to a few lines: torch lists every mismatched tensor."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    more = f" (and {len(lines) - shown} more)" if len(lines) > shown else ""
    return " ".join(lines[:shown]) + more


def tokenizer_for(resolved: ResolvedModel):
    import open_clip

    from curate.clip.model_configs import register_model_configs

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
