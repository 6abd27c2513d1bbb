"""The training stream on the real model: batches are a pure function of the step, an epoch is
every row once, the cache gives the same rows as the model, SAEs at one stream train as they
would alone, a stopped group resumes exactly, and bad input is one clear error."""

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_distributed import one_thread

from sign_sae import runs
from sign_sae.architectures import make_training_sae
from sign_sae.corpus import load_texts, tokenize
from sign_sae.errors import SignSAEError
from sign_sae.harvest import harvest
from sign_sae.storage import read_weights
from sign_sae.stream import ActivationStream
from sign_sae.trainer import TrainConfig, Trainer, train_together

HOOKS = ["blocks.1.hook_mlp_out", "blocks.2.hook_resid_mid"]
BATCH = 96  # 21 batches an epoch: 32 sequences x 63 rows


@pytest.fixture(scope="module")
def tokens(model) -> torch.Tensor:
    return tokenize(model, load_texts(split="validation"), context_size=64, max_tokens=32 * 64)


def stream(model, tokens, **kw) -> ActivationStream:
    kw = {"buffer_tokens": 512, "seed": 3, "forward_batch": 8, **kw}
    return ActivationStream(model, tokens, HOOKS, BATCH, **kw)


def test_an_epoch_is_every_row_of_the_model_once_and_batches_are_a_function_of_the_step(
    model, tokens, tmp_path
):
    s = stream(model, tokens)
    assert s.rows_per_epoch == 32 * 63 and len(s.chunks) == 4  # 8 sequences a chunk
    epoch = [s.batch(k) for k in range(s.rows_per_epoch // BATCH)]
    reference = harvest(model, tokens, HOOKS, tmp_path / "h")
    for hook in HOOKS:
        rows = torch.cat([b[hook] for b in epoch])
        want = reference[hook].load()
        # the same multiset of rows (sorted by their sums), in another order
        assert not torch.equal(rows, want)
        order, want_order = rows.sum(1).argsort(), want.sum(1).argsort()
        torch.testing.assert_close(rows[order], want[want_order], rtol=0, atol=1e-4)
    # batch k does not depend on what was read before: a fresh stream, read backwards
    again = stream(model, tokens)
    for k in (20, 13, 0, 22):  # 22 is in the second epoch, which visits chunks anew
        batch = again.batch(k)
        expected = s.batch(k)
        assert all(torch.equal(batch[h], expected[h]) for h in HOOKS)
    assert not torch.equal(s.batch(0)[HOOKS[0]], s.batch(21)[HOOKS[0]])  # epochs differ


def test_the_cache_gives_the_models_rows_and_spares_its_forward(model, tokens, tmp_path):
    plain = stream(model, tokens)
    first = stream(model, tokens, cache_dir=tmp_path)
    steps = range(2 * first.rows_per_epoch // BATCH)  # two epochs
    for k in steps:
        a, b = plain.batch(k), first.batch(k)
        assert all(torch.equal(a[h], b[h]) for h in HOOKS)
    assert first.forwards == 4  # one forward per chunk: the second epoch read the disk
    assert len(list((tmp_path / HOOKS[0]).glob("chunk_*.safetensors"))) == 4
    later = stream(model, tokens, cache_dir=tmp_path)  # another run: no forward at all
    assert all(torch.equal(later.batch(k)[HOOKS[1]], plain.batch(k)[HOOKS[1]]) for k in steps)
    assert later.forwards == 0

    shard = tmp_path / HOOKS[0] / "chunk_00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SignSAEError, match="chunk_00002.safetensors does not match the sha256"):
        [stream(model, tokens, cache_dir=tmp_path).batch(k) for k in steps]
    with pytest.raises(SignSAEError, match="written for another stream .*forward_dtype"):
        stream(model, tokens, cache_dir=tmp_path, forward_dtype=torch.bfloat16).batch(0)


def test_ranks_stream_disjoint_shares_of_the_text(model, tokens):
    ranks = [stream(model, tokens, rank=r, world=2) for r in range(2)]
    seqs = [{int(i) for c in s.mine for i in s.chunks[c]} for s in ranks]
    assert not seqs[0] & seqs[1] and len(seqs[0] | seqs[1]) == tokens.shape[0]
    assert [s.local_batch for s in ranks] == [BATCH // 2, BATCH // 2]
    assert [s.rows_per_epoch for s in ranks] == [len(x) * 63 for x in seqs]
    # each rank's batches are the rows of its own chunks: rank 1's first epoch holds the rows
    # of the world-1 stream's chunks 1 and 3, and none of rank 0's
    one = stream(model, tokens)
    own = {h: torch.cat([one._read(c)[h] for c in ranks[1].mine]) for h in HOOKS}
    epoch = [ranks[1].batch(k) for k in range(ranks[1].rows_per_epoch // (BATCH // 2))]
    got = torch.cat([b[HOOKS[0]] for b in epoch])
    assert torch.equal(got.sum(1).sort().values, own[HOOKS[0]].sum(1).sort().values)


def test_bad_streams_are_one_clear_error(model, tokens):
    with pytest.raises(SignSAEError, match="buffer_tokens .* smaller than one batch"):
        stream(model, tokens, buffer_tokens=64)
    with pytest.raises(SignSAEError, match=r"runs dry: 100 steps .* Set data.epochs to 5"):
        stream(model, tokens).check_supply(100, epochs=1)
    stream(model, tokens).check_supply(100, epochs=5)
    with pytest.raises(SignSAEError, match="each rank needs one"):
        stream(model, tokens, buffer_tokens=4096, world=2)


def _trainers(s, run_dirs=None, steps=12):
    cfg = TrainConfig(total_steps=steps, batch_size=BATCH, lr=3e-3, checkpoint_every=4)
    out = []
    for i, (arch, hook) in enumerate(
        [("sa_gsae", HOOKS[0]), ("gated", HOOKS[0]), ("sa_gsae", HOOKS[1])]
    ):
        torch.manual_seed(i)
        sae = make_training_sae(arch, 576, 64, 1.0)
        run_dir = run_dirs[i] if run_dirs else None
        out.append(Trainer(sae, s.view(hook), replace(cfg), run_dir=run_dir, progress=False))
    return out


def test_saes_at_one_stream_train_as_they_would_alone(model, tokens):
    together = _trainers(stream(model, tokens))
    train_together(together, progress=False)
    alone = _trainers(stream(model, tokens))
    for t in alone:
        t.run()
    for a, b in zip(together, alone, strict=True):
        for (name, p), q in zip(
            a.sae.state_dict().items(), b.sae.state_dict().values(), strict=True
        ):
            assert torch.equal(p, q), name


def test_a_stopped_group_resumes_to_the_same_weights(model, tokens, tmp_path):
    straight = _trainers(stream(model, tokens))
    train_together(straight, progress=False)

    dirs = [tmp_path / str(i) for i in range(3)]
    s = stream(model, tokens)
    real = s.batch

    def dies_at_step_9(step):
        if step == 9:
            raise KeyboardInterrupt
        return real(step)

    s.batch = dies_at_step_9
    with pytest.raises(KeyboardInterrupt):
        train_together(_trainers(s, dirs), progress=False)
    resumed = _trainers(stream(model, tokens), dirs)  # a new process: the checkpoints at step 8
    train_together(resumed, progress=False)
    for a, b in zip(straight, resumed, strict=True):
        assert all(
            torch.equal(p, q) for p, q in zip(a.sae.parameters(), b.sae.parameters(), strict=True)
        )


def test_one_diverging_sae_stops_alone(model, tokens):
    trainers = _trainers(stream(model, tokens))
    trainers[1].cfg.lr = 1e30  # Gated's loss overflows
    trainers[1].cfg.grad_clip = 0.0
    results = train_together(trainers, progress=False)
    assert isinstance(results[1], Exception) and "loss" in str(results[1])
    assert [r.steps for i, r in enumerate(results) if i != 1] == [12, 12]


# ---- a streamed sweep killed again and again -----------------------------------------------
SOAK = """
out_dir: {out}
data: {{models: [smollm2-135m], hooks: [blocks.1.hook_mlp_out, blocks.2.hook_resid_mid],
        context_size: 64, train_tokens: 4096, eval_tokens: 256, ce_tokens: 256, epochs: 4,
        cache: true, buffer_tokens: 1024}}
h_expansion: 0.125
train: {{total_steps: 48, batch_size: 256, checkpoint_every: 4, log_every: 16}}
grid: [{{label: sa, arch: sa_gsae, sparsity: [1.0]}},
       {{label: gated, arch: gated, width: 2, sparsity: [1.0]}}]
"""
# SIGN_SAE_SOAK_KILLS=10 python -m pytest tests/test_stream.py -k killed  (the longer soak)
KILLS = int(os.environ.get("SIGN_SAE_SOAK_KILLS", "1"))


def _progress(out: Path) -> int:
    """How far the sweep got: -1 before any cache shard, else the newest checkpoint's step."""
    steps = [int(p.read_text().split("_")[1]) for p in out.glob("runs/*/*/*/checkpoint/latest")]
    if steps:
        return max(steps)
    return 0 if any(out.glob("activations/*/stream/*/*/chunk_*.sha256")) else -1


def test_a_streamed_sweep_killed_again_and_again_resumes_bit_identically(tmp_path, model):
    def command(out: Path) -> list[str]:
        path = out.with_suffix(".yaml")
        path.write_text(SOAK.format(out=out))
        return [sys.executable, "-m", "sign_sae", "train", str(path)]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"  # uninterrupted, in this process on one thread as well
    with one_thread():
        cfg = runs.load_sweep(command(straight)[-1])
        runs.train_runs(cfg, runs.Inputs(cfg.data, {"smollm2-135m": model}), progress=False)
    killed = tmp_path / "killed"
    # one kill after a checkpoint in the first epoch, while the cache is still being written
    # (steps 4-12 of 15); the longer soak kills first at the first cache shard, then at random
    # checkpoints
    rng = random.Random(0)
    targets = (
        [rng.randrange(4, 13)] if KILLS == 1 else [0, *sorted(rng.sample(range(4, 44), KILLS - 1))]
    )
    for target in targets:
        proc = subprocess.Popen(command(killed), env=env, stderr=subprocess.DEVNULL)
        while _progress(killed) < target and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list(killed.glob("runs/*/*/*/train.json"))  # every kill came before the end
    subprocess.run(command(killed), env=env, check=True, capture_output=True)
    finals = sorted(straight.glob("runs/*/*/*/sae/sae_weights.safetensors"))
    assert len(finals) == 4
    for path in finals:
        a, b = read_weights(path), read_weights(killed / path.relative_to(straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
