"""The demo pool's eval set as evaluation tasks, in the layouts any real task uses.

Each attribute of ``VOCABULARY`` is a webdataset classification task
(``eval/shape``, ``eval/colour``, ``eval/background``), and the captions a
retrieval table (``eval/retrieval.parquet``). The colour task's images of the
pool's head colours and of its tail colours are two more tasks
(``eval/colour_head``, ``eval/colour_tail``: the same eleven classes, fewer
images), which show what balancing the long tail does. ``eval/suite.yaml``
lists the six, so ``curate eval --tasks POOL/eval`` scores them as it would
DataComp's.

A class name carries its article ("an orange"), so the prompts read as the
pool's captions do ("a picture of an orange shape", "an illustration of a large
red circle on a striped background"). A colour is the object's, so its
prompts name a shape, not a background.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.demo.captions import with_article
from curate.demo.scene import HEAD_COLOURS, TAIL_COLOURS
from curate.demo.vocab import VOCABULARY
from curate.io.eval_tasks import SUITE, Sample, write_webdataset_task

RETRIEVAL_TABLE = "retrieval.parquet"
#: The colour task's images split by how often the pool shows their colour.
COLOUR_GROUPS = {"colour_head": HEAD_COLOURS, "colour_tail": TAIL_COLOURS}

#: Prompt templates per attribute; ``{c}`` is the class name with its article.
PROMPTS: dict[str, tuple[str, ...]] = {
    "shape": (
        "{c}",
        "a picture of {c}",
        "a drawing of {c}",
        "an illustration of {c}",
        "an image of {c}",
        "{c} shape",
    ),
    "colour": (
        "{c} shape",
        "a picture of {c} shape",
        "a drawing of {c} shape",
        "an illustration of {c} object",
    ),
    "background": (
        "{c} background",
        "a shape on {c} background",
        "a picture of a shape on {c} background",
        "a drawing on {c} background",
        "an image with {c} background",
    ),
}


def write_tasks(eval_dir: Path, labels: dict[str, list]) -> None:
    """Write the tasks of ``eval_dir`` from its images and ``labels`` (path, one column per
    attribute, caption)."""
    images = [(eval_dir / path).read_bytes() for path in labels["path"]]
    tasks = {attribute: (attribute, names) for attribute, names in VOCABULARY.items()}
    tasks |= {name: ("colour", group) for name, group in COLOUR_GROUPS.items()}
    for name, (attribute, shown) in tasks.items():
        names = VOCABULARY[attribute]
        samples = [
            Sample(path, data, names.index(value))
            for path, data, value in zip(labels["path"], images, labels[attribute])
            if value in shown
        ]
        classnames = [with_article(c) for c in names]
        write_webdataset_task(eval_dir / name, samples, classnames, list(PROMPTS[attribute]))
    table = {"image": labels["path"], "caption": labels["caption"]}
    pq.write_table(pa.table(table), eval_dir / RETRIEVAL_TABLE)
    (eval_dir / SUITE).write_text(
        "# The demo's eval set: one task per attribute, the colour task's images of the\n"
        "# pool's head and tail colours, and caption retrieval.\n"
        + "".join(f"- {name}\n" for name in (*tasks, RETRIEVAL_TABLE))
    )
