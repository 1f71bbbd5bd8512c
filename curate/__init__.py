"""curate: a Ray-parallel curation pipeline for web-scale image-text datasets."""

__version__ = "0.1.0"

import os as _os

# albumentations, imported by img2dataset, checks PyPI for updates on import unless
# this is set; curate sends no traffic its user did not ask for.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
