"""The Ray engine: a run's row work as Ray tasks and actors, on a local or remote cluster.

* ``map_items``: one task of one CPU per item; results come back in order. Each
  task also says on which node it ran (``tasks_per_node``: a run's manifests
  record where each stage's work went).
* ``map_files``: one such task per ledger file (read, map, write under the same
  name), the stage set up once per worker process.
* ``map_with_models``: Ray Data streams CPU tasks into an actor pool (one model per
  actor, a GPU each when ``num_gpus``).

A worker's exception reaches the driver as itself (an ``OSError`` with its path,
a ``ConfigError`` with its message), not wrapped in Ray's own errors.

Ray is started in the main thread on purpose: its child processes die with the
thread that started them (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.progress import FinishedRows, Progress
from curate.engine.base import Engine, Item, Result

if TYPE_CHECKING:
    from curate.stages import MapStage


class RayEngine(Engine):
    """Tasks and actors on a local or remote cluster, started before the first stage.

    Workers are warmed (imports, operator registry) by one small task per CPU, in a
    thread, while the driver plans.
    """

    name = "ray"

    def __init__(self, address: str | None = None, verbose: bool = False):
        import ray

        self._owns_ray = not ray.is_initialized()  # else a caller's session: leave it up
        init_ray(address, verbose)
        self.verbose = verbose
        self._placed: Counter[str] = Counter()
        cpus = max(1, int(self.resources()["CPU"]))
        warm = threading.Thread(target=_run_tasks, args=(_warm_up, [None] * cpus), daemon=True)
        self._warming = warm
        warm.start()

    def wait_ready(self) -> None:
        self._warming.join()

    def map_files(
        self, stage: MapStage, files: list[Path], out_dir: Path, progress: Progress | None = None
    ) -> None:
        """``progress`` counts the rows of the Parquet files written so far (their footers:
        cheap, and nothing added to the work)."""
        self.wait_ready()
        polled = progress.poll(FinishedRows(out_dir)) if progress else contextlib.nullcontext()
        with polled, worker_errors():
            key = uuid.uuid4().hex  # this call's stage, set up once per worker process
            jobs = [(stage, key, f, out_dir / f.name) for f in files]
            self.map_items(_map_file, jobs, getattr(stage, "name", type(stage).__name__))

    def map_items(
        self,
        fn: Callable[[Item], Result],
        items: Sequence[Item],
        label: str,
        progress: bool = False,
        processes: int | None = None,
        gpus: float = 0,
    ) -> list[Result]:
        with Progress(label, len(items), unit="tasks", enabled=progress and bool(items)) as shown:
            done = _run_tasks(fn, items, shown, gpus)
        self._placed.update(node for node, _ in done)
        return [result for _, result in done]

    def tasks_per_node(self) -> dict[str, int]:
        return dict(self._placed)

    def map_with_models(
        self,
        items: list[dict],
        prepare: Callable[..., pa.Table],
        prepare_args: dict,
        model: type,
        model_args: tuple,
        workers: int,
        gpus: float,
        out_dir: Path,
        rows_per_file: int,
        progress: Progress | None = None,
    ) -> None:
        import ray.data

        self.wait_ready()
        _configure_ray_data(self.verbose)
        # A lost model actor fails the stage (which resumes) rather than being restarted, so
        # Ray does not warn on every run about restarting actors whose constructor arguments
        # live in the object store.
        size = max(1, min(workers, len(items)))  # no more actors than items
        actors = {"compute": ray.data.ActorPoolStrategy(size=size), "max_restarts": 0}
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        if gpus:  # CPU tasks prepare, apart, while the GPUs compute
            ds = ds.map_batches(
                prepare, fn_kwargs=prepare_args, batch_size=1, batch_format="pyarrow", num_cpus=1
            )
            ds = ds.map_batches(
                model, fn_constructor_args=model_args, batch_size=1, batch_format="pyarrow",
                num_cpus=1, num_gpus=gpus, **actors,
            )  # fmt: skip
        else:  # on CPUs each actor prepares its own items (one actor per CPU)
            ds = ds.map_batches(
                _PreparingModel, fn_constructor_args=(prepare, prepare_args, model, model_args),
                batch_size=1, batch_format="pyarrow", num_cpus=1, **actors,
            )  # fmt: skip
        polled = progress.poll(FinishedRows(out_dir)) if progress else contextlib.nullcontext()
        with polled, worker_errors():
            ds.write_parquet(
                str(out_dir), filename_provider=_part_names(), min_rows_per_file=rows_per_file
            )

    def resources(self) -> dict[str, float]:
        import ray

        have = ray.cluster_resources()
        return {"CPU": float(have.get("CPU", 0)), "GPU": float(have.get("GPU", 0))}

    def close(self) -> None:
        """Stop what this engine started, without waiting for the processes to exit."""
        import ray

        self._warming.join()
        if self._owns_ray:
            ray.shutdown()


def _run_tasks(
    fn: Callable, items: Sequence, shown: Progress | None = None, gpus: float = 0
) -> list[tuple]:
    """(node, fn(item)) for each item, a task each (of one CPU and ``gpus``), in order."""
    import ray

    # SPREAD: a stage's tasks go round the nodes (as Ray Data's reads do), not first to
    # the driver's node until it is full.
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1, scheduling_strategy="SPREAD")(
        _call_item
    )
    shared = ray.put(fn)  # once, not with every task: it may be a large object
    refs = [remote.remote(shared, item) for item in items]
    pending = list(refs)
    with worker_errors():
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if shown:
                shown.update(len(refs) - len(pending))
        return ray.get(refs)


def _call_item(fn: Callable, item) -> tuple[str, object]:
    """One work item, and the node it ran on: ``fn`` may be a function or any callable
    object (a downloader)."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(item)


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Re-raise a worker's exception as itself: Ray wraps it in a subclass whose message is
    the worker's traceback, with the original in ``cause``."""
    import ray.exceptions

    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Join ``address`` (or RAY_ADDRESS), or start a local cluster; quiet unless verbose."""
    # Usage statistics would be sent to a remote server; never from this tool.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    # albumentations (imported by img2dataset in the workers) phones home on import.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    kwargs = {"runtime_env": {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}}
    if address is None:
        # The embedded cluster binds to loopback only (Ray reads this when imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # "local" always starts a new cluster, even when another one runs on this machine.
        kwargs = {"include_dashboard": False, "num_cpus": os.cpu_count()}  # env: inherited
        address = "local"
    import ray

    # Ray warns on every start that token authentication is on, as it is by default:
    # not the user's business unless they asked for Ray's own logs.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice.setLevel(logging.INFO if verbose else logging.ERROR)
    if not ray.is_initialized():
        ray.init(
            address=address,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
            configure_logging=True,
            **kwargs,
        )


@contextlib.contextmanager
def shared_cluster(start: bool, verbose: bool = False) -> Iterator[None]:
    """A local cluster for several runs (they join it); stopped at the end if started here."""
    if not start:
        yield
        return
    import ray

    owns = not ray.is_initialized()
    init_ray(None, verbose)
    try:
        yield
    finally:
        if owns:
            ray.shutdown()


def _configure_ray_data(verbose: bool) -> None:
    """Ray Data's settings, once it is first used: a run that needs no model pool does
    not import it at all."""
    import ray.data

    # max_restarts (map_with_models) is passed the one way Ray Data takes it, which it
    # calls deprecated in favour of named parameters it does not have yet.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # A worker's error reaches the driver as itself (an OSError stays one, with its path),
    # not as Ray Data's UserCodeException holding only its text.
    ctx.raise_original_map_exception = True
    # One bar per operator, redrawn several lines high: only with --verbose. The runner
    # draws its own line per stage (curate.core.progress).
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    # Metrics polling: driver CPU spent on numbers nobody reads here.
    ctx.enable_per_node_metrics = False
    ctx.enable_get_object_locations_for_metrics = False
    ctx.memory_usage_poll_interval_s = None
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # Without bars its only news is a warning that they are off: they are, on purpose.
    progress_log = logging.getLogger("ray.data._internal.progress")
    progress_log.setLevel(logging.INFO if verbose else logging.ERROR)


def _warm_up(_) -> None:
    """A worker's first task: the imports and the operator registry every stage needs."""
    from curate.core.operators import load_registry

    load_registry()


# --- map_files -----------------------------------------------------------------------------

#: The stage set up in this worker process, by the key of the map_files call it serves.
_READY: dict[str, MapStage] = {}


def _map_file(job: tuple[MapStage, str, Path, Path]) -> None:
    """One ledger file through ``stage``, set up once per worker process and call."""
    stage, key, path, out = job
    ready = _READY.get(key)
    if ready is None:
        _READY.clear()  # an earlier stage's model or tables: not needed any more
        stage.setup()
        _READY[key] = ready = stage
    pq.write_table(ready(pq.read_table(path)), out)


class _PreparingModel:
    """A model worker that prepares its own items (on CPUs, where nothing is gained by
    preparing them elsewhere)."""

    def __init__(self, prepare: Callable, prepare_args: dict, model: type, model_args: tuple):
        self.prepare, self.prepare_args = prepare, prepare_args
        self.model = model(*model_args)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.model(self.prepare(batch, **self.prepare_args))


def _part_names():
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_block(self, block, write_uuid, task_index, block_index):
            return f"part-{task_index:05d}-{block_index:03d}.parquet"

    return PartNames()
