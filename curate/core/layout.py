"""Where things are in a run folder: the one place that names them.

::

    RUN/.curate, .curate-lock   the marker and the lock (curate.core.runfolder)
    RUN/recipe.yaml             the resolved recipe that ran
    RUN/stages/NN_NAME/         each stage's output: its ledger files, _SUCCESS, _stats/
    RUN/ledger/                 the final ledger (links to the last ledger stage's files)
    RUN/images/                 the download's image shards, _index.json, _params.json
    RUN/embeddings/             the clip stage's vectors, _model.json
    RUN/checkpoints/NAME/       a bootstrap stage's model
    RUN/shards/                 the kept rows, for training
    RUN/report/, report.*       the report and its figures
    RUN/uids.npy                the kept uids, in DataComp's format
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from curate.core.runfolder import check_name

RECIPE = "recipe.yaml"
STAGES = "stages"
SUCCESS = "_SUCCESS"
STATS = "_stats"
LEDGER = "ledger"
IMAGES = "images"
IMAGE_INDEX = "_index.json"
EMBEDDINGS = "embeddings"
MODEL_FILE = "_model.json"
CHECKPOINTS = "checkpoints"
SHARDS = "shards"
FIGURES = "report"
UIDS = "uids.npy"
CONCEPT_COUNTS = "concept_counts.csv"  # a balance stage's counts, in its folder


def ledger_files(folder: Path) -> list[Path]:
    """The Parquet files of a ledger folder, in their deterministic order."""
    return sorted(Path(folder).glob("*.parquet"))


def stage_folder(run_dir: Path, index: int, name: str, folder: str | None = None) -> Path:
    """Where stage ``index`` of a run is written: ``stages/NN_NAME``, or the run folder its
    class names (``Stage.folder``: the shard stage's ``shards/``)."""
    if folder:
        return run_dir / folder
    return run_dir / STAGES / f"{index:02d}_{check_name(name, 'stage name')}"


def count_rows(files: list[Path]) -> int:
    """The rows of Parquet files, from their footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
