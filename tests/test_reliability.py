"""Faults and bad input: crash-safe training, verified state, atomic saves, typed configs,
concurrent runs, untrusted or broken files, one-line CLI errors, fuzzed configs
(docs/reliability.md lists each fault with its test)."""

import errno
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sae_lens.saes.sae
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import HookedSAETransformer
from safetensors.torch import save_file
from transformer_lens import HookedTransformerConfig

import sign_sae
from sign_sae import (
    SAGSAEConfig,
    SAGSAETrainingSAE,
    SAGSAETrainingSAEConfig,
    bi_jump_relu,
    cli,
    load_sae,
    releases,
    runs,
    storage,
)
from sign_sae.architectures import make_training_sae
from sign_sae.errors import SignSAEError
from sign_sae.export import export_run
from sign_sae.harvest import ActivationCache, InvalidCacheError, harvest
from sign_sae.metrics import LatentStats, balance, explained_variance, l0
from sign_sae.models import hook_name, load_model, mid_layer
from sign_sae.runs import load_sweep
from sign_sae.storage import (
    MANIFEST,
    atomic_write_text,
    read_weights,
    remove_stale,
    save_sae,
    write_folder,
)
from sign_sae.trainer import (
    CHECKPOINT_FILES,
    TensorBatches,
    TrainConfig,
    Trainer,
    checkpoints,
    read_checkpoint,
    train,
)

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
    # a pickle renamed to .safetensors: its hash differs, and in a folder without hashes (a
    # foreign one) the safetensors parser rejects it; it is never unpickled
    (sae_dir / "sae_weights.safetensors").write_bytes((bad / "sae_weights.pt").read_bytes())
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_sae(sae_dir)
    (sae_dir / MANIFEST).unlink()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sae(sae_dir)
    assert not marker.exists()


@pytest.mark.parametrize("hashed", [True, False])
def test_truncated_weights_are_named(sae_dir, hashed):
    if not hashed:
        (sae_dir / MANIFEST).unlink()  # as SAELens's own save_model writes it
    f = sae_dir / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    match = (
        "sae_weights.safetensors does not match the sha256" if hashed else "truncated or corrupt"
    )
    with pytest.raises(ValueError, match=match):
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
    (sae_dir / MANIFEST).unlink()  # a hand-edited foreign folder: no hashes, so the checks speak
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    edit(cfg)
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        load_sae(sae_dir)


