"""The two kinds of per-batch work: annotators add columns, filters return keep masks.

A filter reads columns and decides; it never computes a score itself. When a
filter needs a column an annotator provides (``lang``, ``text_count``, …), the
filter stage runs that annotator first, on the rows still alive only, so
expensive scores are never computed for rows a cheaper filter already dropped.

Operators that need a global view of the pool (caption frequencies, token
vocabularies) are ``Fitted``: ``fit`` runs once per stage, hands its work to the
engine, and writes an artifact into a folder the stage declares; ``load`` reads
it from that folder once per worker; the per-batch method then applies it. Only
the folder's path travels to the workers. That is the fit → artifact → apply
shape that scales to a cluster.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np
import pyarrow as pa

from curate.core.registry import registrar

if TYPE_CHECKING:
    from curate.engine import Engine


@dataclass(frozen=True)
class FitContext:
    """What ``fit`` may read and where it writes."""

    ledger_files: list[Path]  # the stage's input ledger (Parquet)
    stats_dir: Path  # an empty folder owned by this operator
    seed: int = 0
    run_dir: Path | None = None  # the run folder (embeddings/ and images/ sit there)
    ingest_dir: Path | None = None  # the ingest stage's output (DataComp .npz manifest)
    input_path: Path | None = None  # the user's --input (relative paths are looked up beside it)
    engine: Engine | None = None  # where the fit's work runs (curate.engine)


class Operator:
    """Base of annotators and filters. Subclasses are dataclasses of their parameters."""

    name: ClassVar[str]
    #: Ledger columns read by the per-batch method: the only ones its batches carry.
    needs: ClassVar[tuple[str, ...]] = ()

    def setup(self) -> None:
        """Load heavy state (a model) once per worker."""


class Fitted:
    """The base of operators fitted to the whole pool (mixed in before Annotator or Filter).

    ``fit`` writes the operator's artifact into ``ctx.stats_dir``; ``load`` reads it
    from that folder on each worker instead of ``setup``. The operator keeps no
    fitted state of its own between the two: the folder is the plan's result.
    """

    def fit(self, ctx: FitContext) -> None:
        """Compute the pool-wide statistic and write it under ``ctx.stats_dir``."""
        raise NotImplementedError

    def load(self, stats_dir: Path) -> None:
        """Read what ``fit`` wrote in ``stats_dir`` (once per worker)."""
        raise NotImplementedError


class Annotator(Operator):
    #: Ledger columns this annotator adds.
    provides: ClassVar[tuple[str, ...]]

    def annotate(self, batch: pa.Table) -> dict[str, pa.Array]:
        """Return one array per column in ``provides``, aligned with ``batch``."""
        raise NotImplementedError


class Filter(Operator):
    def keep(self, batch: pa.Table) -> pa.Array | np.ndarray:
        """Boolean mask aligned with ``batch``: True keeps the row; null counts as a drop."""
        raise NotImplementedError


#: Metadata key of a stage field typed ``list[Filter]``: the filter set (a name in
#: ``filters/``) it holds when a recipe omits it.
DEFAULT_SET = "default_set"

FILTERS: dict[str, type[Filter]] = {}
ANNOTATORS: dict[str, type[Annotator]] = {}  # keyed by each column provided

Op = TypeVar("Op", bound=type[Operator])

#: Class decorator: make a filter available to filter sets under a name.
register_filter = registrar(FILTERS, "name", "filter")


def register_annotator(name: str):
    """Class decorator: register an annotator as the provider of its ``provides`` columns."""

    def wrap(cls: Op) -> Op:
        cls.name = name
        for column in cls.provides:
            if column in ANNOTATORS:
                raise ValueError(f"column {column!r} has two annotators")
            ANNOTATORS[column] = cls
        return cls

    return wrap


#: The packages whose modules register stages, annotators and filters when imported.
#: Named, not imported here: they sit above this layer and import it.
PLUGIN_PACKAGES = ("curate.stages", "curate.annotators", "curate.filters")


def load_registry() -> None:
    """Import every stage, annotator and filter module so they register themselves."""
    for name in PLUGIN_PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{name}.{info.name}")
