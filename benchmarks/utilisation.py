"""Achieved GFLOP/s of the SA-GSAE training step against the measured matmul rate.

The step does 8 matmuls of 2 B d F FLOPs (16 d F per token, ``sign_sae.fused``). The limit is
the best median rate of ``torch.mm`` over the step's own operand shapes and a square product,
timed in the same rounds as the step (interleaved).

    python -m benchmarks.utilisation                  # CPU, d_in 576, F 4608, batch 4096, fp32
    python -m benchmarks.utilisation --compile --rounds 7
    python -m benchmarks.utilisation --device cuda --d-in 2048 --width 16384 --bf16 --compile
"""

import argparse

import torch

from benchmarks.common import (
    STEP_MATMULS,
    interleaved,
    machine,
    matmuls,
    median,
    set_threads,
)
from benchmarks.steps import StepCase, make_step, step_flops
from sign_sae.markdown import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--square", type=int, default=4096, help="side of the square matmul")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="fuse the element-wise passes")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (matmul limit in bf16)")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(machine(device))
    precision = "bf16 autocast" if args.bf16 else "fp32"
    autocast = dtype if args.bf16 else None
    cases = [
        StepCase(f"SA-GSAE step ({precision}, eager)", "sa_gsae", args.width, autocast=autocast)
    ]
    if args.compile:
        label = f"SA-GSAE step ({precision}, compiled)"
        cases.append(StepCase(label, "sa_gsae", args.width, compile=True, autocast=autocast))
    x = torch.randn(args.batch, args.d_in, device=device)
    mms = matmuls(args.batch, args.d_in, args.width, args.square, dtype, device)
    candidates = {c.label: make_step(c, x) for c in cases}
    candidates.update({k: fn for k, (_, fn) in mms.items()})
    times = interleaved(candidates, args.rounds, device, warm_up=2 if args.compile else 1)
    rates = {k: flops / median(times[k]) / 1e9 for k, (flops, _) in mms.items()}
    peak_name = max(rates, key=rates.get)
    rows = [[k, f"{median(times[k]) * 1e3:.1f}", f"{rates[k]:.1f}", ""] for k in mms]
    for c in cases:
        step_s = median(times[c.label])
        achieved = step_flops(args.d_in, args.width, args.batch) / step_s / 1e9
        share = f"{achieved / rates[peak_name]:.0%} of the best matmul ({peak_name.split('  ')[0]})"
        rows.append([c.label, f"{step_s * 1e3:.1f}", f"{achieved:.1f}", share])
    counts = dict(zip(list(mms)[:5], STEP_MATMULS, strict=True))
    mm_only = sum(n * median(times[k]) for k, n in counts.items())
    print(f"d_in {args.d_in}, F {args.width}, batch {args.batch}; {args.rounds} interleaved rounds")
    print(markdown_table(["candidate", "ms (median)", "GFLOP/s", "utilisation"], rows))
    print(
        f"The step's 8 matmuls alone, at the rates above, take {mm_only * 1e3:.0f} ms; "
        "the rest of a step is element-wise work, the optimiser and Python."
    )
    print(machine(device))


if __name__ == "__main__":
    main()
