"""``sign-sae``: the pipeline as commands, thin over the Python API in ``sign_sae.pipeline``."""

import argparse
import logging
import sys
from pathlib import Path

from sign_sae import distributed, pipeline

log = logging.getLogger("sign_sae")


def _config(arg: str) -> pipeline.RunConfig:
    """A config file, or a run folder holding config.json."""
    path = Path(arg)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No run config at {path}; pass a YAML/JSON file or a run folder.")
    return pipeline.RunConfig.load(path)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args.config)
    with distributed.session():  # data-parallel under torchrun; one process otherwise
        if not distributed.is_main():
            log.setLevel(logging.WARNING)  # rank 0 reports progress
        with distributed.main_first():  # rank 0 fills the activation cache, the others reuse it
            model, hook, acts, _ = pipeline.prepare(cfg)
        pipeline.train_saes(cfg, model, hook, acts, resume=args.resume)


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = _config(args.config)
    model, _, _, eval_tokens = pipeline.prepare(cfg)
    print(pipeline.format_table(pipeline.evaluate_run(cfg, model, eval_tokens)))


def cmd_demo(args: argparse.Namespace) -> None:
    cfg = pipeline.demo_config(args.out)
    model, hook, acts, eval_tokens = pipeline.prepare(cfg)
    pipeline.train_saes(cfg, model, hook, acts, resume=args.resume)
    rows = pipeline.evaluate_run(cfg, model, eval_tokens)
    print(f"\nHeld-out metrics ({cfg.model}, {hook}, {rows[0]['n_tokens']:,} tokens):\n")
    print(pipeline.format_table(rows))
    print(f"\nSAEs (SAELens format) are in {cfg.out_dir}/<name>/sae")
    from analyses.report import render  # the CLI is the one place that joins the two packages

    report = render(cfg.out_dir, Path(cfg.out_dir) / "report.html", model=model)
    print(f"Report (opens offline): {report}")


def cmd_report(args: argparse.Namespace) -> None:
    from analyses.report import render  # the CLI is the one place that joins the two packages

    path = render(
        args.run,
        args.out,
        latents=args.latents or None,
        n_latents=args.n_latents,
        n_tokens=args.tokens,
    )
    print(f"Report (opens offline): {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from sign_sae.export import export_run

    entry = export_run(args.run_dir, args.out_dir, args.release, doubled=args.doubled)
    print(f"Exported to {args.out_dir}; release entry: {entry}")


def cmd_sweep(args: argparse.Namespace) -> None:
    # The polarity columns come from the analyses package, which sits above sign_sae; the
    # command line is the one place that joins the two (sign_sae.sweep itself never imports it).
    from analyses.sweep import run
    from sign_sae.sweep import RESULTS_CSV, load_sweep

    cfg = load_sweep(args.sweep)
    if args.out:
        cfg.out_dir = args.out
    with distributed.session():  # under torchrun the runs are spread over the ranks
        rows = run(cfg, progress=sys.stderr.isatty() and distributed.is_main())
        if distributed.is_main():
            print(f"{len(rows)} runs in {Path(cfg.out_dir) / RESULTS_CSV}")


def cmd_frontier(args: argparse.Namespace) -> None:
    import json

    from analyses.sweep import write_plots
    from sign_sae import frontier
    from sign_sae.storage import atomic_write_text
    from sign_sae.sweep import read_results

    rows = read_results(args.results)
    result = frontier.analyse(rows, reference=args.reference, dead_floor=args.dead_floor)
    out = Path(args.out) if args.out else Path(args.results).parent
    text = frontier.format_markdown(result)
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
    t = sub.add_parser("train", help="harvest activations and train the SAEs of a run config")
    t.add_argument("config", help="run config (YAML/JSON) or a run folder")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run's SAEs on held-out text")
    e.add_argument("config", help="run config (YAML/JSON) or a run folder")
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="half-width SA-GSAE vs full-width Gated on SmolLM2, offline")
    d.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    d.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("report", help="write a self-contained HTML report of a run (opens offline)")
    r.add_argument("run", help="run folder")
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
    s = sub.add_parser("sweep", help="train and evaluate a grid of SAEs into one results table")
    s.add_argument("sweep", help="a sweep YAML file or a profile name (cpu, paper, gpu-smoke)")
    s.add_argument("--out", default=None, help="output folder (default: the file's out_dir)")
    s.set_defaults(func=cmd_sweep)
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sign-sae: error: {e}", file=sys.stderr)
        return 2
    return 0
