"""``curate demo``: the whole job on the bundled pool, from nothing to a comparison table.

It generates the synthetic web pool, serves it on 127.0.0.1, runs six recipes on
one local Ray cluster (the unfiltered ``raw`` baseline, DataComp's basic filter,
DataComp's text-based filter, DFN-style bootstrapped filtering, MetaCLIP
balancing and perceptual-hash dedup), writes each run's report, then trains the
same small CLIP with the same budget on each run's shards
(``curate.train.compare``) and tabulates what each curation choice bought.

Everything lands under one folder::

    DIR/pool/              the generated pool (reused when its size and seed match),
                           served where it was last served, so its urls do not change
    DIR/runs/RECIPE/       each run: ledger, shards, report.md / report.html; the runs
                           after ``raw`` share its ingest and download (one fetch a url)
    DIR/compare/           the checkpoints and their evaluations
    DIR/compare.json, .md  one row per recipe (DataComp-style table)
    DIR/report.md          the table, and where each run's report is

Every recipe downloads at 128 px (the mini CLIP sees 64 px) so the runs differ
only in what they keep.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from curate.core.config import ConfigError
from curate.core.recipe import load_recipe
from curate.core.runfolder import claim
from curate.demo.plan import DefectRates
from curate.demo.pool import generate_pool, load_manifest, serve_pool
from curate.engine import cluster
from curate.report.build import finisher
from curate.runner import RunResult, StageResult, run_recipe
from curate.train.compare import checked_seeds, compare, compare_table
from curate.train.trainer import TrainConfig


@dataclass(frozen=True)
class DemoSize:
    """How big the pool is and how much compute each model gets."""

    rows: int  # pairs in the pool
    eval_size: int  # held-out images the models are scored on
    samples_seen: int  # the training budget of every compared model, and of the bootstrap model
    seeds: tuple[int, ...]  # one model per seed and run: mean ± std with several

    @property
    def balance_t(self) -> int:
        # About the count of the rarest colours among the rows balancing sees (the basic
        # filter's), so the tail keeps every row and the head is capped near it. p = t /
        # count depends on count / t only, so this cuts the same way at every size.
        return max(1, self.rows // 64)


#: ``small`` is the default; ``tiny`` is for tests; the README gives their run times.
SIZES = {
    "tiny": DemoSize(rows=300, eval_size=66, samples_seen=256, seeds=(0,)),
    "small": DemoSize(rows=2_000, eval_size=550, samples_seen=6_000, seeds=(0,)),
    "medium": DemoSize(rows=5_000, eval_size=1_100, samples_seen=20_000, seeds=(0, 1, 2)),
    "large": DemoSize(rows=20_000, eval_size=1_100, samples_seen=60_000, seeds=(0, 1, 2)),
}

#: The six runs: (run and row name, recipe in pipelines/, what it shows).
RECIPES = (
    ("raw", "raw", "every row whose image downloads: the unfiltered baseline"),
    ("datacomp_basic", "download_basic", "DataComp's basic filter on the downloaded images"),
    ("concept_match", "concept_match", "DataComp's text-based filter: English captions naming "
     "a concept"),
    ("bootstrap", "bootstrap", "a mini CLIP trained on the basic filter's rows scores the pool"),
    ("metaclip_balance", "metaclip_balance", "basic filter, then MetaCLIP concept balancing"),
    ("dedup_phash", "dedup_phash", "perceptual-hash dedup: one picture of each group of copies"),
)  # fmt: skip


#: The demo pool's defects, at web-like rates: alt-text on the web mostly does not describe
#: its image (CLIP-score filters keep 10-30 % of it), much of it is not English, and
#: reposts over-weight a few pictures; curation pays for itself only when that is common.
DEMO_RATES = DefectRates(
    mismatched=0.20,
    non_english=0.20,
    tiny=0.05,
    banner=0.04,
    exact_duplicate=0.05,
    near_duplicate=0.05,
)
#: The top fraction the bootstrap run keeps: ~47 % of the pool's rows have captions that
#: do not describe their image (mismatched, boilerplate, non-English, 1-2 words), 9 % are
#: thumbnails or banners and 5.5 % serve no image, so ~40 % of the downloaded rows are
#: clean, and keeping less than that would only shrink what the model sees.
BOOTSTRAP_KEEP = 0.4


def recipe_overrides(name: str, size: DemoSize) -> list[str]:
    """The ``--set`` values the demo gives run ``name``: loopback, 128 px, budgets by size."""
    common = ["download.allow_private_networks=true", "download.image_size=128"]
    if name == "datacomp_basic":
        # download_basic is DataComp's basic filter after a download; the row says so by name.
        return [*common, "name=datacomp_basic"]
    if name == "bootstrap":
        return [
            *common,
            f"bootstrap.samples_seen={size.samples_seen}",
            f"filter.clip_score_top_fraction.fraction={BOOTSTRAP_KEEP}",
        ]
    if name == "metaclip_balance":
        return [*common, f"balance.t={size.balance_t}"]
    return common


def _pool(folder: Path, size: DemoSize, seed: int, say: Callable[[str], None]) -> Path:
    """The pool at ``folder``: generated, or reused when an earlier demo left the same one."""
    if (folder / "manifest.json").is_file():
        meta = load_manifest(folder)
        wanted = (size.rows, seed, size.eval_size, DEMO_RATES.as_dict())
        if (meta["size"], meta["seed"], meta["eval_size"], meta["rates"]) == wanted:
            say(f"pool: {folder} (from an earlier run, {size.rows:,} pairs)")
            return folder
        raise ConfigError(
            f"{folder} holds another pool ({meta['size']:,} pairs, seed {meta['seed']}, "
            f"{meta['eval_size']} eval images, its own defect rates): remove it or choose "
            "another --output"
        )
    say(f"pool: generating {size.rows:,} pairs and {size.eval_size} eval images → {folder}")
    return generate_pool(
        folder, size=size.rows, seed=seed, eval_size=size.eval_size, rates=DEMO_RATES
    )


def run_demo(
    output: Path,
    size: str = "small",
    seed: int = 0,
    seeds: list[int] | None = None,
    engine: str = "ray",
    quiet: bool = False,
) -> list[dict]:
    """Run the whole demo into ``output``; return compare's rows (also in output/compare.json)."""
    if size not in SIZES:
        raise ConfigError(f"--size {size!r}: expected one of {', '.join(SIZES)}")
    spec, output = SIZES[size], Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a folder")
    config = TrainConfig(samples_seen=spec.samples_seen)
    # compare checks them too, but only after every run: bad seeds stop the demo here.
    chosen = checked_seeds(seeds or list(spec.seeds), config)
    with claim(output, "demo"):
        return _demo(output, spec, seed, chosen, config, engine, quiet)