def test_cfg_json_that_is_not_json(sae_dir):
    (sae_dir / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(sae_dir)


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


# ---- verified state: a flipped byte in any artifact is caught -------------------------------
def flip(path: Path) -> None:
    """Change one bit in the middle of a file (the data, not the header, of a safetensors)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


TINY = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


def tiny_trainer(run_dir: Path | None, d_sae: int = 16, **changes) -> Trainer:
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", 8, d_sae, 0.5)
    cfg = TrainConfig(**{"total_steps": 6, "batch_size": 256, "checkpoint_every": 2, **changes})
    return Trainer(sae, TensorBatches(TINY, 256, seed=1), cfg, run_dir, progress=False)


@pytest.fixture(scope="module")
def straight() -> dict[str, torch.Tensor]:
    """The weights of the tiny run trained without interruption."""
    trainer = tiny_trainer(None)
    trainer.run()
    return trainer.sae.state_dict()


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_flipped_byte_in_a_checkpoint_falls_back_to_the_previous_one(
    tmp_path, name, straight, caplog
):
    tiny_trainer(tmp_path).run(stop_at=4)
    folders = checkpoints(tmp_path / "checkpoint")
    assert [f.name for f in folders] == ["step_000000004", "step_000000002"]  # previous kept
    flip(folders[0] / name)
    with pytest.raises(SignSAEError, match=f"{name} does not match the sha256"):
        read_checkpoint(folders[0])
    resumed = tiny_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sign_sae.trainer"):
        resumed.run(resume=True)
    assert "resuming from the previous good checkpoint step_000000002" in caplog.text
    for key, value in straight.items():  # the fallback still ends on the uninterrupted weights
        torch.testing.assert_close(resumed.sae.state_dict()[key], value, atol=1e-6, rtol=1e-6)


def test_no_good_checkpoint_is_one_error_with_the_fix(tmp_path):
    tiny_trainer(tmp_path).run(stop_at=4)
    for folder in checkpoints(tmp_path / "checkpoint"):
        flip(folder / "optimizer.safetensors")
    with pytest.raises(SignSAEError, match="reads back whole.*delete .* to restart"):
        tiny_trainer(tmp_path).run(resume=True)


def test_a_checkpoint_missing_a_key_is_named(tmp_path):
    tiny_trainer(tmp_path).run(stop_at=2)
    (folder,) = checkpoints(tmp_path / "checkpoint")
    state = json.loads((folder / "trainer.json").read_text())
    del state["history"]  # as another version might write it, with a matching hash
    write_folder(folder, {"trainer.json": state})
    with pytest.raises(SignSAEError, match=r"lacks \['history'\] in its files"):
        read_checkpoint(folder)


def test_resuming_with_another_config_names_the_fields(tmp_path):
    tiny_trainer(tmp_path).run(stop_at=2)
    with pytest.raises(SignSAEError, match=r"d_sae: 16 -> 32; lr: 0.001 -> 0.002\)\. Resume") as e:
        tiny_trainer(tmp_path, d_sae=32, lr=2e-3, checkpoint_every=3).run(resume=True)
    assert "checkpoint_every" not in str(e.value)  # bookkeeping may change on resume
    tiny_trainer(tmp_path, log_every=1).run(resume=True)  # the same settings resume


def test_a_flipped_byte_in_a_cache_shard_is_caught_and_the_shard_rebuilt(
    model, eval_tokens, tmp_path, caplog
):
    hook = hook_name("mlp_out", mid_layer(model))
    cache = harvest(model, eval_tokens[:2], [hook], tmp_path)[hook]
    clean = cache.load()
    flip(cache.shard_paths[0])
    with pytest.raises(InvalidCacheError, match="does not match the sha256"):
        ActivationCache.open(cache.path).load()
    with caplog.at_level(logging.WARNING, logger="sign_sae.harvest"):
        again = harvest(model, eval_tokens[:2], [hook], tmp_path)[hook]
    assert "Rebuilding activation cache" in caplog.text
    assert torch.equal(again.load(), clean)


@pytest.mark.parametrize("arch", ["sa_gsae", "gated"])
def test_a_flipped_byte_in_a_saved_sae_is_caught_and_foreign_folders_still_load(tmp_path, arch):
    torch.manual_seed(0)
    sae = make_training_sae(arch, 8, 16, 1.0)
    folder = save_sae(sae, tmp_path / "sae")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(manifest) == ["cfg.json", "sae_weights.safetensors"]
    assert load_sae(folder).cfg.d_sae == 16
    flip(folder / "sae_weights.safetensors")
    with pytest.raises(SignSAEError, match="sae_weights.safetensors does not match the sha256"):
        load_sae(folder)
    (folder / MANIFEST).unlink()  # a foreign SAELens folder carries no hashes: it loads as is
    assert load_sae(folder).cfg.d_sae == 16


# ---- never a non-finite SAE -----------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_skip_nonfinite_with_normalize_gives_a_finite_sae(bad):
    data = TINY.clone()
    data[::7, 2] = bad
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", 8, 16, 0.5)
    cfg = TrainConfig(total_steps=5, batch_size=256, skip_nonfinite=True)  # normalize on
    result = train(sae, TensorBatches(data, 256), cfg, progress=False)
    finite = data[torch.isfinite(data).all(-1)].double()
    expected = math.sqrt(8 / finite.pow(2).sum(-1).mean().item())
    assert result.scaling_factor == pytest.approx(expected)  # over the rows training used
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_a_nonfinite_sae_is_never_saved(tmp_path):
    sae = make_training_sae("gated", 8, 16, 1.0)
    with torch.no_grad():
        sae.W_dec[3, 1] = float("inf")
    with pytest.raises(SignSAEError, match="W_dec of the SAE saved to .* 1 NaN/Inf value"):
        save_sae(sae, tmp_path / "sae")
    with pytest.raises(SignSAEError, match="W_dec of the SAE at step 0"):
        Trainer(sae, TensorBatches(TINY, 256), TrainConfig(), tmp_path).save_checkpoint(0.0)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder


# ---- atomic saves ---------------------------------------------------------------------------
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def killed_child(body) -> None:
    """Run ``body`` in a forked child that SIGKILLs itself inside it (no cleanup runs)."""
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        try:
            body()
        finally:
            os._exit(0)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def kill_while_writing_weights() -> None:
    def half_then_die(tensors, filename, *args, **kwargs):
        data = safetensors.torch.save(tensors)
        Path(filename).write_bytes(data[: len(data) // 2])
        die()

    sae_lens.saes.sae.save_file = half_then_die


def kill_after_the_swap() -> None:
    swap = storage._swap
    storage._swap = lambda new, path: (swap(new, path), die())


def kill_between_two_renames() -> None:
    storage.ctypes.CDLL = lambda *a, **k: object()  # no renameat2: the two-rename fallback
    rename, calls = os.rename, []

    def rename_then_die(src, dst):
        calls.append(src)
        if len(calls) == 2:
            die()
        rename(src, dst)

    os.rename = rename_then_die


@pytest.mark.parametrize(
    "kill, survivor",
    [
        (kill_while_writing_weights, "old"),
        (kill_after_the_swap, "new"),
        (kill_between_two_renames, "old"),
    ],
)
def test_a_kill_during_a_resave_leaves_a_loadable_sae(tmp_path, kill, survivor):
    """A finished run's SAE saved again (SAELens's Gated writes in place on its own) and killed
    mid-way: the folder holds the old or the new SAE whole, other files stay, temporaries go."""
    saes = {}
    for seed, key in ((0, "old"), (1, "new")):
        torch.manual_seed(seed)
        saes[key] = make_training_sae("gated", 8, 16, 1.0)
    folder = save_sae(saes["old"], tmp_path / "sae")
    (folder / "notes.txt").write_text("kept")

    def resave() -> None:
        kill()
        save_sae(saes["new"], folder)

    killed_child(resave)
    assert remove_stale(tmp_path) >= 1
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = load_sae(folder).state_dict()
    expected = saes[survivor].state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert (folder / "notes.txt").read_text() == "kept"  # a save replaces only what it writes


def test_stale_temporaries_go_and_live_ones_stay(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "runs").mkdir()
    stale = [tmp_path / f".results.json.{dead.pid}-abc.tmp", tmp_path / ".shard.safetensors.tmp"]
    for path in stale:
        path.write_text("half")
    (tmp_path / "runs" / f".sae.{dead.pid}-xyz.tmp").mkdir()
    live = tmp_path / f".results.csv.{os.getppid()}-q1.tmp"  # its writer still runs
    live.write_text("writing")
    assert remove_stale(tmp_path) == 3
    assert sorted(tmp_path.rglob(".*.tmp")) == [live]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_get_permissions_from_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_folder(tmp_path / "f", {"b.json": {"x": 1}})
        save_sae(make_training_sae("sa_gsae", 8, 16, 1.0), tmp_path / "sae")
    finally:
        os.umask(old)
    files = [tmp_path / "a.txt", tmp_path / "f" / "b.json", tmp_path / "sae" / MANIFEST]
    files += [tmp_path / "sae" / "sae_weights.safetensors", tmp_path / "f" / MANIFEST]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    folders = [tmp_path / "f", tmp_path / "sae"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o777 & ~umask}


# ---- typed configs --------------------------------------------------------------------------
def sweep_yaml(path: Path, train: str = "{}", label: str = "a", extra: str = "") -> Path:
    path.write_text(
        f"data: {{models: [tiny], hooks: [mlp_out], context_size: 16, train_tokens: 512, "
        f"eval_tokens: 64, ce_tokens: 32}}\n"
        f"train: {train}\n"
        f"grid:\n  - {{label: {label}, arch: sa_gsae, sparsity: [1.0]{extra}}}\n"
    )
    return path


def test_config_values_are_coerced_where_lossless(tmp_path):
    cfg = load_sweep(sweep_yaml(tmp_path / "s.yaml", "{lr: 1e-3, total_steps: '10', lr_end: 0}"))
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # PyYAML's '1e-3' string
    assert cfg.train.total_steps == 10 and isinstance(cfg.train.total_steps, int)
    assert isinstance(cfg.train.lr_end, float)
    cfg = load_sweep(sweep_yaml(tmp_path / "s.yaml", extra=", width: 1e0, train: {lr: 2e-3}"))
    assert cfg.grid[0].width == 1.0 and cfg.grid[0].train == {"lr": 2e-3}


@pytest.mark.parametrize(
    "train, extra, label, message",
    [
        ("{lr: fast}", "", "a", r"train.lr: expected a number, got 'fast' \(str\)"),
        ("{total_steps: 1.5}", "", "a", r"train.total_steps: expected an integer, got 1.5"),
        ("{normalize: 1}", "", "a", r"train.normalize: expected true or false, got 1 \(int\)"),
        ("5", "", "a", "train must be a mapping of TrainConfig fields, got 5"),
        ("{}", ", width: big", "a", r"grid entry 'a': width: expected a number, got 'big'"),
        ("{}", ", train: {lr: x}", "a", r"grid entry 'a': train: lr: expected a number, got 'x'"),
        ("{}", "", "../../x", "grid entry '../../x': a label names folders"),
        ("{}", "", "a/b", "must be a plain name"),
    ],
)  # fmt: skip
def test_config_values_that_do_not_convert_are_refused_naming_the_field(
    tmp_path, train, extra, label, message
):
    with pytest.raises(SignSAEError, match=message):
        load_sweep(sweep_yaml(tmp_path / "s.yaml", train, label, extra))


def test_yaml_syntax_errors_give_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1e-3\ngrid: [\n  {label: a\n")
    with pytest.raises(SignSAEError, match=r"bad.yaml:5:1: YAML syntax error: expected ','"):
        load_sweep(path)


# ---- runs: YAML that trains, two processes on one folder ------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=40,
        act_fn="gelu", normalization_type="RMS",
    )  # fmt: skip
    model = HookedSAETransformer(cfg)
    model.cfg.model_name = "tiny"
    return model.eval()


class TinySource(runs.Inputs):
    def __init__(self, data: runs.DataConfig, model) -> None:
        super().__init__(data, {"tiny": model})

    def tokens(self, model, split: str) -> torch.Tensor:
        n = self.data.train_tokens if split == "train" else self.data.eval_tokens
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        return torch.randint(0, 40, (n // 16, 16), generator=g)


def test_lr_written_1e_3_in_yaml_trains(tmp_path, tiny_model):
    path = sweep_yaml(tmp_path / "s.yaml", "{lr: 1e-3, total_steps: 4, batch_size: 64}")
    cfg = load_sweep(path)
    cfg.out_dir = str(tmp_path / "out")
    stale = tmp_path / "out" / "runs" / ".sae.999999999-x.tmp"  # a killed writer's leftover
    stale.mkdir(parents=True)
    (run,) = runs.train_runs(cfg, TinySource(cfg.data, tiny_model), progress=False)
    assert not stale.exists()  # removed when the run started
    info = json.loads((run.folder / runs.TRAIN_FILE).read_text())
    assert info["steps"] == 4 and run.train.lr == 1e-3
    assert load_sae(run.folder / "sae").cfg.d_in == 16


def in_children(*bodies) -> None:
    """Run each body in its own forked process at the same time; each must exit 0."""
    pids = []
    for body in bodies:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                torch.set_num_threads(1)
                body()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0


def test_two_processes_adding_rows_to_one_table_keep_every_row(tmp_path):
    go = tmp_path / "go"

    def add(tag: str) -> None:
        table = runs.ResultsTable(tmp_path)  # both open the table while it is empty
        while not go.exists():
            time.sleep(0.001)
        for i in range(20):
            table.add({"config_hash": f"{tag}{i}", "value": i})

    in_children(lambda: add("a"), lambda: add("b"), lambda: go.touch())
    rows = runs.read_results(tmp_path / runs.RESULTS_JSON)
    assert sorted(r["config_hash"] for r in rows) == sorted(
        f"{t}{i}" for t in "ab" for i in range(20)
    )
    assert len(runs.read_results(tmp_path / runs.RESULTS_CSV)) == 40


def test_two_sweeps_sharing_a_folder_keep_every_row_and_train_each_run_once(
    tmp_path, tiny_model, monkeypatch
):
    """The grid split over two files, one entry in both: every row is kept, and the shared run
    is trained by one process (the other waits for its lock and finds it trained)."""
    trained = tmp_path / "trained.log"
    real = runs.execute.train_together

    def logged(trainers, *args, **kwargs):
        with trained.open("a") as f:
            f.write("".join(f"{t.ckpt_root.parent.name}\n" for t in trainers))
        return real(trainers, *args, **kwargs)

    monkeypatch.setattr(runs.execute, "train_together", logged)
    entries = {"a": "[0.5, 1.0]", "b": "[2.0]", "both": "[3.0]"}

    def sweep(labels: str) -> None:
        grid = "".join(
            f"  - {{label: {x}, arch: sa_gsae, sparsity: {entries[x]}}}\n" for x in labels.split()
        )
        path = tmp_path / f"{labels.replace(' ', '_')}.yaml"
        path.write_text(
            f"out_dir: {tmp_path / 'out'}\ndata: {{models: [tiny], hooks: [mlp_out], "
            "context_size: 16, train_tokens: 512, eval_tokens: 64, ce_tokens: 32}\n"
            f"train: {{total_steps: 4, batch_size: 64, lr: 1e-3}}\ngrid:\n{grid}"
        )
        cfg = load_sweep(path)
        while not go.exists():  # both start together, each with an empty table
            time.sleep(0.001)
        runs.run_sweep(cfg, inputs=TinySource(cfg.data, tiny_model), progress=False)

    go = tmp_path / "go"
    in_children(lambda: sweep("both a"), lambda: sweep("both b"), go.touch)
    rows = runs.read_results(tmp_path / "out" / runs.RESULTS_JSON)
    assert sorted(r["name"] for r in rows) == [
        "a_sp0.5_seed0", "a_sp1_seed0", "b_sp2_seed0", "both_sp3_seed0",
    ]  # fmt: skip
    names = trained.read_text().split()
    assert len(names) == 4 and len(set(names)) == 4  # the shared run once


# ---- one line for every user mistake at the command line ------------------------------------
def cli_error(argv: list[str], capsys) -> str:
    """The error of a failing command: exit code 2, no traceback, one line and the last one
    (what comes before it on stderr is the log's and the progress bars' output)."""
    capsys.readouterr()
    code = cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("sign-sae: error: ")]
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_cli_one_line_for_bad_sweep_files(tmp_path, capsys):
    assert "No sweep file" in cli_error(["train", str(tmp_path / "none.yaml")], capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [\n  {label: a\n")
    assert f"{bad}:3:1: YAML syntax error" in cli_error(["train", str(bad)], capsys)
    typed = sweep_yaml(tmp_path / "t.yaml", "{lr: fast}")
    assert "train.lr: expected a number, got 'fast'" in cli_error(["sweep", str(typed)], capsys)
    path = sweep_yaml(tmp_path / "p.yaml", label="../../x")
    assert "a label names folders" in cli_error(["eval", str(path)], capsys)


def test_cli_one_line_for_broken_sae_files(tmp_path, capsys):
    folder = save_sae(make_training_sae("sa_gsae", 8, 16, 1.0), tmp_path / "sae")
    out = str(tmp_path / "release")
    weights = folder / "sae_weights.safetensors"
    good = weights.read_bytes()
    flip(weights)
    assert "does not match the sha256" in cli_error(["export", str(folder), out], capsys)
    (folder / MANIFEST).unlink()
    weights.write_bytes(good[:-40])  # truncated, in a folder without hashes
    assert "truncated or corrupt" in cli_error(["export", str(folder), out], capsys)
    (folder / "cfg.json").write_text('{"d_in": 8,')
    assert "cfg.json is not valid JSON" in cli_error(["export", str(folder), out], capsys)
    (folder / "cfg.json").unlink()
    assert "neither an SAE folder" in cli_error(["export", str(folder), out], capsys)


def test_cli_eval_loads_through_the_checked_loader(tmp_path, tiny_model, capsys, monkeypatch):
    path = sweep_yaml(tmp_path / "s.yaml", "{total_steps: 2, batch_size: 64}")
    cfg = load_sweep(path)
    cfg.out_dir = str(tmp_path / "out")
    (run,) = runs.train_runs(cfg, TinySource(cfg.data, tiny_model), progress=False)
    monkeypatch.setattr(runs.execute, "load_model", lambda name, device: tiny_model)
    monkeypatch.setattr(runs.Inputs, "tokens", TinySource.tokens)
    flip(run.folder / "sae" / "sae_weights.safetensors")
    err = cli_error(["eval", str(path), "--out", cfg.out_dir], capsys)
    assert "sae_weights.safetensors does not match the sha256" in err
    (run.folder / runs.TRAIN_FILE).write_text('{"run": ')
    assert "train.json is not valid JSON" in cli_error(
        ["eval", str(path), "--out", cfg.out_dir], capsys
    )


def test_cli_one_line_for_a_full_disk(tmp_path, tiny_model, capsys, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runs.execute, "load_model", lambda name, device: tiny_model)
    monkeypatch.setattr(runs.execute, "atomic_write_text", full)
    err = cli_error(["train", str(sweep_yaml(tmp_path / "s.yaml")), "--out", str(tmp_path)], capsys)
    assert f"no space left on the device writing {tmp_path / 'sweep.yaml'}" in err


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable, whatever the machine's network (nothing is fetched)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_cli_one_line_for_an_offline_dataset(tmp_path, tiny_model, capsys, monkeypatch, offline):
    path = sweep_yaml(tmp_path / "s.yaml")
    path.write_text(
        path.read_text().replace("ce_tokens: 32", "ce_tokens: 32, text: 'hf:sign-sae-tests/none'")
    )
    monkeypatch.setattr(runs.execute, "load_model", lambda name, device: tiny_model)
    err = cli_error(["train", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "The dataset 'hf:sign-sae-tests/none' is not in the local cache" in err


def test_an_offline_hub_release_names_what_was_asked_for(offline):
    with pytest.raises(
        SignSAEError,
        match="SAE 'layer_5/width_16k/average_l0_68' of release 'gemma-scope-2b-pt-res' is not in the local cache",
    ):
        releases.load_pretrained("gemma-scope-2b-pt-res", "layer_5/width_16k/average_l0_68")


def test_an_offline_hub_model_names_what_was_asked_for(offline):
    with pytest.raises(SignSAEError, match="The model 'gpt2' is not in the local cache"):
        load_model("gpt2")


def test_cli_bugs_keep_their_traceback(monkeypatch):
    def bug(args):
        raise TypeError("a genuine bug")

    monkeypatch.setattr(cli, "cmd_frontier", bug)
    with pytest.raises(TypeError, match="a genuine bug"):
        cli.main(["frontier", "results.json"])


# ---- reports and release folders ------------------------------------------------------------
def test_text_utf8_cannot_encode_is_replaced_in_reports(tmp_path):
    from analyses.logit_lens import token_strings
    from analyses.report import write
    from analyses.report.layout import Report

    class BrokenTokenizer:
        def decode(self, ids):
            return "ab\udcff"  # half a character, as a byte-level token decodes alone

    class Model:
        tokenizer = BrokenTokenizer()

    assert token_strings(Model(), [5]) == ["ab\ufffd\ufffd\ufffd"]
    path = write(
        Report(title="token \udcff", facts=[("tok", "\ud800")], rows=[]), tmp_path / "r.html"
    )
    text = path.read_bytes().decode("utf-8")  # valid UTF-8
    assert "token ?" in text


def test_release_folders_refuse_symlinks_that_leave_them(tmp_path):
    outside = save_sae(make_training_sae("sa_gsae", 8, 16, 1.0), tmp_path / "elsewhere")
    release = tmp_path / "release"
    shutil.copytree(outside, release / "inside")
    (release / "linked").symlink_to(outside, target_is_directory=True)
    (release / "mixed").mkdir()
    shutil.copy(outside / "cfg.json", release / "mixed" / "cfg.json")
    (release / "mixed" / "sae_weights.safetensors").symlink_to(outside / "sae_weights.safetensors")
    assert releases.load_release_sae(str(release), "inside")[0]["d_sae"] == 16
    for name in ("linked", "mixed"):
        with pytest.raises(SignSAEError, match="is a symlink to .* outside"):
            releases.load_release_sae(str(release), name)
    with pytest.raises(SignSAEError, match="outside"):
        export_run(release / "mixed", tmp_path / "out")
