"""The GPU run (``benchmarks/gpu/run.sh``) end to end on CPU at a tiny budget, so it cannot rot
between GPU runs: the bundle built without downloads (the pure-Python wheels already cached in
build/gpu-wheels, if any), installed into a fresh folder, the model expanded from its compact
form and fingerprinted, the device tests, the speed benchmark, a tiny science sweep through the
CLI, and its results read back into the fair benchmark's tables."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.gpu import model as compact_model
from benchmarks.gpu import pack
from experiments import fair
from sign_sae.runs import load_sweep, plan

REPO = Path(__file__).resolve().parents[1]
SCIENCE = REPO / "benchmarks" / "gpu" / "science.yaml"
TINY = {
    "base": str(SCIENCE),
    "data": {"device": "cpu", "train_tokens": 4096, "eval_tokens": 512, "ce_tokens": 256,
             "harvest_batch_size": 8},
    "h_expansion": 0.25,
    "train": {"total_steps": 4, "batch_size": 256, "lr_warm_up_steps": 1, "lr_decay_steps": 1,
              "log_every": 2, "dead_window_tokens": 1024},
    "grid": [
        {"label": "sa_gsae_H_lr0.003_x10", "arch": "sa_gsae", "sparsity": [2, 8],
         "options": {"threshold_lr_scale": 10.0}, "train": {"lr": 0.003}},
    ],
}  # fmt: skip
DRY_RUN = {
    "GPU_DEVICE": "cpu",
    "SPEED_ARGS": "--d-in 64 --widths 256 --batch 512 --rounds 1 --steps 1 --no-compile",
    # torch.compile on CPU is tests/test_fused.py's (and slow); on the GPU it is Triton's
    "PYTEST_ARGS": "--deselect tests/test_device.py::test_compiled_kernels_equal_eager_on_the_device",
    **{f"T_{p}": "300" for p in ("PREPARE", "TESTS", "SPEED", "SCIENCE")},
}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=kw.pop("cwd", REPO), capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gpu")
    tiny = tmp / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(TINY))
    bundle, out, work = tmp / "bundle", tmp / "out", tmp / "work"
    _run([sys.executable, "-m", "benchmarks.gpu.bundle", "--out", str(bundle), "--no-download",
          "--wheel-cache", str(REPO / "build" / "gpu-wheels"), "--sweep", str(tiny)])  # fmt: skip
    env = {**os.environ, **DRY_RUN, "GPU_BUNDLE": str(bundle), "GPU_WORK": str(work),
           "PYTHON": sys.executable, "SCIENCE_SWEEP": str(tiny)}  # fmt: skip
    _run(["bash", "benchmarks/gpu/run.sh", str(out)], env=env)
    return {"bundle": bundle, "out": out, "work": work, "tmp": tmp}


def test_every_part_ran_and_what_comes_back_fits(dry_run):
    out = dry_run["out"]
    lines = (out / "status.tsv").read_text().splitlines()[1:]
    assert [ln.split("\t")[:2] for ln in lines] == [
        [p, "0"] for p in ("prepare", "tests", "speed", "science")
    ]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files)


def test_the_wheels_are_installed_fresh_and_the_stand_ins_replace_the_rest(dry_run):
    prep = json.loads((dry_run["out"] / "prepare.json").read_text())["modules"]
    for name in ("datasets", "wandb"):
        assert "benchmarks/gpu/standins" in prep[name]["file"], name
    manifest = json.loads((dry_run["bundle"] / "manifest.json").read_text())
    site = str(dry_run["work"] / "site")
    for wheel, module in (("sae_lens", "sae_lens"), ("transformer_lens", "transformer_lens"),
                          ("gguf", "gguf"), ("pytest", "pytest")):  # fmt: skip
        if any(w.startswith(wheel + "-") for w in manifest["wheels"]):
            assert prep[module]["file"].startswith(site), module


def test_the_expanded_model_is_the_cpu_model_bit_for_bit(dry_run):
    fp = json.loads((dry_run["out"] / "fingerprint.json").read_text())
    manifest = json.loads((dry_run["bundle"] / "manifest.json").read_text())
    assert fp["ok"] and fp["same_tokens"] and fp["top_block_is_nan"]
    assert fp["fp32_max_abs_error"] == 0.0  # same weights, same device: identical
    assert 0 < fp["bf16_rel_error"] <= fp["bf16_rtol"]
    assert fp["embedding_rows_carried"] == manifest["model"]["tokens_kept"]


def test_a_changed_byte_in_the_compact_model_is_refused(dry_run, tmp_path):
    src = dry_run["bundle"] / "model" / "smollm2-compact.safetensors"
    bad = tmp_path / "bad.safetensors"
    shutil.copy(src, bad)
    with bad.open("r+b") as f:  # a byte near the end: inside the last kept tensor's data
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SystemExit, match="sha256"):
        compact_model.expand(bad, tmp_path / "gguf")


def test_the_device_tests_and_the_speed_benchmark_ran(dry_run):
    suite = ET.parse(dry_run["out"] / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 10 and suite.get("failures") == suite.get("errors") == "0"
    speed = json.loads((dry_run["out"] / "speed.json").read_text())
    results = speed["widths"][0]["results"]
    for name in ("SA-GSAE, fused (eager)", "Gated (SAELens step), 2F", "encode SA-GSAE, F"):
        assert results[name]["tokens_per_s"] > 0, name


def test_the_science_comes_back_and_builds_the_fair_tables(dry_run):
    tables = dry_run["tmp"] / "tables"
    runs_dir = tables / "runs" / "fair-gpu"
    n = pack.unpack(dry_run["out"] / "science.tar.gz", runs_dir)
    rows = json.loads((runs_dir / "results.json").read_text())
    assert (
        n == 4 and sorted({r["split"] for r in rows}) == ["test", "validation"] and len(rows) == 4
    )
    for r in rows:  # four steps: R^2 near 0, but measured
        assert -1 < r["r2"] < 1 and r["l0"] > 0 and r["n_tokens"] > 0
        assert r["ce_clean"] is None or r["ce_clean"] != r["ce_clean"]  # NaN: no upper blocks
    for path in (dry_run["work"] / "science").rglob("sequences-*.safetensors"):
        back = load_file(str(runs_dir / path.relative_to(dry_run["work"] / "science")))
        assert all(torch.equal(t, back[k]) for k, t in load_file(str(path)).items())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    _run([sys.executable, "-m", "experiments.fair", "--budget", "gpu", "--stage", "tables"],
         cwd=tables, env=env)  # fmt: skip
    points = (tables / "docs" / "results" / "gpu" / "points-test.csv").read_text()
    assert points.count("sa_gsae_H") == 2  # its two sparsities


def test_the_science_sweep_is_the_fair_gpu_frontier_of_the_key_families():
    cfg = load_sweep(SCIENCE)
    winners = json.loads((REPO / "docs" / "results" / "cpu" / "winners.json").read_text())
    ref = fair.sweep("gpu", [e for e in fair.frontier_grid(winners) if e.label.split("_lr")[0] in fair.KEY and e.hooks == [fair.MAIN_HOOK]])  # fmt: skip
    assert cfg.h_expansion == ref.h_expansion == 8.0 and cfg.train == ref.train
    ours, theirs = cfg.data.__dict__.copy(), ref.data.__dict__.copy()
    assert ours.pop("hooks") == [fair.MAIN_HOOK] and fair.MAIN_HOOK in theirs.pop("hooks")
    assert ours == theirs

    def points(c):
        return sorted(
            (p.entry.label, p.entry.arch, p.entry.width, json.dumps(p.entry.options, sort_keys=True),
             json.dumps(p.entry.train, sort_keys=True), p.sparsity, p.seed)
            for p in plan(c) if p.hook == fair.MAIN_HOOK
        )  # fmt: skip

    assert points(cfg) == points(ref) and len(points(cfg)) == 45