def _demo(
    output: Path,
    spec: DemoSize,
    seed: int,
    chosen: list[int],
    config: TrainConfig,
    engine: str,
    quiet: bool,
) -> list[dict]:
    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    pool = _pool(output / "pool", spec, seed, say)
    recipes = [load_recipe(file, recipe_overrides(name, spec)) for name, file, _ in RECIPES]

    server, urls = serve_pool(pool)
    say(f"serving the pool at {server.base_url}")
    try:
        say("starting a local Ray cluster" if engine == "ray" else "running in this process")
        with cluster(engine):  # one cluster for the six runs (a caller's is left up)
            runs: list[Path] = []
            progress = False if quiet else None  # None: on when stderr is a terminal
            for (name, _, what), recipe in zip(RECIPES, recipes):
                say(f"\nrun {name}: {what}")
                # Every later run shares the first one's ingest and download: each url is
                # fetched once, and those runs' images are the first run's, not copies.
                base = runs[0] if runs else None
                result = _run(recipe, urls, output / "runs" / name, engine, say, progress, base)
                say(f"  kept {result.stages[-1].rows_out:,} of {result.stages[0].rows_out:,} rows")
                runs.append(result.run_dir)
    finally:
        server.stop()

    say(
        f"\ncompare: curate-tiny, {spec.samples_seen:,} samples seen per model, "
        f"seed{'s' if len(chosen) > 1 else ''} {' '.join(map(str, chosen))}"
    )
    rows = compare(runs, pool / "eval", config, output / "compare", chosen, progress=not quiet)
    for name in ("compare.json", "compare.md"):
        shutil.copyfile(output / "compare" / name, output / name)
    _write_index(output, rows)
    return rows


def _run(
    recipe, urls: Path, run_dir: Path, engine: str, say, progress: bool | None, base: Path | None
) -> RunResult:
    """One recipe, its report and its uids.npy, as ``curate run --from BASE`` leaves them."""

    def show(stage: StageResult) -> None:
        if stage.shared_from:
            done = f"shared with {Path(stage.shared_from).name}"
        else:
            done = "resumed" if stage.skipped else f"{stage.seconds:.1f} s"
        say(f"  {stage.name:<16} {stage.rows_out:>8,} rows  {done}")

    return run_recipe(recipe, urls, run_dir, engine=engine, on_stage=show, progress=progress,
                      finish=finisher(recipe), base=base)  # fmt: skip


def _write_index(output: Path, rows: list[dict]) -> None:
    """DIR/report.md: the comparison table and a link to every run's own report."""
    lines = ["# curate demo", "", compare_table(rows), "", "## Runs", ""]
    for name, file, what in RECIPES:
        run = Path("runs") / name
        lines.append(
            f"- **{name}** (`pipelines/{file}.yaml`): {what}. "
            f"[report]({run / 'report.md'}), [html]({run / 'report.html'})"
        )
    (output / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
