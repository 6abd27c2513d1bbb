"""Thread settings on a shared CPU: OpenMP wait policy x intra-op threads, on the model forward.

Each setting runs in its own process (``OMP_WAIT_POLICY`` is read when torch loads), one after
the other, ``--rounds`` forwards of SmolLM2-135M on 8 x 128 tokens each after a warm-up; the table
gives the median seconds per forward and the load average at the end of each process. Run it
twice when the load may change, or with the other processes paused for a quiet figure.

    python -m benchmarks.threads
    python -m benchmarks.threads --rounds 8
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch  # before sign_sae, which would otherwise set OMP_WAIT_POLICY=PASSIVE when unset

from sign_sae.markdown import markdown_table

# "unset" is OpenMP's own default (threads spin a while before they sleep); sign_sae sets
# PASSIVE when it is imported before torch, as by the sign-sae command
SETTINGS = [("unset", 1), ("unset", 2), ("PASSIVE", 1), ("PASSIVE", 2)]


def forward_times(threads: int, rounds: int) -> list[float]:
    """Seconds per forward in this process."""
    from sign_sae.corpus import load_texts, tokenize
    from sign_sae.models import load_model

    torch.set_num_threads(threads)
    model = load_model()
    tokens = tokenize(model, load_texts(split="train"), 128, 8 * 128)
    times = []
    with torch.inference_mode():
        model(tokens)
        for _ in range(rounds):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        times = forward_times(*args.child)
        print(f"{statistics.median(times):.2f} {os.getloadavg()[0]:.1f}")
        return
    rows = []
    for policy, threads in SETTINGS:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.threads", "--child", str(threads), str(args.rounds)],
            env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            | ({} if policy == "unset" else {"OMP_WAIT_POLICY": policy}),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        rows.append([policy, threads, out[-2], out[-1]])
    head = ["OMP_WAIT_POLICY", "threads", "s per forward (median)", "load average (1 min)"]
    print(f"SmolLM2-135M forward, 8 x 128 tokens, {args.rounds} rounds per setting")
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()
