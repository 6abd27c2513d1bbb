"""``sign-sae``: the run system as commands, thin over the Python API in ``sign_sae.runs``.

``train``, ``eval``, ``sweep`` and ``demo`` all read one sweep file (or a run folder, or a
profile name): ``train`` trains its runs, ``eval`` evaluates the trained ones, ``sweep`` does
both with the polarity columns, ``demo`` is ``sweep demo`` followed by the HTML report.
"""

import argparse
import errno
import logging
import sys
from pathlib import Path

from sign_sae import distributed, runs
from sign_sae.corpus import HELD_OUT
from sign_sae.errors import SignSAEError
from sign_sae.storage import write_refused

log = logging.getLogger("sign_sae")


def _load(args: argparse.Namespace) -> runs.SweepConfig:
    cfg = runs.load_sweep(args.config)
    if getattr(args, "out", None):
        cfg.out_dir = args.out
    if getattr(args, "split", None):
        cfg.data.eval_split = args.split
    return cfg


def _progress() -> bool:
    return sys.stderr.isatty() and distributed.is_main()


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _load(args)
    with distributed.session():  # each run data-parallel under torchrun; one process otherwise
        if not distributed.is_main():
            log.setLevel(logging.WARNING)  # rank 0 reports progress
        runs.train_runs(cfg, progress=_progress())


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = _load(args)
    rows = runs.evaluate_runs(cfg)  # runs already in the results table are not evaluated again
    rows = [r for r in rows if runs.row_split(r) == cfg.data.eval_split]
    where = Path(cfg.out_dir) / runs.RESULTS_CSV
    print(f"\n{cfg.data.eval_split} metrics of {len(rows)} runs ({where}):\n")
    print(runs.format_table(rows))


def cmd_demo(args: argparse.Namespace) -> None:
    # The polarity columns and the report come from the analyses package, which sits above
    # sign_sae; the command line is the one place that joins the two.
    from analyses.report import ReportOptions, render
    from analyses.sweep import run
    from sign_sae.models import load_model

    cfg = runs.load_sweep("demo")
    cfg.out_dir = args.out
    name = cfg.data.models[0].name
    model = load_model(name, device=cfg.data.device)
    rows = run(cfg, runs.Inputs(cfg.data, {name: model}), progress=_progress())
    print(f"\nHeld-out metrics ({name}, {rows[0]['hook']}, {rows[0]['n_tokens']:,} tokens):\n")
    print(runs.format_table(rows))
    print(f"\nSAEs (SAELens format) are in {cfg.out_dir}/runs/<model>/<hook>/<run>/sae")
    report = render(cfg.out_dir, Path(cfg.out_dir) / "report.html", ReportOptions(model=model))
    print(f"Report (opens offline): {report}")


