"""The streamed run system at scale: peak memory against the token budget, and a sweep's wall
time from one stream against one stream per SAE.

Each measurement is one ``python -m sign_sae train`` subprocess on the default model (SmolLM2
layer-15 MLP-out, SA-GSAE at H = 2 d) whose peak RSS comes from ``wait4``; the training
batches (1024 rows) and steps grow with the budget so every token is seen once.

    python -m benchmarks.stream memory --budgets 51200 204800 409600 1280000
    python -m benchmarks.stream sweep --budget 102400
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from sign_sae.markdown import markdown_table

BATCH = 1024
SPARSITIES = [1.0, 2.0, 4.0, 8.0, 16.0]


def run_file(out: Path, tokens: int, grid: str, saes_at_once: int = 0) -> str:
    steps = max(1, tokens * 127 // 128 // BATCH)
    return f"""
out_dir: {out}
data: {{models: [smollm2-135m], hooks: [mlp_out], train_tokens: {tokens}, eval_tokens: 256,
        ce_tokens: 256, forward_dtype: bfloat16, saes_at_once: {saes_at_once}}}
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


def memory(budgets: list[int]) -> str:
    rows = []
    for tokens in budgets:
        for name, grid in (("1 SAE", ONE), ("10 SAEs", TEN)):
            with tempfile.TemporaryDirectory() as tmp:
                gb, wall = measure(run_file(Path(tmp) / "out", tokens, grid), Path(tmp))
            rows.append([f"{tokens:,}", name, f"{gb:.2f}", f"{wall:.0f}"])
            print(rows[-1], flush=True)
    return markdown_table(["train tokens", "SAEs", "peak RSS (GB)", "wall (s)"], rows)


def sweep(tokens: int) -> str:
    rows = []
    for name, at_once in (("one stream for all 10", 0), ("one stream per SAE", 1)):
        with tempfile.TemporaryDirectory() as tmp:
            gb, wall = measure(run_file(Path(tmp) / "out", tokens, TEN, at_once), Path(tmp))
        rows.append([name, f"{wall:.0f}", f"{gb:.2f}"])
        print(rows[-1], flush=True)
    return markdown_table(["10-SAE sweep", "wall (s)", "peak RSS (GB)"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--budgets", type=int, nargs="+", default=[51_200, 204_800, 409_600, 1_280_000])
    s = sub.add_parser("sweep")
    s.add_argument("--budget", type=int, default=102_400)
    a = p.parse_args()
    print(machine())
    print(memory(a.budgets) if a.what == "memory" else sweep(a.budget))


if __name__ == "__main__":
    main()
