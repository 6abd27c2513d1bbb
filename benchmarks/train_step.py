"""Training-step throughput: SA-GSAE vs SAELens ``GatedTrainingSAE`` at equal and 2x width.

Every candidate runs the same full optimisation step (forward, backward, gradient clipping,
Adam) on the same batch, interleaved round by round. Ratios are medians of per-round ratios.

    python -m benchmarks.train_step                      # d_in 576, F 4608, batch 4096, fp32
    python -m benchmarks.train_step --rounds 9 --compile --bf16 --memory
"""

import argparse

import torch

from benchmarks.common import (
    interleaved,
    machine,
    median,
    paired_ratio,
    peak_rss_growth_mib,
    set_threads,
)
from benchmarks.steps import StepCase, make_step, saved_for_backward_mib
from sign_sae.markdown import markdown_table


def cases(width: int, compile_step: bool, bf16: bool) -> list[StepCase]:
    out = [
        StepCase("SA-GSAE fused", "sa_gsae", width),
        StepCase("SA-GSAE reference ops", "sa_gsae", width, fused=False),
        StepCase("SAELens Gated, F", "gated", width),
        StepCase("SAELens Gated, 2F", "gated", 2 * width),
    ]
    if compile_step:
        out.append(StepCase("SA-GSAE fused + compile", "sa_gsae", width, compile=True))
    if bf16:
        out.append(
            StepCase("SA-GSAE fused, bf16 autocast", "sa_gsae", width, autocast=torch.bfloat16)
        )
        out.append(
            StepCase("SAELens Gated, F, bf16 autocast", "gated", width, autocast=torch.bfloat16)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--width", type=int, default=4608, help="SA-GSAE width F")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--bf16", action="store_true", help="add bf16 autocast rows")
    parser.add_argument("--memory", action="store_true", help="peak RSS growth of one step")
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device("cpu")
    print(machine(device))
    print(f"d_in {args.d_in}, F {args.width}, batch {args.batch}, fp32 master weights")
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0))
    todo = cases(args.width, args.compile, args.bf16)
    steps = {c.label: make_step(c, x) for c in todo}
    times = interleaved(steps, args.rounds, device)
    base, base2 = times["SAELens Gated, F"], times["SAELens Gated, 2F"]
    rows = []
    for c in todo:
        t = times[c.label]
        row = [
            c.label,
            str(c.width),
            f"{median(t) * 1e3:.0f}",
            f"{args.batch / median(t):,.0f}",
            f"{paired_ratio(base, t):.2f}x",
            f"{paired_ratio(base2, t):.2f}x",
            f"{saved_for_backward_mib(c, x):.0f}",
        ]
        if args.memory:
            row.append(f"{peak_rss_growth_mib(steps[c.label]):.0f}")
        rows.append(row)
    header = [
        "step",
        "width",
        "ms/step (median)",
        "tokens/s",
        "speed vs Gated F",
        "speed vs Gated 2F",
        "saved for backward (MiB)",
    ]
    if args.memory:
        header.append("peak RSS growth of a step (MiB)")
    print(f"{args.rounds} interleaved rounds after 1 warm-up step each")
    print(markdown_table(header, rows))
    print(machine(device))


if __name__ == "__main__":
    main()
