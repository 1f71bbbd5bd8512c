"""The engine: where a run's row work happens. The only code that imports Ray.

A stage never asks which engine it is on. It asks ``ctx.engine`` to

* map a ``MapStage`` over ledger files, one output file per input file
  (``map_files``; the stage's ``setup`` runs once per worker);
* map a function over work items and return the results in order
  (``map_items``; a file each, a partition each, a shard each);
* feed prepared items to a pool of model workers, GPUs when there are any
  (``map_with_models``);
* say what the cluster has (``resources``).

``LocalEngine`` does all of it in this process (unit tests, debugging); items
that ask for processes (downloads) run in a pool whose processes die with this
one. ``RayEngine`` does it on a Ray cluster: one started here on 127.0.0.1 when
no address is given, or the one at ``--address`` / ``RAY_ADDRESS``.

Both give the same results: every function the engine runs is pure in its
inputs and writes its output files under names that do not depend on where or
in which order it ran.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from curate.engine.base import Engine, Item, Kind, Result


def open_engine(kind: Kind, address: str | None = None, verbose: bool = False) -> Engine:
    """A started engine of ``kind``; ``close()`` it when the run ends."""
    if kind == "local":
        from curate.engine.local import LocalEngine

        return LocalEngine()
    from curate.engine.ray_cluster import RayEngine

    return RayEngine(address, verbose)


def cluster(kind: Kind, verbose: bool = False) -> AbstractContextManager[None]:
    """A context in which every run shares one cluster (``curate demo``'s four runs).

    Starts a local Ray cluster for ``kind == "ray"`` unless one is already up, and
    stops it at the end if it started it; nothing for ``local``.
    """
    from curate.engine.ray_cluster import shared_cluster

    return shared_cluster(kind == "ray", verbose)


__all__ = ["Engine", "Item", "Kind", "Result", "cluster", "open_engine"]
