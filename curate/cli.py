"""The ``curate`` command: a thin wrapper over the library functions."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from curate.core.config import ConfigError
from curate.core.layout import LEDGER
from curate.core.runfolder import RunFolderError
from curate.io.readers import IngestError


def _run(args: argparse.Namespace) -> int:
    from curate.core.layout import UIDS
    from curate.core.recipe import load_recipe
    from curate.core.runfolder import claim
    from curate.report.build import download_table, finisher, funnel_table
    from curate.runner import StageResult, run_recipe

    overrides = list(args.set)
    if args.input_uids:
        if not Path(args.input_uids).is_file():
            raise ConfigError(f"--input-uids {args.input_uids}: no such file")
        overrides.append(f"ingest.uids={json.dumps(str(Path(args.input_uids).resolve()))}")
    recipe = load_recipe(args.recipe, overrides)
    if not Path(args.input).exists():
        raise ConfigError(f"--input {args.input}: no such file or folder")

    def show(result: StageResult) -> None:
        if args.quiet:
            return
        if result.skipped:
            done = f"shared with {result.shared_from}" if result.shared_from else "done earlier"
            print(f"  {result.name:<16} {done}, skipped ({result.rows_out:,} rows)", flush=True)
        else:
            rate = result.rows_in / result.seconds if result.seconds and result.rows_in else 0
            print(
                f"  {result.name:<16} {result.rows_out:>12,} rows  {result.seconds:7.2f} s"
                + (f"  {rate:,.0f} rows/s" if rate else ""),
                flush=True,
            )

    # Held from the first stage to the last file: the report and uids.npy describe this run.
    with claim(Path(args.output), "run", Path(args.input)):
        if not args.quiet:
            print(f"curate run {recipe.name} → {args.output}", flush=True)
        result = run_recipe(
            recipe,
            Path(args.input),
            Path(args.output),
            engine=args.engine,
            address=args.address,
            verbose=args.verbose,
            on_stage=show,
            progress=False if args.quiet else None,  # None: a line per stage on a terminal
            finish=finisher(recipe),
            base=None if args.base is None else Path(args.base),
        )
        report, kept = result.finished
    if not args.quiet:
        print()
        print(funnel_table(report))
        if report["download"]:
            print()
            print(download_table(report["download"]))
        print(f"\nledger: {result.run_dir / 'ledger'}   report: {result.run_dir / 'report.html'}")
        print(f"kept uids (DataComp format): {result.run_dir / UIDS} ({kept:,})")
    return 0


def _export_uids(args: argparse.Namespace) -> int:
    from curate.core.layout import UIDS, ledger_files
    from curate.core.runfolder import check_shared, claim
    from curate.io.submission import kept_uids, write_uids

    check_shared(Path(args.run))
    ledger = Path(args.run) / LEDGER
    files = ledger_files(ledger)
    if not files:
        raise ConfigError(f"{args.run}: no ledger/ (is it a run folder?)")
    out = Path(args.output) if args.output else Path(args.run) / UIDS
    with claim(Path(args.run), "run"):  # not while a run rewrites its ledger
        kept = write_uids(kept_uids(files), out)
    print(f"{kept:,} kept uids → {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from curate.report.inspection import inspect_run

    print(inspect_run(Path(args.run), args.examples))
    return 0


def _report(args: argparse.Namespace) -> int:
    from curate.report.build import funnel_table, report_run

    report = report_run(Path(args.run))
    print(funnel_table(report))
    run = Path(args.run)
    print(f"\nreport: {run / 'report.md'}   {run / 'report.html'}   figures: {run / 'report'}")
    return 0


def _export_embeddings(args: argparse.Namespace) -> int:
    from curate.clip.export import export_embeddings

    written = export_embeddings(Path(args.run), Path(args.output), args.prefix)
    rows = sum(_rows(p) for p in written)
    print(f"{len(written)} parquet + npz pairs, {rows:,} rows → {args.output}")
    return 0


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _demo_generate(args: argparse.Namespace) -> int:
    from curate.demo import defect_counts, generate_pool, load_manifest

    def show(done: int, total: int) -> None:
        print(f"\r  images {done:,}/{total:,}", end="\n" if done == total else "", flush=True)

    print(f"curate demo-pool: {args.size:,} pairs, seed {args.seed} → {args.output}", flush=True)
    pool = generate_pool(
        Path(args.output),
        size=args.size,
        seed=args.seed,
        eval_size=args.eval_size,
        progress=show,
    )
    print(f"\n{'defect':<16} {'rows':>8}")
    for name, count in defect_counts(load_manifest(pool)).items():
        print(f"{name:<16} {count:>8,}")
    print(f"\nground truth: {pool / 'manifest.json'}   eval tasks: {pool / 'eval'}")
    return 0


def _demo_serve(args: argparse.Namespace) -> int:
    import time

    from curate.demo import serve_pool

    server, urls = serve_pool(Path(args.pool), port=args.port)
    print(f"serving {args.pool} at {server.base_url}  (Ctrl-C stops)")
    print(f"url list: {urls}")
    print(
        f"try:     curate run pipelines/download_basic.yaml --input {urls} --output runs/demo"
        " --set download.allow_private_networks=true",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from curate.train.compare import compare_table
    from curate.walkthrough import run_demo

    output = Path(args.output)
    rows = run_demo(output, args.size, seeds=args.seeds, engine=args.engine, quiet=args.quiet)
    print()
    print(compare_table(rows))
    print(
        f"\nreport: {output / 'report.md'}   (each run's: {output / 'runs' / '*' / 'report.html'})"
    )
    print(f"rows:   {output / 'compare.json'}")
    return 0


def _train_config(args: argparse.Namespace):
    """The TrainConfig the train and compare flags describe (unset flags keep its defaults)."""
    from curate.train.trainer import TrainConfig, model_name

    names = ("samples_seen", "loss", "seed", "batch_size", "lr", "warmup", "workers", "device",
             "jpeg_draft", "decode")  # fmt: skip
    given = {name: getattr(args, name) for name in (*names, "precision") if hasattr(args, name)}
    given["model"] = model_name(args.config)
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def _train(args: argparse.Namespace) -> int:
    from curate.train.trainer import train

    config = _train_config(args)
    print(
        f"curate train: {config.model}, {config.loss} loss, {config.samples_seen:,} samples seen"
        f" (batch {config.batch_size}, seed {config.seed}) → {args.out}",
        flush=True,
    )
    metrics = train(Path(args.shards), Path(args.out), config, progress=sys.stderr.isatty())
    print(
        f"{metrics['steps']:,} steps on {metrics['rows']:,} rows ({metrics['epochs']:g} epochs)"
        f" in {metrics['seconds']:.1f} s, {metrics['samples_per_second']:,.1f} samples/s on"
        f" {metrics['device']}; final loss {metrics['final_loss']:.4f}"
    )
    print(f"checkpoint: {args.out}   (clip stage: --set clip.model={args.out})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from curate.train.evaluate import check_checkpoint, eval_table, evaluate

    if args.ckpt:
        check_checkpoint(Path(args.ckpt))
    model = args.ckpt or args.model
    result = evaluate(
        model, Path(args.tasks), args.pretrained, args.device, args.batch_size, progress=True
    )
    weights = f" ({args.pretrained})" if args.pretrained else ""
    print(f"curate eval: {model}{weights} on {args.tasks}\n")
    print(eval_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresults: {args.json}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from curate.train.compare import compare, compare_table

    config = _train_config(args)
    runs = [Path(r) for r in args.runs]
    names = ", ".join(r.resolve().name for r in runs)
    seeds = " ".join(str(s) for s in args.seeds or [config.seed])
    print(
        f"curate compare: {names}; {config.model}, {config.loss} loss,"
        f" {config.samples_seen:,} samples seen, seeds {seeds} → {args.out}",
        flush=True,
    )
    rows = compare(runs, Path(args.tasks), config, Path(args.out), args.seeds, progress=True)
    print()
    print(compare_table(rows))
    print(f"\ntable: {Path(args.out) / 'compare.md'}   rows: {Path(args.out) / 'compare.json'}")
    return 0


TASKS_HELP = (
    "a suite YAML (a list of tasks), a folder holding suite.yaml (e.g. POOL/eval), "
    "or one task: a webdataset or ImageNet-style folder, or a retrieval .parquet/.csv"
)
DECODE_HELP = "where JPEGs are decoded: gpu (nvJPEG on the training GPU), cpu; auto: gpu on CUDA"
JPEG_DRAFT_HELP = (
    "workers decode JPEGs at a reduced DCT scale, still at least the model's input size: "
    "several times less decoding for large images, slightly softer crops"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe on a pool of (url, caption) pairs")
    run.add_argument("recipe", help="a recipe file, or a name in pipelines/ (e.g. datacomp_basic)")
    run.add_argument(
        "--input", required=True, help="Parquet/CSV/JSONL file or folder, or DataComp metadata"
    )
    run.add_argument("--output", required=True, help="the run folder (re-running resumes it)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. filter.image_size.min_side=150",
    )
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)",
    )
    run.add_argument(
        "--engine",
        choices=["ray", "local"],
        default="ray",
        help="ray (default) or local: the same batch functions in this process",
    )
    run.add_argument(
        "--from",
        dest="base",
        default=None,
        metavar="BASE_RUN",
        help="share the finished stages of this run folder that the recipe would compute the "
        "same way (same input, same parameters up to them): downloads and embeddings are "
        "linked, not redone; BASE_RUN is only read",
    )
    run.add_argument(
        "--input-uids",
        default=None,
        metavar="UIDS.npy",
        help="restrict the run to a DataComp subset (sorted u8,u8 uids); other rows are dropped",
    )
    noise = run.add_mutually_exclusive_group()
    noise.add_argument(
        "--quiet", action="store_true", help="print nothing but errors (no progress, no summary)"
    )
    noise.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's logs and Ray Data's progress bars; progress lines even in a log",
    )
    run.set_defaults(func=_run)

    uids = sub.add_parser("export-uids", help="write a run's kept uids as DataComp's uids.npy")
    uids.add_argument("run", help="a run folder")
    uids.add_argument("--output", default=None, help="the .npy file (default: RUN/uids.npy)")
    uids.set_defaults(func=_export_uids)

    insp = sub.add_parser("inspect", help="print a run's funnel and examples per drop reason")
    insp.add_argument("run", help="a run folder")
    insp.add_argument("--examples", type=int, default=3, help="examples per reason (default 3)")
    insp.set_defaults(func=_inspect)

    rep = sub.add_parser(
        "report", help="write a run's report again (report.json, report.md + PNGs, report.html)"
    )
    rep.add_argument("run", help="a run folder")
    rep.set_defaults(func=_report)

    export = sub.add_parser(
        "export-embeddings", help="write a run's embeddings as DataComp parquet + .npz pairs"
    )
    export.add_argument("run", help="a run folder with embeddings/ (a recipe with a clip stage)")
    export.add_argument("--output", required=True, help="folder for the parquet + npz files")
    export.add_argument(
        "--prefix",
        default=None,
        help="array names PREFIX_img / PREFIX_txt (default: b32 / l14 for DataComp's models)",
    )
    export.set_defaults(func=_export_embeddings)

    train = sub.add_parser(
        "train", help="train a small CLIP model on a run's shards for a fixed samples-seen budget"
    )
    train.add_argument("--shards", required=True, help="a run's shards/ folder (or the run folder)")
    train.add_argument("--out", required=True, help="a new folder for the checkpoint")
    train.add_argument(
        "--config",
        default="tiny",
        help="model: tiny (curate-tiny) or any open_clip architecture, e.g. ViT-B-32",
    )
    train.add_argument("--samples-seen", type=int, default=None, help="budget (default 20000)")
    train.add_argument("--loss", choices=["clip", "siglip"], default=None, help="default clip")
    train.add_argument("--seed", type=int, default=None, help="default 0")
    train.add_argument("--batch-size", type=int, default=None, help="default 64")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    train.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 50)")
    train.add_argument("--workers", type=int, default=None, help="data workers (default 2)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    train.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                       help="autocast on CUDA (default bf16); CPU is fp32")  # fmt: skip
    train.add_argument("--jpeg-draft", action="store_true", default=None, help=JPEG_DRAFT_HELP)
    train.add_argument("--decode", choices=["auto", "cpu", "gpu"], default=None, help=DECODE_HELP)
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval", help="zero-shot classification and retrieval of a model on evaluation tasks"
    )
    which = ev.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a checkpoint folder (`curate train` writes one)")
    which.add_argument("--model", help="an open_clip architecture, e.g. ViT-B-32")
    ev.add_argument("--pretrained", help="with --model: a pretrained tag or a local weights file")
    ev.add_argument("--tasks", required=True, help=TASKS_HELP)
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    ev.set_defaults(func=_eval)

    cmp = sub.add_parser(
        "compare", help="train the same model with the same budget on each run's shards; tabulate"
    )
    cmp.add_argument("runs", nargs="+", help="run folders whose shards hold images")
    cmp.add_argument("--tasks", required=True, help=TASKS_HELP)
    cmp.add_argument("--out", required=True, help="folder for checkpoints, compare.md and .json")
    cmp.add_argument("--config", default="tiny", help="model: tiny or an open_clip name")
    cmp.add_argument("--samples-seen", type=int, default=None, help="budget (default 20000)")
    cmp.add_argument("--loss", choices=["clip", "siglip"], default=None, help="default clip")
    seed = cmp.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, default=None, help="default 0")
    seed.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="one model per seed: mean ± std"
    )
    cmp.add_argument("--batch-size", type=int, default=None, help="default 64")
    cmp.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    cmp.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 50)")
    cmp.add_argument("--workers", type=int, default=None, help="data workers (default 2)")
    cmp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    cmp.add_argument("--jpeg-draft", action="store_true", default=None, help=JPEG_DRAFT_HELP)
    cmp.add_argument("--decode", choices=["auto", "cpu", "gpu"], default=None, help=DECODE_HELP)
    cmp.set_defaults(func=_compare)

    walk = sub.add_parser(
        "demo",
        help="the whole job on the bundled pool: generate, serve, six recipes, compare (~10 min)",
    )
    walk.add_argument(
        "--output", default="runs/demo", help="folder for everything (default runs/demo)"
    )
    walk.add_argument(
        "--size",
        choices=["tiny", "small", "medium", "large"],
        default="small",
        help="small: 2,000 pairs, 6,000 samples per model, ~10 min on 2 cores (default); "
        "medium: 5,000 pairs, 20,000 samples, 3 seeds; large: 20,000 pairs, 60,000 samples",
    )
    walk.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="seeds of the compared models"
    )
    walk.add_argument("--engine", choices=["ray", "local"], default="ray", help="default ray")
    walk.add_argument("--quiet", action="store_true", help="print the table only")
    walk.set_defaults(func=_demo)

    demo = sub.add_parser("demo-pool", help="the bundled synthetic web pool: generate, serve")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    gen = demo_sub.add_parser("generate", help="write a pool with known defects and an eval set")
    gen.add_argument("--output", required=True, help="a new folder for the pool")
    gen.add_argument("--size", type=int, default=20_000, help="pairs (default 20000)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    gen.add_argument("--eval-size", type=int, default=480, help="eval images (default 480)")
    gen.set_defaults(func=_demo_generate)
    serve = demo_sub.add_parser("serve", help="serve a pool on 127.0.0.1 and write its url list")
    serve.add_argument("pool", help="a folder written by `curate demo-pool generate`")
    serve.add_argument(
        "--port",
        type=int,
        default=None,
        help="default: the port the pool was last served on if free (its urls stay the same), "
        "else a free one",
    )
    serve.set_defaults(func=_demo_serve)
    return parser


#: What to do about an OS error, by errno; the message always names the path.
OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, then run the same command to resume",
    errno.EDQUOT: "the disk quota is used up: free some space, then run the same command",
    errno.EROFS: "that file system is read-only: choose another folder",
    errno.EACCES: "permission denied: check the folder's permissions or choose another",
    errno.EPERM: "not permitted: check the folder's permissions or choose another",
    errno.ENOTDIR: "a part of that path is a file where a folder is expected",
    errno.EISDIR: "that path is a folder where a file is expected",
    errno.EEXIST: "already exists, where curate expected nothing or a folder",
    errno.ELOOP: "that path is a loop of symbolic links",
}


def error_line(exc: BaseException) -> str:
    """One line for the user: the path and what to do for OS errors, the message otherwise."""
    if isinstance(exc, OSError) and exc.errno is not None:
        path = exc.filename or ""
        where = f"{path}: " if path else ""
        advice = OS_ADVICE.get(exc.errno, exc.strerror or str(exc))
        return f"{where}{advice}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, IngestError, RunFolderError, OSError) as exc:
        print(f"curate: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncurate: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
