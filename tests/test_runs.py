"""The run system: config checks before any model load, the plan, run hashes over the resolved
config, the results table, a crashed sweep resuming, ``train`` then ``eval`` (reading only the
eval split) equal to one sweep, profiles and the demo's recipe, the CLI; on a tiny random
transformer, and end to end on SmolLM2."""

import json
import math
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens import SAE, HookedSAETransformer
from sae_lens.saes.gated_sae import GatedSAE
from test_distributed import one_thread
from transformer_lens import HookedTransformerConfig

from sign_sae import SAGSAE, cli, runs
from sign_sae.architectures import make_training_sae
from sign_sae.corpus import HELD_OUT, SPLITS
from sign_sae.errors import SignSAEError
from sign_sae.evaluate import evaluate
from sign_sae.runs import memory
from sign_sae.storage import read_weights
from sign_sae.trainer import TrainConfig

CONTEXT = 16


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: threads only add synchronisation (slow on a busy machine)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny():
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


class TinySource(runs.Inputs):
    """The tiny model and random token rows; records which splits were asked for."""

    def __init__(self, data: runs.DataConfig, model) -> None:
        super().__init__(data, {"tiny": model})
        self.splits: list[str] = []

    def tokens(self, model, split: str) -> torch.Tensor:
        self.splits.append(split)
        n = self.data.train_tokens if split == "train" else self.data.eval_tokens
        g = torch.Generator().manual_seed(SPLITS.index(split) + 1)
        return torch.randint(0, 40, (n // CONTEXT, CONTEXT), generator=g)


def tiny_sweep(out_dir, **changes) -> runs.SweepConfig:
    data = {
        "out_dir": str(out_dir),
        "data": {
            "models": ["tiny"],
            "hooks": ["mlp_out", "attn_out"],
            "context_size": CONTEXT,
            "train_tokens": 1024,
            "eval_tokens": 128,
            "ce_tokens": 64,
        },
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
    return runs.SweepConfig(**data)


def sweep(cfg, tiny, columns=None) -> list[dict]:
    return runs.run_sweep(cfg, columns, TinySource(cfg.data, tiny), progress=False)


def extra_columns(sae, acts):
    return {"n_eval_rows": sum(a.shape[0] for a in acts), "nan_column": float("nan")}


def count_training(monkeypatch) -> list[str]:
    calls = []
    real = runs.execute.train_together

    def counted(trainers, *args, **kwargs):
        calls.extend(t.ckpt_root.parent.name for t in trainers)
        return real(trainers, *args, **kwargs)

    monkeypatch.setattr(runs.execute, "train_together", counted)
    return calls


# ---- configuration and plan ---------------------------------------------------------------
def test_plan_orders_by_entry_and_names_every_run(tmp_path):
    points = runs.plan(tiny_sweep(tmp_path))
    assert [(p.hook, p.name) for p in points] == [
        ("mlp_out", "sa_gsae_H_sp0.1_seed0"),
        ("mlp_out", "sa_gsae_H_sp1_seed0"),
        ("attn_out", "sa_gsae_H_sp0.1_seed0"),
        ("attn_out", "sa_gsae_H_sp1_seed0"),
        ("mlp_out", "gated_2H_sp1_seed0"),
        ("attn_out", "gated_2H_sp1_seed0"),
        ("mlp_out", "sa_noaux_sp1_seed0"),
        ("mlp_out", "sa_noaux_sp1_seed1"),
    ]


def test_run_hash_keys_the_resolved_config(tmp_path, tiny):
    def resolved(out=tmp_path, **changes) -> list[runs.Run]:
        cfg = tiny_sweep(out, **changes)
        return runs.resolve(cfg, cfg.data.models[0], tiny)

    def hashes(**changes) -> list[str]:
        return [r.config_hash for r in resolved(**changes)]

    base = resolved()
    plain = [r.config_hash for r in base]
    assert len(set(plain)) == len(plain)
    assert [(r.hook, r.d_in, r.width) for r in base[3:5]] == [
        ("blocks.1.hook_attn_out", 16, 16),
        ("blocks.1.hook_mlp_out", 16, 32),
    ]
    assert [r.train.seed for r in base[-2:]] == [0, 1]
    train = {"total_steps": 8, "batch_size": 64}
    # bookkeeping and the output folder do not change a result
    assert hashes(train={**train, "log_every": 1, "checkpoint_every": 3}) == plain
    assert hashes(out=tmp_path / "elsewhere") == plain

    def one(**entry) -> str:
        grid = [{"label": "sa", "arch": "sa_gsae", "sparsity": [1.0], **entry}]
        return hashes(grid=grid)[0]

    # the hash is over the resolved config: spelling out a library default changes nothing
    default = one()
    assert one(options={"threshold_lr_scale": 10.0}) == default
    assert one(train={"total_steps": 8}) == default
    changed = [
        one(options={"threshold_lr_scale": 1.0}),
        one(train={"total_steps": 16}),
        one(train={"lr_scales": {"b_*": 2.0}}),
        one(width=2),
        hashes(data={**tiny_sweep(tmp_path).to_dict()["data"], "train_tokens": 2048})[0],
    ]
    assert default not in changed and len(set(changed)) == len(changed)
    # 2 x H at H = d_in is the SAE of 1 x H at H = 2 d_in
    grid = [{"label": "sa", "arch": "sa_gsae", "sparsity": [1.0]}]
    assert hashes(grid=grid, h_expansion=2.0)[0] == one(width=2)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid": [{"label": "x", "arch": "nope", "sparsity": [1]}]}, "arch must be one of"),
        (
            {"grid": [{"label": "x", "arch": "gated", "sparsity": [1], "hooks": ["resid_mid"]}]},
            r"hooks \['resid_mid'\] are not in the sweep's hooks",
        ),
        (
            {"grid": [{"label": "x", "arch": "gated", "sparsity": [1], "k": 3}]},
            r"grid\[\]: unknown field\(s\) \['k'\]",
        ),
        ({"grid": [{"arch": "gated", "sparsity": [1]}]}, r"missing field\(s\) \['label'\]"),
        (
            {"grid": [{"label": "x", "arch": "gated", "sparsity": [1], "train": {"steps": 3}}]},
            r"grid entry 'x': unknown train field\(s\) \['steps'\]",
        ),
        (
            {"grid": [{"label": "x", "arch": "gated", "sparsity": [1], "train": {"lr": 0}}]},
            "grid entry 'x': train: lr must be positive",
        ),
        (
            {"grid": [{"label": "x", "arch": "sa_gsae", "sparsity": [1], "options": {"tie": 1}}]},
            r"grid entry 'x': Unknown config field\(s\) \['tie'\].*known fields are",
        ),
        (
            {"grid": [{"label": "x", "arch": "sa_gsae", "sparsity": [1], "options": {"tied": 2}}]},
            "grid entry 'x': Config field 'tied' should be bool",
        ),
        (
            {"grid": [{"label": "x", "arch": "sa_gsae", "sparsity": [1], "options": {"threshold_param": "x"}}]},
            "grid entry 'x': .*threshold_param",
        ),
        ({"grid": [{"label": "x", "arch": "gated", "sparsity": 1}]}, r"sparsity: expected .*list\[float\], got 1"),
        ({"grid": [{"label": "x", "arch": "gated", "sparsity": []}]}, "non-empty lists of numbers"),
        (
            {"grid": [{"label": "x", "arch": "gated", "sparsity": [1]}] * 2},
            "run x_sp1_seed0 at tiny mlp_out is given twice",
        ),
        ({"grid": []}, "grid must be a non-empty list"),
        ({"h_expansion": 0}, "h_expansion must be a positive number"),
        ({"data": {"models": ["tiny"], "hooks": ["mlp"]}}, "'mlp' is neither a hook kind"),
        ({"data": {"harvest_dtype": "fp8"}}, r"harvest_dtype must be one of \['bfloat16'"),
        ({"data": {"device": "gpu"}}, "data.device must be a torch device"),
        ({"data": {"context_size": 0}}, "data.context_size must be an int >= 2"),
        ({"data": {"ce_tokens": 16384}}, "ce_tokens must not exceed data.eval_tokens"),
        ({"data": {"model": "tiny"}}, r"data: unknown field\(s\) \['model'\]"),
        ({"train": {"total_steps": 0}}, "total_steps must be positive"),
        ({"train": {"autocast_dtype": "fp16"}}, r"autocast_dtype must be one of \['bfloat16'"),
        ({"data": {"forward_dtype": "float16"}}, "forward_dtype must be float32 or bfloat16"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_with_one_line(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny_sweep(tmp_path, **changes)
    assert "\n" not in str(info.value)


def test_cli_refuses_a_bad_file_before_loading_any_model(tmp_path, capsys, monkeypatch):
    """A bad SAE option fails before any model load or harvest, naming the valid options."""

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded or activations harvested")

    monkeypatch.setattr(runs.execute, "load_model", no_model)
    monkeypatch.setattr(runs.execute, "harvest", no_model)
    bad = tiny_sweep(tmp_path).to_dict()
    bad["grid"][1]["options"] = {"l1_coefficent": 3}  # misspelt
    (tmp_path / "bad.yaml").write_text(json.dumps(bad))
    for command in ("train", "eval", "sweep"):
        assert cli.main([command, str(tmp_path / "bad.yaml")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sign-sae: error: ") and err.count("\n") == 1, err
        assert "grid entry 'gated_2H'" in err and "l1_coefficent" in err
        assert "known fields are [" in err and "'l1_coefficient'" in err
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert "No sweep file" in capsys.readouterr().err


# ---- running --------------------------------------------------------------------------------
def test_a_crashed_sweep_resumes_without_redoing_finished_runs(tmp_path, tiny, monkeypatch):
    cfg = tiny_sweep(tmp_path / "crash")
    cfg.data.saes_at_once = 3  # groups of three, each evaluated once trained
    n_runs = len(runs.plan(cfg))
    seen = []

    def crash_on_third_eval(sae, acts):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the sweep dies after training run 3, before its row
        return extra_columns(sae, acts)

    trained = count_training(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg, tiny, crash_on_third_eval)
    assert len(runs.ResultsTable(cfg.out_dir).rows) == 2
    assert len(trained) == 3

    rows = sweep(cfg, tiny, extra_columns)
    assert len(rows) == n_runs
    assert len(trained) == n_runs  # run 3 was trained once, only evaluated again
    assert len({r["config_hash"] for r in rows}) == n_runs
    again = sweep(cfg, tiny, extra_columns)  # nothing left to do
    assert [r["config_hash"] for r in again] == [r["config_hash"] for r in rows]
    assert len(trained) == n_runs

    # The same grid in one go gives the same numbers: resuming changed nothing.
    fresh = sweep(tiny_sweep(tmp_path / "fresh"), tiny, extra_columns)
    by_hash = {r["config_hash"]: r for r in fresh}
    for r in rows:
        assert r["r2"] == pytest.approx(by_hash[r["config_hash"]]["r2"], abs=1e-6)
        assert r["l0"] == pytest.approx(by_hash[r["config_hash"]]["l0"], abs=1e-6)


def test_the_test_split_adds_rows_without_training_and_keeps_per_sequence_sums(
    tmp_path, tiny, monkeypatch
):
    cfg = tiny_sweep(tmp_path)
    validation = sweep(cfg, tiny)
    trained = count_training(monkeypatch)
    cfg.data.eval_split = "test"
    source = TinySource(cfg.data, tiny)
    rows = runs.evaluate_runs(cfg, inputs=source)
    assert trained == [] and source.splits == ["test"]  # evaluation only, on test tokens only
    assert len(rows) == 2 * len(validation)
    by_split = {s: {r["config_hash"]: r for r in rows if r["split"] == s} for s in HELD_OUT}
    assert by_split["validation"].keys() == by_split["test"].keys()
    for h, row in by_split["test"].items():
        assert row["r2"] != by_split["validation"][h]["r2"]  # other tokens, other numbers
        for split, r in ((s, by_split[s][h]) for s in HELD_OUT):
            sums = runs.load_sequences(tmp_path / r["folder"], split)
            assert sums.r2() == pytest.approx(r["r2"], abs=1e-9)
            assert sums.l0() == pytest.approx(r["l0"], abs=1e-9)
    again = runs.evaluate_runs(cfg, inputs=source)  # nothing left to do
    assert source.splits == ["test"] and [r["r2"] for r in again] == [r["r2"] for r in rows]


def test_results_table_has_every_column_in_json_and_csv(tmp_path, tiny):
    cfg = tiny_sweep(tmp_path)
    sweep(cfg, tiny, extra_columns)
    from_json = runs.read_results(tmp_path / "results.json")
    from_csv = runs.read_results(tmp_path / "results.csv")
    assert len(from_json) == len(from_csv) == len(runs.plan(cfg))
    row = from_csv[0]
    for col in runs.COLUMNS + ["n_eval_rows", "folder"]:
        assert (col in row) == (col != "failed"), col  # only failed runs' rows say why
    assert row["nan_column"] is None and from_json[0]["nan_column"] is None
    assert row["config_hash"] == from_json[0]["config_hash"]
    assert row["r2"] == pytest.approx(from_json[0]["r2"])
    assert row["n_eval_rows"] == (128 // CONTEXT) * (CONTEXT - 1)
    assert row["ce_tokens"] == (64 // CONTEXT) * (CONTEXT - 2)
    assert all(r["train_s"] > 0 and r["wall_s"] >= r["train_s"] for r in from_json)
    gated = next(r for r in from_json if r["label"] == "gated_2H")
    assert gated["d_sae"] == 32 and gated["width_factor"] == 2
    assert gated["name"] == "gated_2H_sp1_seed0"
    assert runs.load_sweep(tmp_path).to_dict() == cfg.to_dict()  # sweep.yaml: the config
    # One held-out harvest per model, every hook of the sweep in it; training streamed, so
    # nothing of the training split is on disk (data.cache is off).
    hooks = {p.name for p in runs.activations_dir(tmp_path, "tiny", "validation").iterdir()}
    assert hooks == {"blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"}
    assert not (tmp_path / "activations" / "tiny" / "train").exists()
    assert not (tmp_path / "activations" / "tiny" / "stream").exists()
    # Trained SAEs stay, their checkpoints go; train.json records the run.
    folder = tmp_path / gated["folder"]
    assert folder.parent == tmp_path / "runs" / "tiny" / "mlp_out"
    assert (folder / "sae" / "cfg.json").is_file() and not (folder / "checkpoint").exists()
    record = json.loads((folder / "train.json").read_text())["run"]
    assert record == {k: gated[k] for k in record}


def test_trained_runs_are_named_by_the_shortest_unique_key(tmp_path, tiny):
    cfg = tiny_sweep(tmp_path)
    rows = sweep(cfg, tiny)
    found = runs.trained_runs(tmp_path)
    # labels and names repeat across the two hooks, so the hook kind qualifies them
    assert list(found) == [f"{p.hook}/{p.name}" for p in runs.plan(cfg)]
    assert [r["folder"] for r in found.values()] == [r["folder"] for r in rows]
    table = runs.format_table(rows).splitlines()[2:]  # the printed table names them alike
    assert [line.split(" | ")[0].removeprefix("| ") for line in table] == list(found)
    one_hook = tiny_sweep(
        tmp_path / "one", grid=[{**cfg.to_dict()["grid"][1], "hooks": ["mlp_out"]}]
    )
    sweep(one_hook, tiny)
    assert list(runs.trained_runs(tmp_path / "one")) == ["gated_2H"]


def test_train_then_eval_reads_only_the_validation_split_and_gives_the_sweep(
    tmp_path, tiny, capsys
):
    cfg = tiny_sweep(tmp_path / "split", grid=[{"label": "g", "arch": "gated", "sparsity": [1.0]}])
    source = TinySource(cfg.data, tiny)
    trained = runs.train_runs(cfg, source, progress=False)
    assert source.splits == ["train"] and all(r.trained for r in trained)
    assert not (tmp_path / "split" / "results.json").exists()
    assert runs.train_runs(cfg, source, progress=False) and source.splits == ["train"]  # done

    assert not (Path(cfg.out_dir) / "activations").exists()  # training streamed, nothing kept
    source.splits.clear()
    rows = runs.evaluate_runs(runs.load_sweep(tmp_path / "split"), inputs=source)
    assert source.splits == ["validation"]
    assert not runs.activations_dir(cfg.out_dir, "tiny", "train").exists()
    assert [r["config_hash"] for r in rows] == [r.config_hash for r in trained]

    at_once = sweep(tiny_sweep(tmp_path / "once", grid=cfg.to_dict()["grid"]), tiny)
    for a, b in zip(rows, at_once, strict=True):
        for key in ("r2", "l0", "dead_fraction", "ce_with_sae", "kl_with_sae"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_train_and_eval_commands_run_a_sweep_file(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(runs.execute, "Inputs", lambda data: TinySource(data, tiny))
    cfg = tiny_sweep(tmp_path / "out", grid=[{"label": "g", "arch": "gated", "sparsity": [1.0]}])
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    assert cli.main(["train", str(path)]) == 0
    assert cli.main(["eval", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\nvalidation metrics of 2 runs (") and "results.csv):" in out
    table = out.split(":\n\n", 1)[1]
    assert table.startswith("| name | architecture | d_sae |")
    assert "| mlp_out/g_sp1_seed0 | gated | 16 |" in table
    assert "| attn_out/g_sp1_seed0 | gated | 16 |" in table


def test_sweep_command_runs_a_sweep_file(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(runs.execute, "Inputs", lambda data: TinySource(data, tiny))
    cfg = tiny_sweep(tmp_path / "out", grid=[{"label": "g", "arch": "gated", "sparsity": [1.0]}])
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    assert cli.main(["sweep", str(path)]) == 0
    rows = runs.read_results(tmp_path / "out" / "results.json")
    assert len(rows) == 2 and all(not math.isnan(r["r2"]) for r in rows)
    assert all("census_bipolar_fraction" in r for r in rows)  # the polarity columns
    assert isinstance(SAE.load_from_disk(tmp_path / "out" / rows[0]["folder"] / "sae"), SAE)


def test_frontier_command_writes_tables_json_and_plots(tmp_path, tiny, capsys):
    sweep(tiny_sweep(tmp_path), tiny, extra_columns)
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


# ---- profiles ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "cpu", "paper", "gpu-smoke"])
def test_profiles_load(name):
    assert name in runs.profiles()
    cfg = runs.load_sweep(name)
    assert cfg.grid and runs.plan(cfg)


def test_the_example_run_file_loads_and_train_help_points_to_it(capsys):
    """examples/run.yaml sets every data and train field (so it documents them all) and is
    a valid sweep; ``sign-sae train --help`` names it."""
    path = Path(__file__).parent.parent / "examples" / "run.yaml"
    cfg = runs.load_sweep(path)
    raw = yaml.safe_load(path.read_text())
    unset = {f.name for f in fields(runs.DataConfig)} - set(raw["data"]) - {"harvest_batch_size"}
    assert unset <= {"eval_batch_size"}, unset
    assert set(raw["train"]) >= {"autocast_dtype", "compile", "total_steps", "batch_size", "lr"}
    assert [p.entry.arch for p in runs.plan(cfg)] == ["sa_gsae"]
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "examples/run.yaml" in capsys.readouterr().out


def test_cpu_profile_has_three_seeds_and_gpu_smoke_is_its_grid_on_cuda():
    cpu, smoke = runs.load_sweep("cpu"), runs.load_sweep("gpu-smoke")
    seeds = {}
    for p in runs.plan(cpu):
        seeds.setdefault((p.entry.label, p.hook, p.sparsity), set()).add(p.seed)
    assert any(len(s) >= 3 for (label, _, _), s in seeds.items() if label == "sa_gsae_H")
    assert any(len(s) >= 3 for (label, _, _), s in seeds.items() if label == "gated_2H")
    # base: cpu, with one data field changed: the rest of cpu's data and recipe are kept
    assert smoke.data == runs.DataConfig(**{**cpu.to_dict()["data"], "device": "cuda"})
    assert smoke.train == cpu.train and smoke.grid == cpu.grid
    with pytest.raises(FileNotFoundError, match="profiles"):
        runs.load_sweep("no-such-profile")


# ---- SmolLM2 end to end ---------------------------------------------------------------------
def test_demo_profile_trains_the_demo_recipe(model):
    """The demo trains SA-GSAE at H and Gated at 2H as ``make demo`` did before the run system
    was one, seed 0, the sparsity warm-up over 10% of the steps; for five minutes, 100k training
    tokens (three
    epochs, the schedule scaled with them), a bfloat16 forward and bfloat16 autocast, and CE/KL
    on 4,096 tokens (docs/demo.md); both at the fair benchmark's tuned rates (docs/results.md)."""
    cfg = runs.load_sweep("demo")
    assert (cfg.data.text, cfg.data.context_size) == ("shakespeare", 128)
    budgets = (cfg.data.train_tokens, cfg.data.eval_tokens, cfg.data.ce_tokens)
    assert budgets == (100_000, 16_384, 4096)
    assert (cfg.data.harvest_dtype, cfg.data.forward_dtype) == ("float32", "bfloat16")
    sa, gated = runs.resolve(cfg, cfg.data.models[0], model)
    recipe = TrainConfig(
        total_steps=288,
        batch_size=1024,
        lr=3e-3,
        lr_warm_up_steps=14,
        lr_decay_steps=58,
        checkpoint_every=100,
        log_every=15,
        autocast_dtype="bfloat16",
    )
    meta = {"model_name": "smollm2-135m", "context_size": 128, "prepend_bos": True}
    meta["hook_name"] = "blocks.15.hook_mlp_out"
    for run, arch, width, coefficient in ((sa, "sa_gsae", 1152, 5.0), (gated, "gated", 2304, 5.0)):
        scales = {"b_gate": 10.0} if arch == "gated" else {}
        assert run.hook == meta["hook_name"] and run.width == width
        assert run.train == replace(recipe, lr_scales=scales)
        before = make_training_sae(arch, 576, width, coefficient, warm_up_steps=28, metadata=meta)
        assert run.sae_config().to_dict() == before.cfg.to_dict()


@pytest.fixture(scope="module")
def smollm_run(model, tmp_path_factory):
    """Two SAEs on SmolLM2's mid-layer MLP-out: SA-GSAE at H = 288 and Gated at 2H."""
    cfg = runs.SweepConfig(
        out_dir=str(tmp_path_factory.mktemp("run")),
        data={
            "models": ["smollm2-135m"],
            "hooks": ["mlp_out"],
            "context_size": 64,
            "train_tokens": 64 * 96,
            "eval_tokens": 64 * 4,
            "ce_tokens": 64 * 4,
            "epochs": 6,  # 60 x 512 rows of 6,048 per epoch
            "cache": True,  # epochs 2-6 read the disk
            "buffer_tokens": 2048,
        },
        h_expansion=0.5,
        train={"total_steps": 60, "batch_size": 512, "lr": 2e-3, "log_every": 20},
        grid=[
            {"label": "sa", "arch": "sa_gsae", "sparsity": [3.0]},
            {"label": "gated", "arch": "gated", "width": 2, "sparsity": [3.0]},
        ],
    )
    source = runs.Inputs(cfg.data, {"smollm2-135m": model})
    rows = runs.run_sweep(cfg, inputs=source, progress=False)
    return cfg, rows, source.tokens(model, "validation")


def test_real_model_sweep_trains_saves_reloads_and_evaluates(smollm_run):
    cfg, rows, _ = smollm_run
    out = cfg.out_dir
    # The stream's cache: 3 chunks of 32 sequences (data.buffer_tokens 2048 // 63 rows), BOS
    # positions left out; over 6 epochs the model ran once per chunk.
    (cache,) = runs.activations_dir(out, "smollm2-135m", "stream").iterdir()
    shards = sorted((cache / "blocks.15.hook_mlp_out").glob("chunk_*.safetensors"))
    sizes = [tuple(read_weights(p)["blocks.15.hook_mlp_out"].shape) for p in shards]
    assert sizes == [(32 * 63, 576)] * 3
    by_label = {r["label"]: r for r in rows}
    for r in rows:
        stream = json.loads((Path(out) / r["folder"] / "train.json").read_text())["stream"]
        assert stream["forwards"] == 3 and stream["rank_tokens_per_epoch"] == 96 * 63
    assert type(SAE.load_from_disk(f"{out}/{by_label['sa']['folder']}/sae")) is SAGSAE
    assert type(SAE.load_from_disk(f"{out}/{by_label['gated']['folder']}/sae")) is GatedSAE
    for r in rows:
        assert r["hook"] == "blocks.15.hook_mlp_out" and r["n_tokens"] == 4 * 63
        assert 0.0 < r["r2"] < 1.0 and r["l0"] > 0
        # the real model predicts far better than with its MLP output zeroed
        assert r["ce_clean"] < r["ce_zero_ablation"]
        # ...and better with the SAE's reconstruction than with nothing there
        assert r["ce_with_sae"] < r["ce_zero_ablation"] and r["ce_loss_recovered"] > 0
        assert r["kl_with_sae"] > 0
    assert by_label["gated"]["n_params"] > 1.9 * by_label["sa"]["n_params"]
    assert runs.read_results(f"{out}/results.json") == rows
    assert "| sa | sa_gsae | 288 |" in runs.format_table(rows)


def test_real_model_rows_equal_evaluate_on_the_fly(smollm_run, model):
    """The sweep's rows (cached eval harvest) equal ``evaluate`` reading the model directly."""
    cfg, rows, eval_tokens = smollm_run
    for row in rows:
        sae = SAE.load_from_disk(f"{cfg.out_dir}/{row['folder']}/sae")
        alone = evaluate(sae, model, eval_tokens).to_dict()
        numbers = {k: v for k, v in alone.items() if isinstance(v, float)}
        assert {k: row[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)


def test_a_plan_too_big_for_memory_is_refused_with_the_plan_that_fits(tmp_path, tiny, monkeypatch):
    cfg = tiny_sweep(tmp_path)
    every = runs.resolve(cfg, cfg.data.models[0], tiny)
    need = memory.need_bytes(every, cfg.data)
    one = max(memory.sae_bytes(r) for r in every)
    fixed = memory.stream_bytes(every, cfg.data) + max(memory.step_bytes(r) for r in every)
    free = int(1.2 * (fixed + 3.5 * one))  # room for three
    with pytest.raises(
        SignSAEError, match=r"8 SAE\(s\) at once need .* set data.saes_at_once to 3"
    ):
        memory.check(every, cfg.data, free=free)
    memory.check(every, cfg.data, free=int(1.01 * need))  # fits
    # through the command: refused before any training, then trains with the advised plan
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    calls = count_training(monkeypatch)
    with pytest.raises(SignSAEError, match="saes_at_once to 3"):
        sweep(cfg, tiny)
    assert calls == []
    cfg.data.saes_at_once = 3
    assert len(sweep(cfg, tiny)) == len(every)


def test_an_out_of_memory_during_training_is_one_line_of_advice(tmp_path, tiny, monkeypatch):
    def oom(trainers, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runs.execute, "train_together", oom)
    with pytest.raises(
        SignSAEError, match=r"Out of memory .* 8 SAE\(s\) at once: set data.saes_at_once to 4"
    ):
        sweep(tiny_sweep(tmp_path), tiny)


def test_a_folder_records_every_grid_it_ran_and_a_bad_file_changes_nothing(tmp_path, tiny):
    out = tmp_path / "shared"
    first = tiny_sweep(out, grid=[{"label": "g", "arch": "gated", "sparsity": [1.0]}])
    second = tiny_sweep(out, grid=[{"label": "s", "arch": "sa_gsae", "sparsity": [1.0]}])
    for cfg in (first, second):
        sweep(cfg, tiny)
    recorded = runs.load_sweep(out)
    assert [g.label for g in recorded.grid] == ["g", "s"]
    before = (out / runs.SWEEP_FILE).read_text()
    # the folder's own config evaluates every run of both grids on another split
    recorded.data.eval_split = "test"
    rows = runs.evaluate_runs(recorded, inputs=TinySource(recorded.data, tiny))
    assert sorted(r["label"] for r in rows if r["split"] == "test") == ["g", "g", "s", "s"]
    # a hook the model lacks is refused before the folder's sweep.yaml is touched
    bad = tiny_sweep(out, grid=second.to_dict()["grid"])
    bad.data.hooks = ["blocks.7.hook_mlp_out"]
    with pytest.raises(SignSAEError, match="blocks.7.hook_mlp_out"):
        sweep(bad, tiny)
    assert (out / runs.SWEEP_FILE).read_text() == before


def test_a_diverging_run_fails_alone_with_a_row_that_says_why_and_a_rerun_retries_it(
    tmp_path, tiny, monkeypatch
):
    cfg = tiny_sweep(tmp_path, grid=[
        {"label": "ok", "arch": "sa_gsae", "sparsity": [1.0]},
        {"label": "bad", "arch": "sa_gsae", "sparsity": [1.0], "train": {"lr": 1.0e30}},
    ])  # fmt: skip
    cfg.data.hooks = ["mlp_out"]
    with pytest.raises(SignSAEError, match=r"1 run\(s\) failed, the others finished.*bad_sp1"):
        sweep(cfg, tiny)
    table = runs.ResultsTable(tmp_path)
    assert [r["label"] for r in table.rows] == ["ok"]  # readers see only evaluated rows
    [row] = table.failed
    why = json.loads(
        next(tmp_path.glob(f"runs/*/*/bad_sp1_seed0_*/{runs.FAILED_FILE}")).read_text()
    )
    assert row["label"] == "bad" and "the loss is" in row["failed"] and row["steps"] == why["step"]
    assert "r2" not in row and [
        r["label"] for r in runs.read_results(tmp_path / "results.csv")
    ] == ["ok"]
    calls = count_training(monkeypatch)
    with pytest.raises(SignSAEError, match="1 run"):
        sweep(cfg, tiny)
    assert [c.rsplit("_", 1)[0] for c in calls] == [
        "bad_sp1_seed0"
    ]  # the rerun retried only the failed run
    assert len(runs.ResultsTable(tmp_path).failed) == 1  # still one row for it
    # an evaluated row of the run takes the failed row's place
    runs.ResultsTable(tmp_path).add({**row, "failed": None, "r2": 0.5})
    assert sorted(r["label"] for r in runs.ResultsTable(tmp_path).rows) == ["bad", "ok"]
    assert runs.ResultsTable(tmp_path).failed == []
