"""Same model, same compute, different data: train on each run's shards, evaluate, tabulate.

This is DataComp's protocol in miniature: the training recipe and the budget of
samples seen are fixed, so any difference in the table comes from the data each
curation run kept. Each run's shards train one checkpoint per seed into
``OUT/RUN/ckpt`` (``OUT/RUN/seed-S/ckpt`` with several seeds), which
``curate.train.evaluate`` scores on the tasks (the demo pool's ``POOL/eval``, or a
suite of real benchmarks); the rows go to ``OUT/compare.json`` and, as a
DataComp-style table with one column per task and their average, to
``OUT/compare.md``.

With several seeds a row holds the mean of each score and its sample standard
deviation (``scores_std``, ``average_std``): a gap between two runs means something
only when it is larger than the seed-to-seed spread.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import yaml

from curate.core.config import ConfigError
from curate.core.layout import LEDGER, RECIPE, SHARDS, count_rows, ledger_files
from curate.core.runfolder import check_shared, claim, remove_tree
from curate.io.eval_tasks import Task, read_tasks
from curate.train.evaluate import evaluate

if TYPE_CHECKING:
    from curate.train.trainer import TrainConfig

#: Metrics are fractions of at most a few thousand eval images: four decimals say all there is.
DIGITS = 4


def run_info(run: Path) -> dict:
    """Name, recipe, pool and kept rows of a ``curate run`` folder whose shards hold images."""
    run = Path(run)
    check_shared(run)
    shards = sorted((run / SHARDS).glob("shard-*.parquet"))
    if not shards:
        tars = sorted((run / SHARDS).glob("shard-*.tar"))
        hint = (
            " (its shards are webdataset tars: re-run it with --set shard.format=parquet)"
            if tars
            else " (a recipe with a download and a shard stage writes them)"
        )
        raise ConfigError(f"run {run}: no Parquet shards in {run / 'shards'}{hint}")
    if "image" not in pq.read_schema(shards[0]).names:
        raise ConfigError(
            f"run {run}: its shards hold no images (the recipe has no download stage); "
            "training needs them"
        )
    ledger = ledger_files(run / LEDGER)
    recipe_file = run / RECIPE
    if not ledger or not recipe_file.is_file():
        raise ConfigError(f"run {run}: not a `curate run` folder (no ledger/ or recipe.yaml)")
    kept = count_rows(shards)
    if kept == 0:
        raise ConfigError(f"run {run}: its shards hold no rows; there is nothing to train on")
    return {
        "run": run.resolve().name,
        "recipe": yaml.safe_load(recipe_file.read_text(encoding="utf-8")).get("name"),
        "pool": count_rows(ledger),
        "kept": kept,
    }


def _flatten(result: dict) -> dict:
    """One evaluation's numbers as a row holds them: each task's score, and their average."""
    tasks = result["tasks"].items()
    scores = {name: round(r["score"], DIGITS) for name, r in tasks}
    chance = {name: round(r["chance"], DIGITS) for name, r in tasks}
    return {"scores": scores, "average": round(result["average"], DIGITS), "chance": chance}


def _mean_and_spread(values: list[float]) -> tuple[float, float | None]:
    mean = round(float(np.mean(values)), DIGITS)
    return mean, (round(float(np.std(values, ddof=1)), DIGITS) if len(values) > 1 else None)


def _summarise(info: dict, seeds: list[int], tasks: list[Task], per_seed: list[dict]) -> dict:
    """A run's row: its facts, each score's mean over seeds and, with several, its spread."""
    row = {
        **info,
        "samples_seen": per_seed[0]["samples_seen"],
        "seeds": seeds,
        "train_seconds": round(float(np.mean([s["train_seconds"] for s in per_seed])), 1),
        "metric": {t.name: t.metric for t in tasks},
        "chance": per_seed[0]["chance"],
        "scores": {},
        "scores_std": {},
    }
    for task in tasks:
        values = [s["scores"][task.name] for s in per_seed]
        row["scores"][task.name], row["scores_std"][task.name] = _mean_and_spread(values)
    row["average"], row["average_std"] = _mean_and_spread([s["average"] for s in per_seed])
    row["per_seed"] = per_seed
    return row


def _train_and_evaluate(
    run: Path, out: Path, ckpt: Path, tasks: Path, config: TrainConfig, progress: bool
) -> dict:
    from curate.train.trainer import train

    # The trainer refuses to overwrite a checkpoint; a comparison run again trains afresh.
    remove_tree(ckpt, out)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    metrics = train(run / SHARDS, ckpt, config, progress=progress)
    result = evaluate(str(ckpt), tasks, device=config.device, progress=progress)
    (ckpt.parent / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return {
        "seed": config.seed,
        "checkpoint": str(ckpt),
        "samples_seen": metrics["samples_seen"],
        "train_seconds": metrics["seconds"],
        **_flatten(result),
    }


def checked_seeds(seeds: list[int] | None, config: TrainConfig) -> list[int]:
    """The seeds to train with (default ``config.seed``), each given once and each one the
    trainer takes: checked before anything runs, not when a later seed's turn comes."""
    seeds = list(seeds) if seeds else [config.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {' '.join(map(str, seeds))}: each seed once")
    for seed in seeds:
        replace(config, seed=seed).check()
    return seeds


def compare(
    runs: list[Path],
    tasks: Path,
    config: TrainConfig,
    out: Path,
    seeds: list[int] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train ``config`` on each run's shards (once per seed, default ``config.seed``), evaluate
    on ``tasks`` (a suite, a folder holding one, or one task), write ``out/compare.json`` and
    ``out/compare.md``; return the rows.

    Every run and task is checked before any training starts, so a typo in the last
    run name fails at once, not after the first runs have trained.
    """
    runs, out = [Path(r) for r in runs], Path(out)
    if not runs:
        raise ConfigError("compare needs at least one run folder")
    seeds = checked_seeds(seeds, config)
    chosen = read_tasks(Path(tasks))
    infos = [run_info(r) for r in runs]
    names = [i["run"] for i in infos]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"runs named {', '.join(twice)} twice: their checkpoints would collide")

    with claim(out, "compare"):  # created and marked: its checkpoints are curate's to replace
        rows = []
        for run, info in zip(runs, infos):
            per_seed = []
            for seed in seeds:
                folder = (
                    out / info["run"] if len(seeds) == 1 else out / info["run"] / f"seed-{seed}"
                )
                if progress:
                    print(f"compare: {info['run']}, seed {seed}", file=sys.stderr, flush=True)
                per_seed.append(
                    _train_and_evaluate(
                        run, out, folder / "ckpt", tasks, replace(config, seed=seed), progress
                    )
                )
            rows.append(_summarise(info, seeds, chosen, per_seed))

        (out / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "compare.md").write_text(compare_table(rows) + "\n")
    return rows


def _cell(mean: float, spread: float | None) -> str:
    return f"{mean:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def compare_table(rows: list[dict]) -> str:
    """The rows as a DataComp-style Markdown table: one column per task, then the average."""
    tasks = list(rows[0]["scores"])
    head = ["run", "recipe", "pool", "kept", "samples seen", *tasks, "average"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for row in rows:
        cells = [row["run"], row["recipe"] or "", f"{row['pool']:,}", f"{row['kept']:,}"]
        cells += [f"{row['samples_seen']:,}"]
        cells += [_cell(row["scores"][t], row["scores_std"][t]) for t in tasks]
        cells.append(_cell(row["average"], row["average_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = rows[0]["seeds"]
    spread = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    chance = rows[0]["chance"]
    metrics = ", ".join(f"{t} {m} (chance {chance[t]:.3f})" for t, m in rows[0]["metric"].items())
    lines += ["", f"Same model and budget for every run; {spread}. Metrics: {metrics}."]
    return "\n".join(lines)
