"""The bundled synthetic web pool: real defects, exact ground truth, served over loopback.

Real web data cannot be fetched here, so ``generate_pool`` draws one: images
of coloured shapes with templated captions, and the defects curation exists
for injected at known rates, every one recorded in ``manifest.json``.
``serve_pool`` puts it behind a loopback HTTP server so the download stage
runs for real. Modules: ``vocab`` (the words), ``scene`` (what an image
shows), ``captions``, ``draw`` (pixels and damaged bytes), ``plan`` (which
row gets which defect), ``pool`` (files on disk, url list, server).
"""

from curate.demo.plan import DEFECTS, DefectRates
from curate.demo.pool import (
    defect_counts,
    generate_pool,
    load_manifest,
    serve_pool,
    write_url_list,
)
from curate.demo.vocab import VOCABULARY

__all__ = [
    "DEFECTS",
    "VOCABULARY",
    "DefectRates",
    "defect_counts",
    "generate_pool",
    "load_manifest",
    "serve_pool",
    "write_url_list",
]
