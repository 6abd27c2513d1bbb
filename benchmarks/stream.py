"""The streamed run system at scale, on the default model (SmolLM2 layer-15 MLP-out, H = 2 d):

- ``memory``: peak RSS of ``python -m sign_sae train`` (one subprocess per budget, ``wait4``)
  against the training-token budget, for one SAE and for a 10-SAE sweep; a budget within the
  text's train split sees every token once, a larger one takes epochs over a cache written on
  the first pass;
- ``train``: one SA-GSAE trained on the same tokens the old way (harvest to disk, load the split
  into memory, ``TensorBatches``) and streamed (``ActivationStream`` on the fly), interleaved
  rounds in one process: tokens/s end to end, forward included;
- ``sweep``: the wall time of a 10-SAE sweep (SA-GSAE H and Gated 2H x 5 sparsities) from one
  stream, from one stream per SAE (10 sequential runs, each paying the forward) and with SAELens's
  ``MultiSAETrainingRunner`` on the same token rows, side by side in one process.

    python -m benchmarks.stream memory --budgets 51200 204800 409600 1280000 5120000
    python -m benchmarks.stream train --budget 51200 --rounds 3
    python -m benchmarks.stream sweep --budget 102400
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from sae_lens import LoggingConfig, MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

from benchmarks.common import interleaved, machine, median, paired_ratio
from sign_sae.architectures import make_training_sae, training_config
from sign_sae.corpus import load_texts, tokenize
from sign_sae.harvest import harvest
from sign_sae.markdown import markdown_table
from sign_sae.models import load_model
from sign_sae.runs import Inputs, SweepConfig, run_plan
from sign_sae.stream import ActivationStream
from sign_sae.trainer import TensorBatches, TrainConfig, train

BATCH = 1024
SPARSITIES = [1.0, 2.0, 4.0, 8.0, 16.0]
TEXT_TOKENS = (
    1_280_000  # one pass over the Shakespeare train split (1.28M tokens) in 128-token rows
)


def run_file(
    out: Path, tokens: int, grid: str, saes_at_once: int = 0, forward: str = "bfloat16"
) -> str:
    """A one-hook run file that trains on ``tokens`` tokens (BOS left out), in epochs over a
    cache where they are more than the text has."""
    steps = max(1, tokens * 127 // 128 // BATCH)
    epochs = -(-tokens // TEXT_TOKENS)
    return f"""
out_dir: {out}
data: {{models: [smollm2-135m], hooks: [mlp_out], train_tokens: {min(tokens, TEXT_TOKENS)},
        eval_tokens: 256, ce_tokens: 256, forward_dtype: {forward}, saes_at_once: {saes_at_once},
        epochs: {epochs}, cache: {str(epochs > 1).lower()}}}
