"""The stage shape: small picklable dataclasses, heavy state only in ``setup``.

A ``MapStage`` is a batch function over ``pa.Table`` ledger batches; the engine
(``ctx.engine``) maps it over the ledger files, in-process or on the cluster —
the same function either way. A plain ``Stage`` (ingest, download, clip, shard)
plans on the driver and hands its row work to the engine itself (``run``):
it reads or writes something other than the ledger alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from curate.core.registry import registrar

if TYPE_CHECKING:
    from curate.engine import Engine


@dataclass
class StageContext:
    """Where a stage reads and writes; filled by the runner."""

    run_dir: Path
    out_dir: Path  # this stage's output folder (a temporary name until it succeeds)
    input_files: list[Path]  # the previous stage's ledger files ([] for ingest)
    input_schema: pa.Schema | None
    seed: int = 0
    input_path: Path | None = None  # the user's --input (ingest only)
    ingest_dir: Path | None = None  # the ingest stage's output (DataComp .npz manifest)
    verbose: bool = False  # Ray's and img2dataset's own logs
    progress: bool = False  # draw progress lines on stderr (curate.core.progress); decided per run
    engine: Engine | None = None  # where the row work runs (curate.engine); set by the runner
    counters: dict = field(default_factory=dict)  # stage-specific numbers for the manifest
    plan: Any = None  # what the stage's ``plan`` returned, for its ``run`` (set by the runner)


class Stage:
    """A pipeline step. Subclasses are dataclasses; ``name`` is set from the recipe."""

    kind: ClassVar[str]
    #: False for stages whose output is not a ledger (shard).
    produces_ledger: ClassVar[bool] = True
    #: The run's folder this stage writes instead of ``stages/NN_name`` (shard: ``shards``).
    folder: ClassVar[str | None] = None
    #: Set from the recipe: it names the stage's folder and its ``--set`` overrides.
    name: str
    #: The folder the stage writes while it runs, set by the runner before ``plan``.
    #: What ``plan`` decides (fitted statistics, dedup decisions) is written under it,
    #: and workers read it from there by path: the stage object carries no plan state.
    output_dir: Path | None = None

    def preflight(self) -> None:
        """Checks that must pass before the first stage of the run starts (weights present …).

        Anything that can fail for a reason known at start-up fails here, not an
        hour later when the stage's turn comes.
        """

    def outputs(self) -> tuple[str, ...]:
        """Folders of the run besides its own that this stage writes (``images`` …).

        The runner records their files in the stage's manifest with its own, and runs
        the stage again when any of them has changed.
        """
        return ()

    def plan(self, ctx: StageContext) -> Any:
        """Driver-side preparation: validate the input schema, fit global statistics.

        What it writes goes under ``output_dir``; what it returns reaches ``run`` as
        ``ctx.plan``.
        """

    def columns_after(self, columns: set[str]) -> set[str]:
        """The ledger columns this stage leaves, given those it gets.

        Raise ConfigError when a column it needs is missing: the runner checks the
        whole chain right after ingest, before any long stage starts.
        """
        return columns

    def run(self, ctx: StageContext) -> int:
        """Do the whole stage on the driver; return the number of rows written."""
        raise NotImplementedError


class MapStage(Stage):
    """A stage that maps ledger batches to ledger batches, row for row."""

    def setup(self) -> None:
        """Load heavy state once per worker (models, fitted statistics)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


STAGES: dict[str, type[Stage]] = {}

#: Class decorator: make a stage available to recipes as ``stage: <kind>``.
register_stage = registrar(STAGES, "kind", "stage")
