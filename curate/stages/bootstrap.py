"""The bootstrap stage: train the bundled mini CLIP on a trusted part of the pool (DFN-style).

Bootstrapped filtering (Fang et al., 2023, Data Filtering Networks) ranks a
pool with a model trained on data one trusts. Without downloadable weights
that is also how CLIP-score filtering works here at all: this stage picks the
rows that pass ``train_filters`` (a filter list, like the filter stage's: a set
name or inline, hashed with the stage and reachable with
``--set NAME.train_filters.FILTER.KEY``; the rows are *not* dropped), or
takes a trusted seed set of shards, trains ``model`` on them for a fixed
budget of samples (``curate.train.trainer``), and writes the checkpoint to
``RUN/checkpoints/<stage name>/``. A later clip stage scores the whole pool with
``model: run:checkpoints/<stage name>`` and a score filter keeps the top
fraction (``pipelines/bootstrap.yaml``).

The ledger passes through unchanged: this stage decides nothing itself.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from curate.core.config import ConfigError
from curate.core.filtering import FilterSet
from curate.core.layout import CHECKPOINTS, IMAGES, count_rows, ledger_files
from curate.core.operators import DEFAULT_SET, Filter
from curate.core.runfolder import remove_tree
from curate.core.stage import Stage, StageContext, register_stage
from curate.train.shards import write_shards

if TYPE_CHECKING:
    from curate.train.trainer import TrainConfig


@register_stage("bootstrap")
@dataclass
class BootstrapStage(Stage):
    # The filters choosing the training rows (not dropped); in a recipe, filters/datacomp_basic
    # unless given. Built in Python without it: every downloaded row trains.
    train_filters: list[Filter] = field(
        default_factory=list, metadata={DEFAULT_SET: "datacomp_basic"}
    )
    seed_set: str | None = None  # or a folder of Parquet shards (with images) to train on
    model: str = "curate-tiny"
    samples_seen: int = 20_000
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = "clip"
    workers: int = 2

    def __post_init__(self) -> None:
        self.train_config(seed=0).check()  # a bad lr or loss stops the recipe, not its training

    def train_config(self, seed: int) -> TrainConfig:
        from curate.train.trainer import TrainConfig

        return TrainConfig(
            model=self.model,
            samples_seen=self.samples_seen,
            batch_size=self.batch_size,
            lr=self.lr,
            loss=self.loss,
            seed=seed,
            workers=self.workers,
        )

    def columns_after(self, columns: set[str]) -> set[str]:
        if self.seed_set is None:
            if "status" not in columns:
                raise ConfigError(
                    f"stage {self.name}: training on the pool needs its images (a download "
                    "stage before it), or a `seed_set` of shards"
                )
            self._chooser().columns_after(columns)
        return columns

    def outputs(self) -> tuple[str, ...]:
        return (f"{CHECKPOINTS}/{self.name}",)

    def run(self, ctx: StageContext) -> int:
        from curate.train.trainer import train

        work = ctx.out_dir / "_train"
        shards, training_rows = self._training_shards(ctx, work)
        config = self.train_config(ctx.seed)
        checkpoint = ctx.run_dir / self.outputs()[0]
        staged = checkpoint.with_name(checkpoint.name + ".tmp")
        remove_tree(staged, ctx.run_dir)
        metrics = train(shards, staged, config, progress=ctx.progress)
        remove_tree(checkpoint, ctx.run_dir)
        staged.rename(checkpoint)
        remove_tree(work, ctx.run_dir)
        for path in ctx.input_files:  # the ledger, unchanged (hard links: no copy)
            try:
                os.link(path, ctx.out_dir / path.name)
            except OSError:
                shutil.copy2(path, ctx.out_dir / path.name)
        ctx.counters.update(
            checkpoint=f"{CHECKPOINTS}/{self.name}",
            training_rows=training_rows,
            **{k: metrics[k] for k in ("samples_seen", "steps", "final_loss") if k in metrics},
        )
        return count_rows(ctx.input_files)

    def _training_shards(self, ctx: StageContext, work: Path) -> tuple[Path, int]:
        """The seed set, or shards of the rows that pass ``train_filters`` (images included);
        and how many rows they hold."""
        if self.seed_set is not None:
            shards = Path(self.seed_set).expanduser()
            files = sorted(shards.glob("*.parquet"))
            if not files:
                raise ConfigError(f"stage {self.name}: seed_set {shards}: no Parquet shards in it")
            return shards, count_rows(files)
        selected = self._select(ctx, work / "ledger")
        shards = work / "shards"
        shards.mkdir(parents=True)
        rows = write_shards(selected, shards, ctx.run_dir / IMAGES, 10_000, False, ctx.engine,
                            f"{self.name}: shards", ctx.progress)  # fmt: skip
        if not rows:
            names = ", ".join(f.name for f in self.train_filters) or "no filter"
            raise ConfigError(
                f"stage {self.name}: no row passes train_filters ({names}): nothing to train on"
            )
        return shards, rows

    def _select(self, ctx: StageContext, out: Path) -> list[Path]:
        """Copies of the ledger files in which only the rows passing the filters are kept."""
        chooser = self._chooser()
        chooser.output_dir = out
        out.mkdir(parents=True)
        plan = StageContext(ctx.run_dir, out, ctx.input_files, ctx.input_schema, ctx.seed,
                            engine=ctx.engine)  # fmt: skip
        chooser.plan(plan)
        ctx.engine.map_files(chooser, ctx.input_files, out)
        return ledger_files(out)

    def _chooser(self) -> FilterSet:
        """The filter set that picks the training rows."""
        chooser = FilterSet(filters=self.train_filters)
        chooser.name = f"{self.name}.train_filters"
        return chooser
