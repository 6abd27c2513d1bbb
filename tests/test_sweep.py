"""The sweep on a tiny random transformer: plan and hashes, one harvest per model, the results
table, resuming a half-finished sweep, held-out metrics equal to ``evaluate``, profiles, CLI."""

import json
import math

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from transformer_lens import HookedTransformerConfig

from sign_sae import cli, sweep
from sign_sae.evaluate import evaluate
from sign_sae.heldout import HeldOut

CONTEXT = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only add synchronisation (slow on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_ctx=CONTEXT,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=40,
        act_fn="gelu",
        normalization_type="RMS",
    )
    m = HookedSAETransformer(cfg)
    m.cfg.model_name = "tiny"
    return m.eval()


@pytest.fixture
def loader(model):
    def load(cfg, name):
        g = torch.Generator().manual_seed(1)
        return (
            model,
            torch.randint(0, 40, (cfg.train_tokens // CONTEXT, CONTEXT), generator=g),
            torch.randint(0, 40, (cfg.eval_tokens // CONTEXT, CONTEXT), generator=g),
        )

    return load


def tiny_sweep(out_dir, **changes) -> sweep.SweepConfig:
    data = {
        "out_dir": str(out_dir),
        "models": ["tiny"],
        "hooks": ["mlp_out", "attn_out"],
        "context_size": CONTEXT,
        "train_tokens": 1024,
        "eval_tokens": 128,
        "ce_tokens": 64,
        "train": {"total_steps": 8, "batch_size": 64, "log_every": 4},
        "grid": [
            {"label": "sa_gsae_H", "arch": "sa_gsae", "sparsity": [0.1, 1.0]},
            {"label": "gated_2H", "arch": "gated", "width": 2, "sparsity": [1.0]},
            {
                "label": "sa_noaux",
                "arch": "sa_gsae",
                "sparsity": [1.0],
                "seeds": [0, 1],
                "options": {"aux_coefficient": 0.0},
                "hooks": ["mlp_out"],
                "ablation_of": "sa_gsae_H",
            },
        ],
        **changes,
    }
    return sweep._build(sweep.SweepConfig, data)


def extra_columns(sae, acts):
    return {"n_eval_rows": acts.shape[0], "nan_column": float("nan")}


def count_training(monkeypatch) -> list[str]:
    calls = []
    real = sweep.train

    def counted(sae, *args, **kwargs):
        calls.append(kwargs["run_dir"].name)
        return real(sae, *args, **kwargs)

    monkeypatch.setattr(sweep, "train", counted)
    return calls


def test_plan_orders_by_entry_and_hashes_only_what_changes_a_result(tmp_path):
    cfg = tiny_sweep(tmp_path)
    runs = sweep.plan(cfg)
    assert [(r.entry.label, r.hook, r.sparsity, r.seed) for r in runs] == [
        ("sa_gsae_H", "mlp_out", 0.1, 0),
        ("sa_gsae_H", "mlp_out", 1.0, 0),
        ("sa_gsae_H", "attn_out", 0.1, 0),
        ("sa_gsae_H", "attn_out", 1.0, 0),
        ("gated_2H", "mlp_out", 1.0, 0),
        ("gated_2H", "attn_out", 1.0, 0),
        ("sa_noaux", "mlp_out", 1.0, 0),
        ("sa_noaux", "mlp_out", 1.0, 1),
    ]
    hashes = [r.config_hash for r in runs]
    assert len(set(hashes)) == len(hashes)
    same = tiny_sweep(tmp_path / "elsewhere", train={**vars(cfg.train), "log_every": 1})
    assert [r.config_hash for r in sweep.plan(same)] == hashes
    longer = tiny_sweep(tmp_path, train={**vars(cfg.train), "total_steps": 9})
    assert not set(r.config_hash for r in sweep.plan(longer)) & set(hashes)


def test_entry_train_overrides_change_the_hash_only_when_they_change_the_recipe(tmp_path):
    def hashes(**train) -> list[str]:
        entry = {"label": "sa", "arch": "sa_gsae", "sparsity": [1.0], "train": train}
        cfg = tiny_sweep(tmp_path, grid=[entry])
        assert sweep.train_config(cfg, cfg.grid[0], 3).seed == 3
        return [r.config_hash for r in sweep.plan(cfg)]

    plain = hashes()
    # controls that are off leave the hash as it was before they existed
    assert hashes(target_l0=None, target_l0_rate=0.5, lr_scales={}) == plain
    assert hashes(total_steps=8) == plain  # the sweep's own value
    for changed in (hashes(total_steps=16), hashes(target_l0=4.0), hashes(lr_scales={"b_*": 2})):
        assert not set(changed) & set(plain)


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_sweep(tmp_path, grid=[{"label": "x", "arch": "nope", "sparsity": [1]}])
    with pytest.raises(ValueError, match="hooks not in the sweep"):
        tiny_sweep(
            tmp_path, grid=[{"label": "x", "arch": "gated", "sparsity": [1], "hooks": ["resid"]}]
        )
    with pytest.raises(ValueError, match="Unknown GridEntry"):
        tiny_sweep(tmp_path, grid=[{"label": "x", "arch": "gated", "sparsity": [1], "k": 3}])
    with pytest.raises(ValueError, match=r"unknown train settings \['steps'\]"):
        tiny_sweep(
            tmp_path, grid=[{"label": "x", "arch": "gated", "sparsity": [1], "train": {"steps": 3}}]
        )


def test_a_crashed_sweep_resumes_without_redoing_finished_runs(tmp_path, loader, monkeypatch):
    cfg = tiny_sweep(tmp_path / "crash")
    n_runs = len(sweep.plan(cfg))
    seen = []

    def crash_on_third_eval(sae, acts):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the sweep dies after training run 3, before its row
        return extra_columns(sae, acts)

    trained = count_training(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfg, crash_on_third_eval, loader, progress=False)
    assert len(sweep.ResultsTable(cfg.out_dir).rows) == 2
    assert len(trained) == 3

    rows = sweep.run_sweep(cfg, extra_columns, loader, progress=False)
    assert len(rows) == n_runs
    assert len(trained) == n_runs  # run 3 was trained once, only evaluated again
    assert len({r["config_hash"] for r in rows}) == n_runs
    again = sweep.run_sweep(cfg, extra_columns, loader, progress=False)  # nothing left to do
    assert [r["config_hash"] for r in again] == [r["config_hash"] for r in rows]
    assert len(trained) == n_runs

    # The same grid in one go gives the same numbers: resuming changed nothing.
    fresh = sweep.run_sweep(tiny_sweep(tmp_path / "fresh"), extra_columns, loader, progress=False)
    by_hash = {r["config_hash"]: r for r in fresh}
    for r in rows:
        assert r["r2"] == pytest.approx(by_hash[r["config_hash"]]["r2"], abs=1e-6)
        assert r["l0"] == pytest.approx(by_hash[r["config_hash"]]["l0"], abs=1e-6)


def test_results_table_has_every_column_in_json_and_csv(tmp_path, loader):
    cfg = tiny_sweep(tmp_path)
    sweep.run_sweep(cfg, extra_columns, loader, progress=False)
    from_json = sweep.read_results(tmp_path / "results.json")
    from_csv = sweep.read_results(tmp_path / "results.csv")
    assert len(from_json) == len(from_csv) == len(sweep.plan(cfg))
    row = from_csv[0]
    for col in sweep.COLUMNS + ["n_eval_rows", "folder"]:
        assert col in row, col
    assert row["nan_column"] is None and from_json[0]["nan_column"] is None
    assert row["config_hash"] == from_json[0]["config_hash"]
    assert row["r2"] == pytest.approx(from_json[0]["r2"])
    assert row["n_eval_rows"] == (128 // CONTEXT) * (CONTEXT - 1)
    assert row["ce_tokens"] == (64 // CONTEXT) * (CONTEXT - 2)
    assert all(r["train_s"] > 0 and r["wall_s"] >= r["train_s"] for r in from_json)
    gated = next(r for r in from_json if r["label"] == "gated_2H")
    assert gated["d_sae"] == 32 and gated["width_factor"] == 2
    assert (tmp_path / "sweep.yaml").is_file()
    # One harvest per model and split, every hook of the sweep in it.
    for split in ("train", "eval"):
        hooks = {p.name for p in (tmp_path / "activations" / "tiny" / split).iterdir()}
        assert hooks == {"blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"}
    # Trained SAEs stay, their checkpoints go.
    folder = tmp_path / gated["folder"]
    assert (folder / "sae" / "cfg.json").is_file() and not (folder / "checkpoint").exists()


def test_held_out_metrics_equal_evaluate(model):
    torch.manual_seed(3)
    tokens = torch.randint(0, 40, (6, CONTEXT))
    hook = "blocks.1.hook_mlp_out"
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = cache[hook][:, 1:].reshape(-1, 16)
    from sign_sae.architectures import make_training_sae

    sae = make_training_sae("sa_gsae", 16, 24, 1.0, threshold_init=0.05)
    for cached in (True, False):
        held = HeldOut(model, tokens, {hook: acts}, batch_size=4, max_cache_bytes=2**30 * cached)
        assert held.cache_logprobs is cached
        got = held.evaluate(sae, hook).to_dict()
        want = evaluate(sae, model, tokens, hook=hook, batch_size=4, progress=False).to_dict()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
            else:
                assert got[key] == value, key


def test_held_out_refuses_activations_that_do_not_match_the_tokens(model):
    with pytest.raises(ValueError, match="one per token without BOS"):
        HeldOut(model, torch.zeros(2, CONTEXT, dtype=torch.long), {"h": torch.zeros(32, 16)})


@pytest.mark.parametrize("name", ["cpu", "paper", "gpu-smoke", "study"])
def test_profiles_load(name):
    cfg = sweep.load_sweep(name)
    assert cfg.grid and sweep.plan(cfg)


def test_cpu_profile_has_three_seeds_and_gpu_smoke_is_its_grid_on_cuda():
    cpu, smoke = sweep.load_sweep("cpu"), sweep.load_sweep("gpu-smoke")
    seeds = {}
    for run in sweep.plan(cpu):
        seeds.setdefault((run.entry.label, run.hook, run.sparsity), set()).add(run.seed)
    assert any(len(s) >= 3 for (label, _, _), s in seeds.items() if label == "sa_gsae_H")
    assert any(len(s) >= 3 for (label, _, _), s in seeds.items() if label == "gated_2H")
    assert smoke.device == "cuda"
    assert [(g.label, g.arch, g.width) for g in smoke.grid] == [
        (g.label, g.arch, g.width) for g in cpu.grid
    ]
    with pytest.raises(FileNotFoundError, match="profiles"):
        sweep.load_sweep("no-such-profile")


def test_frontier_command_writes_tables_json_and_plots(tmp_path, loader, capsys):
    cfg = tiny_sweep(tmp_path)
    sweep.run_sweep(cfg, extra_columns, loader, progress=False)
    out = tmp_path / "frontier"
    assert cli.main(["frontier", str(tmp_path / "results.csv"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sa_gsae_H against each curve" in text
    data = json.loads((out / "frontier.json").read_text())
    assert {c["hook"] for c in data["cells"]} == {"blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"}
    assert [a["label"] for a in data["ablations"]] == ["sa_noaux", "sa_noaux"]
    svgs = sorted(p.name for p in out.glob("*.svg"))
    assert len(svgs) == 4 and all(n.startswith("frontier_tiny_") for n in svgs)
    svg = (out / svgs[0]).read_text()
    assert svg.startswith("<svg") and "<style>" in svg and "gated_2H" in svg
    assert (out / "frontier.md").read_text() == text


def test_sweep_command_runs_a_sweep_file(tmp_path, loader, monkeypatch):
    cfg = tiny_sweep(tmp_path / "out", grid=[{"label": "g", "arch": "gated", "sparsity": [1.0]}])
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    monkeypatch.setattr(sweep, "load_data", loader)
    monkeypatch.setattr(sweep.run_sweep, "__defaults__", (None, loader, False))
    assert cli.main(["sweep", str(path)]) == 0
    rows = sweep.read_results(tmp_path / "out" / "results.json")
    assert len(rows) == 2 and all(not math.isnan(r["r2"]) for r in rows)
    assert all("census_bipolar_fraction" in r for r in rows)  # the polarity columns
    assert isinstance(SAE.load_from_disk(tmp_path / "out" / rows[0]["folder"] / "sae"), SAE)