def cmd_report(args: argparse.Namespace) -> None:
    # the CLI is the one place that joins the two packages
    from analyses.report import ReportOptions, render, render_release

    if (args.run is None) == (args.release is None):
        raise SignSAEError("Give a run folder or --release NAME (one of the two).")
    options = ReportOptions(
        saes=(args.sae_id or None) if args.release is not None else None,
        latents=args.latents or None,
        n_latents=args.n_latents,
        n_tokens=args.tokens,
    )
    if args.release is not None:
        path = render_release(args.release, args.out, options)
    else:
        path = render(args.run, args.out, options)
    print(f"Report (opens offline): {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from sign_sae.export import export_run

    entry = export_run(args.run_dir, args.out_dir, args.release, doubled=args.doubled)
    print(f"Exported to {args.out_dir}; release entry: {entry}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from analyses.sweep import run  # the polarity columns (the CLI joins the two packages)

    cfg = _load(args)
    with distributed.session():  # under torchrun each group of runs trains data-parallel
        rows = run(cfg, progress=_progress())
        if distributed.is_main():
            print(f"{len(rows)} runs in {Path(cfg.out_dir) / runs.RESULTS_CSV}")


def cmd_frontier(args: argparse.Namespace) -> None:
    import json

    from analyses import frontier, tables  # the CLI is the one place that joins the two packages
    from analyses.frontier_plots import write_plots
    from sign_sae.storage import atomic_write_text

    rows = runs.read_results(args.results)
    result = frontier.analyse(rows, reference=args.reference, dead_floor=args.dead_floor)
    out = Path(args.out) if args.out else Path(args.results).parent
    text = tables.format_markdown(result)
    atomic_write_text(out / "frontier.md", text)
    atomic_write_text(out / "frontier.json", json.dumps(frontier.to_json(result), indent=1))
    write_plots(result, out)
    print(text, end="")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sign-sae", description="Sign-aware gated sparse autoencoders: train and analyse."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    source = "a sweep file (YAML), a run folder or a profile name (demo, cpu, paper, gpu-smoke)"
    views = (
        ("train", cmd_train, "harvest activations and train every run of a sweep file"),
        ("eval", cmd_eval, "evaluate the trained runs of a sweep file on held-out text"),
        ("sweep", cmd_sweep, "train and evaluate every run of a sweep file, resumably"),
    )
    file_help = (
        "A sweep file is YAML with data (models, hooks, text, token budgets), train (the "
        "TrainConfig) and grid (labelled runs: arch, width, sparsity, seeds, options); "
        "examples/run.yaml in the repository explains every key, sign_sae/profiles/ holds the "
        "profiles. Every key is checked before any model loads."
    )
    for name, func, help_text in views:  # the run system's views share one signature
        v = sub.add_parser(name, help=help_text, description=f"{help_text}.", epilog=file_help)
        v.add_argument("config", help=source)
        v.add_argument("--out", default=None, help="output folder (default: the file's out_dir)")
        if name != "train":
            v.add_argument(
                "--split",
                choices=HELD_OUT,
                default=None,
                help="held-out split to evaluate on (default: the file's data.eval_split, "
                "validation); choose on validation, report test",
            )
        v.set_defaults(func=func)
    d = sub.add_parser("demo", help="half-width SA-GSAE vs full-width Gated on SmolLM2, offline")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("report", help="write a self-contained HTML report of a run (opens offline)")
    r.add_argument("run", nargs="?", help="run folder")
    r.add_argument("--release", help="a registered release instead, e.g. sign-sae-smollm2-135m")
    r.add_argument("--sae-id", nargs="*", help="SAE ids of the release (default: all)")
    r.add_argument("-o", "--out", default="report.html", help="output file (default: report.html)")
    r.add_argument("--latents", type=int, nargs="*", help="latent ids (default: most bipolar)")
    r.add_argument("--n-latents", type=int, default=4, help="dashboards per SAE (default: 4)")
    r.add_argument("--tokens", type=int, default=8192, help="held-out tokens to analyse")
    r.set_defaults(func=cmd_report)
    x = sub.add_parser("export", help="write a run's SAEs as an SAELens release folder")
    x.add_argument("run_dir", help="a run folder (or one SAE folder)")
    x.add_argument("out_dir", help="where to write the release (cfg.json, weights, sparsity)")
    x.add_argument("--release", default=None, help="release name (default: the folder name)")
    x.add_argument(
        "--doubled", action="store_true", help="export as non-negative JumpReLU SAEs [D, -D]"
    )
    x.set_defaults(func=cmd_export)
    f = sub.add_parser("frontier", help="the paper's comparisons from a sweep's results table")
    f.add_argument("results", help="results.csv or results.json of a sweep")
    f.add_argument("--reference", default="sa_gsae_H", help="label compared against the rest")
    f.add_argument(
        "--dead-floor",
        type=float,
        default=None,
        help="floor for a zero dead fraction in ratios (default: 0.5 / the wider d_sae)",
    )
    f.add_argument("--out", default=None, help="where frontier.md/.json and SVGs go")
    f.set_defaults(func=cmd_frontier)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our INFO lines (stage timings); other libraries' only from WARNING up, unless --verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("sign_sae", "analyses"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except (SignSAEError, OSError) as e:  # a user's mistake: one line; bugs keep traces
        if (
            isinstance(e, OSError)
            and not isinstance(e, FileNotFoundError | PermissionError)
            and e.errno not in _USER_ERRNOS
        ):
            raise
        print(f"sign-sae: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


# Failures of the machine or the files the user gave, not of the code: disk full, over quota,
# read-only, no permission, a file where a folder should be (or the other way), missing files.
_USER_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
}


def _one_line(e: BaseException) -> str:
    # a full disk, quota or read-only file system met outside sign_sae's writers (which raise a
    # SignSAEError for them) gets the same words; a refused read keeps its own
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return write_refused(e, e.filename or "a file") or str(e)
    return " ".join(str(e).split())