h_expansion: 2.0
train: {{total_steps: {steps}, batch_size: {BATCH}, log_every: 100}}
grid: {grid}
"""


ONE = "[{label: sa, arch: sa_gsae, sparsity: [4.0]}]"
TEN = (
    f"[{{label: sa, arch: sa_gsae, sparsity: {SPARSITIES}}}, "
    f"{{label: gated, arch: gated, width: 2, sparsity: {SPARSITIES}}}]"
)


def measure(text: str, folder: Path) -> tuple[float, float]:
    """(peak RSS in GB, wall seconds) of ``sign-sae train`` on a run file."""
    path = folder / "run.yaml"
    path.write_text(text)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sign_sae", "train", str(path)], stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"sign-sae train failed on {path}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - start


def memory(budgets: list[int], saes: list[int], forward: str) -> str:
    rows = []
    for tokens in budgets:
        for name, grid in (("1 SAE", ONE), ("10 SAEs", TEN)):
            if int(name.split()[0]) not in saes:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                text = run_file(Path(tmp) / "out", tokens, grid, forward=forward)
                gb, wall = measure(text, Path(tmp))
            rows.append([f"{tokens:,}", name, f"{gb:.2f}", f"{wall:.0f}"])
            print(rows[-1], flush=True)
    return markdown_table(["train tokens", "SAEs", "peak RSS (GB)", "wall (s)"], rows)


def sweep(tokens: int) -> str:
    """Wall time of the 10-SAE sweep three ways (one process, the model loaded once)."""

    model = load_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, at_once in (
            ("sign-sae, one stream for all 10", 0),
            ("sign-sae, one stream per SAE", 1),
        ):
            cfg = SweepConfig(**yaml_dict(run_file(Path(tmp) / name[-3:], tokens, TEN, at_once)))
            start = time.perf_counter()
            run_plan(cfg, Inputs(cfg.data, {"smollm2-135m": model}), evaluate=False, progress=False)
            rows.append([name, time.perf_counter() - start])
            print(rows[-1], flush=True)
        cfg = SweepConfig(**yaml_dict(run_file(Path(tmp) / "x", tokens, TEN)))
        train_tokens = Inputs(cfg.data).tokens(model, "train")
        hook = "blocks.15.hook_mlp_out"
        saes = {
            f"{arch}_{k:g}": training_config(arch, 576, 1152 * w, k)
            for arch, w in (("sa_gsae", 1), ("gated", 2))
            for k in SPARSITIES
        }
        runner_cfg = MultiSAETrainingRunnerConfig(
            saes=saes,
            hook_names=hook,
            model_name="smollm2-135m",
            context_size=128,
            streaming=False,
            training_tokens=cfg.train.total_steps * BATCH,
            train_batch_size_tokens=BATCH,
            store_batch_size_prompts=32,
            n_batches_in_buffer=8,
            seqpos_slice=(1, None),  # BOS left out, as sign-sae does
            prepend_bos=False,  # the rows start with BOS already
            autocast_lm=True,  # the bf16 forward sign-sae's run uses
            device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
            checkpoint_path=None,
            output_path=str(Path(tmp) / "saelens"),
        )
        dataset = Dataset.from_dict({"tokens": train_tokens.tolist()})
        runner = MultiSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model)
        start = time.perf_counter()
        runner.run()
        rows.append(["SAELens MultiSAETrainingRunner", time.perf_counter() - start])
        print(rows[-1], flush=True)
    base = rows[-1][1]
    return markdown_table(
        ["10-SAE sweep, training only", "wall (s)", "speed vs SAELens"],
        [[n, f"{w:.0f}", f"{base / w:.2f}x"] for n, w in rows],
    )


def train_speed(tokens: int, rounds: int) -> str:
    """Tokens/s of one SA-GSAE (H = 2 d, coefficient 4, one epoch of 1024-row batches) on the
    in-memory path and on the stream, both with the bf16 forward."""

    model = load_model()
    rows_in = tokenize(model, load_texts(split="train"), 128, tokens)
    hook, n = "blocks.15.hook_mlp_out", rows_in.shape[0] * 127
    cfg = TrainConfig(total_steps=n // BATCH, batch_size=BATCH, lr=3e-3)
    bf16 = torch.bfloat16

    def sae():
        torch.manual_seed(0)
        return make_training_sae("sa_gsae", 576, 1152, 4.0)

    def in_memory() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            acts = harvest(model, rows_in, [hook], Path(tmp), forward_dtype=bf16)[hook].load()
        train(sae(), TensorBatches(acts, BATCH), cfg, progress=False)

    def streamed() -> None:
        s = ActivationStream(model, rows_in, [hook], BATCH, forward_dtype=bf16)
        train(sae(), s.view(hook), cfg, progress=False)

    times = interleaved({"in memory": in_memory, "streamed": streamed}, rounds, torch.device("cpu"))
    table = [[name, f"{median(t):.1f}", f"{n / median(t):,.0f}"] for name, t in times.items()]
    ratio = paired_ratio(times["in memory"], times["streamed"])
    return markdown_table(["one SA-GSAE, forward included", "s (median)", "tokens/s"], table) + (
        f"\nstreamed vs in memory: {ratio:.2f}x ({rounds} interleaved rounds, {n:,} tokens)"
    )


def yaml_dict(text: str) -> dict:
    return yaml.safe_load(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument(
        "--budgets", type=int, nargs="+", default=[51_200, 204_800, 409_600, 1_280_000, 5_120_000]
    )
    m.add_argument("--saes", type=int, nargs="+", choices=[1, 10], default=[1, 10])
    # bf16 autocast is fast on CPUs with AVX-512 bf16 and slow where it is emulated (AVX2)
    m.add_argument("--forward-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    s = sub.add_parser("sweep")
    s.add_argument("--budget", type=int, default=102_400)
    t = sub.add_parser("train")
    t.add_argument("--budget", type=int, default=51_200)
    t.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(machine())
    if a.what == "memory":
        print(memory(a.budgets, a.saes, a.forward_dtype))
    elif a.what == "train":
        print(train_speed(a.budget, a.rounds))
    else:
        print(sweep(a.budget))


if __name__ == "__main__":
    main()
