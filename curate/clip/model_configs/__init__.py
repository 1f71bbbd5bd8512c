"""Small open_clip model configs bundled with curate (``curate-tiny``: tests and demos).

``register_model_configs()`` adds this folder to open_clip's config search path,
after which ``open_clip.create_model("curate-tiny")`` and
``open_clip.get_tokenizer("curate-tiny")`` work like any built-in architecture name.
"""

from __future__ import annotations

import functools
from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent


@functools.cache
def register_model_configs() -> None:
    """Make open_clip know the architectures in this folder by name (idempotent).

    open_clip only resolves model names from its own ``model_configs/`` folder
    plus the paths given to ``open_clip.add_model_config``; without this call
    "curate-tiny" is an unknown model. Cached, so open_clip's search path gets
    this folder once however often it is called.
    """
    open_clip.add_model_config(CONFIG_DIR)
