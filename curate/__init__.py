"""curate: a Ray-parallel curation pipeline for web-scale image-text datasets."""

__version__ = "0.1.0"
