"""Faults and bad input: crash-safe training, untrusted or broken files, fuzzed configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import sign_sae
from sign_sae import (
    SAGSAEConfig,
    SAGSAETrainingSAE,
    SAGSAETrainingSAEConfig,
    bi_jump_relu,
    load_sae,
)
from sign_sae.metrics import LatentStats, balance, explained_variance, l0
from sign_sae.storage import read_weights
from sign_sae.trainer import TensorBatches, TrainConfig, train

TRAIN_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from sign_sae.architectures import make_training_sae
from sign_sae.trainer import TensorBatches, TrainConfig, train
torch.set_num_threads(1)
data = load_file(sys.argv[1])["x"]
torch.manual_seed(0)
sae = make_training_sae("sa_gsae", 64, 512, 0.5, warm_up_steps=20)
cfg = TrainConfig(total_steps=int(sys.argv[3]), batch_size=512, checkpoint_every=5)
train(sae, TensorBatches(data, 512, seed=3), cfg, run_dir=Path(sys.argv[2]), resume=True,
      progress=False)
sae.save_model(Path(sys.argv[2]) / "final")
"""
STEPS = 300


def _latest_step(run: Path) -> int:
    pointer = run / "checkpoint" / "latest"
    return int(pointer.read_text().split("_")[1]) if pointer.exists() else 0


def test_sigkill_mid_run_then_resume_gives_uninterrupted_weights(tmp_path):
    data = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    save_file({"x": data}, tmp_path / "x.safetensors")
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run = tmp_path / "run"
    cmd = [sys.executable, str(script), str(tmp_path / "x.safetensors"), str(run), str(STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while _latest_step(run) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(run)
    assert 0 < killed_at < STEPS and not (run / "final").exists()  # really interrupted
    subprocess.run(cmd, env=env, check=True)  # resumes from the last checkpoint
    resumed = read_weights(run / "final" / "sae_weights.safetensors")

    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        from sign_sae.architectures import make_training_sae

        straight = make_training_sae("sa_gsae", 64, 512, 0.5, warm_up_steps=20)
        cfg = TrainConfig(total_steps=STEPS, batch_size=512)
        train(straight, TensorBatches(data, 512, seed=3), cfg, progress=False)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed[name], value, atol=1e-6, rtol=1e-6, msg=name)


# ---- untrusted and broken files -----------------------------------------------------------
@pytest.fixture
def sae_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    SAGSAETrainingSAE(SAGSAETrainingSAEConfig(d_in=8, d_sae=16)).save_inference_model(
        tmp_path / "sae"
    )
    return tmp_path / "sae"


def test_load_sae_round_trip(sae_dir):
    assert type(load_sae(sae_dir)) is sign_sae.SAGSAE


def test_pickle_is_refused_never_unpickled(tmp_path, sae_dir):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "pickled"
    bad.mkdir()
    torch.save({"W_enc": Evil()}, bad / "sae_weights.pt")
    with pytest.raises(FileNotFoundError, match="pickle files"):
        load_sae(bad)
    with pytest.raises(ValueError, match="only loads safetensors"):
        read_weights(bad / "sae_weights.pt")
    # a pickle renamed to .safetensors is rejected by the safetensors parser, not unpickled
    (sae_dir / "sae_weights.safetensors").write_bytes((bad / "sae_weights.pt").read_bytes())
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sae(sae_dir)
    assert not marker.exists()


def test_truncated_weights_are_named(sae_dir):
    f = sae_dir / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sae(sae_dir)


def test_folder_that_is_not_an_sae(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_sae(tmp_path / "nope")


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda c: c.update(architecture="no_such_arch"), ValueError, "not registered"),
        (lambda c: c.update(extra_field=1), ValueError, "Unknown config field"),
        (lambda c: c.pop("d_sae"), ValueError, "missing required field"),
        (lambda c: c.update(d_in="8"), ValueError, "'d_in' should be int"),
        (lambda c: c.update(tied="yes"), ValueError, "'tied' should be bool"),
        # a cfg.json from another architecture over SA-GSAE weights
        (
            lambda c: [c.update(architecture="gated"), c.pop("tied"), c.pop("two_sided")],
            ValueError,
            "do not fit its 'gated' config",
        ),
    ],
)
def test_bad_cfg_json(sae_dir, edit, error, match):
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    edit(cfg)
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        load_sae(sae_dir)


