"""The real-model pipeline end to end: harvest SmolLM2 activations, train, save, reload, evaluate."""

import json

import pytest
from sae_lens import SAE
from sae_lens.saes.gated_sae import GatedSAE

from sign_sae import SAGSAE, cli
from sign_sae.evaluate import evaluate
from sign_sae.pipeline import RunConfig, SAESpec, evaluate_run, format_table, prepare, train_saes
from sign_sae.training import TrainConfig


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        out_dir=str(out),
        hook="mlp_out",
        context_size=64,
        train_tokens=64 * 96,
        eval_tokens=64 * 4,
        saes=[
            SAESpec("sa", "sa_gsae", width=256, sparsity=3.0),
            SAESpec("gated", "gated", width=512, sparsity=3.0),
        ],
        train=TrainConfig(total_steps=60, batch_size=512, lr=2e-3, log_every=20),
    )
    model, hook, acts, eval_tokens = prepare(cfg, model=model)
    train_saes(cfg, model, hook, acts)
    rows = evaluate_run(cfg, model, eval_tokens)
    return cfg, hook, acts, rows, eval_tokens


def test_pipeline_trains_saves_reloads_and_evaluates(run):
    cfg, hook, acts, rows, _ = run
    assert hook == "blocks.15.hook_mlp_out" and acts.shape[1] == 576
    assert acts.shape[0] == 96 * 63  # BOS positions are not harvested
    by_name = {r["name"]: r for r in rows}
    assert type(SAE.load_from_disk(f"{cfg.out_dir}/sa/sae")) is SAGSAE
    assert type(SAE.load_from_disk(f"{cfg.out_dir}/gated/sae")) is GatedSAE
    for r in rows:
        assert r["n_tokens"] == 4 * 63
        assert 0.0 < r["r2"] < 1.0 and r["l0"] > 0
        # the real model predicts far better than with its MLP output zeroed
        assert r["ce_clean"] < r["ce_zero_ablation"]
        # ...and better with the SAE's reconstruction than with nothing there
        assert r["ce_with_sae"] < r["ce_zero_ablation"] and r["ce_loss_recovered"] > 0
        assert r["kl_with_sae"] > 0
    assert by_name["gated"]["n_params"] > 1.9 * by_name["sa"]["n_params"]
    with open(f"{cfg.out_dir}/results.json") as f:
        assert json.load(f) == rows
    assert "| sa | sa_gsae | 256 |" in format_table(rows)


def test_finished_runs_are_skipped(run, caplog):
    cfg, hook, acts, _, _ = run
    with caplog.at_level("INFO"):
        train_saes(cfg, None, hook, acts)
    assert "sa already trained; skipping" in caplog.text


def test_shared_forwards_give_the_same_numbers_as_one_sae_at_a_time(run, model):
    cfg, _, _, rows, eval_tokens = run
    alone = evaluate(
        SAE.load_from_disk(f"{cfg.out_dir}/sa/sae"), model, eval_tokens, progress=False
    )
    numbers = {k: v for k, v in alone.to_dict().items() if isinstance(v, float)}
    assert {k: rows[0][k] for k in numbers} == pytest.approx(numbers, rel=1e-6)


def test_config_files_round_trip_and_reject_unknown_fields(tmp_path):
    cfg = RunConfig(saes=[SAESpec("x", "topk", width=64, sparsity=8)])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert RunConfig.load(path) == cfg
    (tmp_path / "bad.yaml").write_text("hook: mlp_out\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match=r"Unknown RunConfig field\(s\) \['learning_rate'\]"):
        RunConfig.load(tmp_path / "bad.yaml")


def test_cli_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("saes: [{name: a, arch: relu}]\n")
    assert cli.main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sign-sae: error:") and "Traceback" not in err
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
