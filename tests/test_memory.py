"""Training memory does not grow with the token budget: ``sign-sae train`` on the real model at N
and 8N training tokens (the same steps and batches; N takes 8 epochs) peaks within a small
margin of each other, far below the 8N float32 activations an in-memory split would hold."""

import os
import subprocess
import sys

import pytest

N = 4096  # training tokens of the small budget (4064 rows once BOS is left out)
D_MODEL = 576


def run_file(out, tokens: int, epochs: int) -> str:
    return f"""
out_dir: {out}
data: {{models: [smollm2-135m], hooks: [blocks.0.hook_mlp_out], context_size: 128,
        train_tokens: {tokens}, eval_tokens: 256, ce_tokens: 256, epochs: {epochs},
        buffer_tokens: 4096, forward_dtype: bfloat16}}
h_expansion: 0.125
train: {{total_steps: 60, batch_size: 512, log_every: 60}}
grid: [{{label: sa, arch: sa_gsae, sparsity: [1.0]}}]
"""


def peak_rss(args: list[str]) -> int:
    """Peak resident memory (bytes) of one child process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, err[-2000:]
    return usage.ru_maxrss * 1024


@pytest.mark.usefixtures("model")  # the converted model is cached for the subprocesses
def test_peak_memory_is_flat_in_the_token_budget(tmp_path):
    peaks = {}
    for tokens, epochs in ((N, 8), (8 * N, 1)):
        path = tmp_path / f"{tokens}.yaml"
        path.write_text(run_file(tmp_path / str(tokens), tokens, epochs))
        peaks[tokens] = peak_rss([sys.executable, "-m", "sign_sae", "train", str(path)])
    growth = peaks[8 * N] - peaks[N]
    in_memory = 7 * N * D_MODEL * 4  # what holding the larger split as float32 would add
    assert growth < in_memory / 4, (peaks, in_memory)