def test_cfg_json_that_is_not_json(sae_dir):
    (sae_dir / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(sae_dir)


def test_nonfinite_rows_can_be_skipped_explicitly():
    data = torch.randn(2048, 8)
    data[::7, 2] = float("inf")
    torch.manual_seed(0)
    sae = SAGSAETrainingSAE(SAGSAETrainingSAEConfig(d_in=8, d_sae=16))
    cfg = TrainConfig(total_steps=5, batch_size=256, normalize=False, skip_nonfinite=True)
    train(sae, TensorBatches(data, 256), cfg, progress=False)
    assert all(torch.isfinite(p).all() for p in sae.parameters())


# ---- properties ---------------------------------------------------------------------------
finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    z=st.lists(finite, min_size=1, max_size=40),
    t_pos=st.floats(0, 100, width=32),
    t_neg=st.floats(0, 100, width=32),
    bump=st.floats(0, 10, width=32),
)
def test_bi_jump_relu_properties(z, t_pos, t_neg, bump):
    z = torch.tensor(z)
    tp, tn = torch.tensor(t_pos), torch.tensor(t_neg)
    f = bi_jump_relu(z, tp, tn)
    assert ((f == 0) | (f == z)).all()  # passes z through or is exactly zero
    assert (torch.sign(f) * torch.sign(z) >= 0).all()  # never flips a sign
    assert ((f > 0) == (z > tp)).all() and ((f < 0) == (z < -tn)).all()
    higher = bi_jump_relu(z, tp + bump, tn + bump)
    assert ((higher != 0) <= (f != 0)).all()  # raising thresholds never adds firings


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    shift=st.floats(-100, 100),
)
def test_metric_properties(rows, cols, seed, shift):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    f[torch.rand(rows, cols, generator=g) < 0.5] = 0
    stats = LatentStats(cols)
    stats.update(f)
    assert stats.l0 == pytest.approx(l0(f)) and 0 <= stats.l0 <= cols
    b = balance(stats.n_pos, stats.n_neg)
    assert ((b >= 0) & (b <= 0.5)).all()
    assert stats.alive.tolist() == (f != 0).any(0).tolist()
    assert (stats.n_pos + stats.n_neg).sum().item() == (f != 0).sum().item()
    x = torch.randn(rows + 1, cols, generator=g, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn(rows + 1, cols, generator=g, dtype=torch.float64)
    ev = explained_variance(x, x_hat)
    assert ev == pytest.approx(explained_variance(x + shift, x_hat + shift), rel=1e-6, abs=1e-6)
    assert ev <= 1.0


FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=150, deadline=None)
@given(
    updates=st.dictionaries(
        st.sampled_from(
            [
                "d_in",
                "d_sae",
                "tied",
                "two_sided",
                "dtype",
                "apply_b_dec_to_input",
                "normalize_activations",
                "metadata",
                "architecture",
                "bogus",
            ]
        ),
        FIELD_VALUES,
        max_size=4,
    )
)
def test_cfg_fuzz_gives_a_config_or_a_clear_error(updates):
    cfg = {"d_in": 8, "d_sae": 16, "architecture": "sa_gsae", "metadata": {}}
    cfg.update(updates)
    try:
        out = SAGSAEConfig.from_dict(cfg)
    except (ValueError, TypeError, KeyError) as e:
        assert str(e)  # every refusal says something
    else:
        assert isinstance(out.d_in, int) and out.d_in > 0 and isinstance(out.tied, bool)
