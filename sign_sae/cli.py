"""``sign-sae``: the pipeline as commands, thin over the Python API in ``sign_sae.pipeline``."""

import argparse
import logging
import sys
from pathlib import Path

from sign_sae import pipeline

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


def cmd_export(args: argparse.Namespace) -> None:
    from sign_sae.export import export_run

    entry = export_run(args.run_dir, args.out_dir, args.release, doubled=args.doubled)
    print(f"Exported to {args.out_dir}; release entry: {entry}")


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
    x = sub.add_parser("export", help="write a run's SAEs as an SAELens release folder")
    x.add_argument("run_dir", help="a run folder (or one SAE folder)")
    x.add_argument("out_dir", help="where to write the release (cfg.json, weights, sparsity)")
    x.add_argument("--release", default=None, help="release name (default: the folder name)")
    x.add_argument(
        "--doubled", action="store_true", help="export as non-negative JumpReLU SAEs [D, -D]"
    )
    x.set_defaults(func=cmd_export)
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
