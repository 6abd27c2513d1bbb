"""Faults of the machine and damaged records: a full disk, quota or read-only file system at
every writer (injected, and for real on a small tmpfs where the tests run as root), a resume
after space is freed, files the toolkit wrote and reads back damaged in type or shape,
unavailable devices and a diverging loss; each ends in one line (docs/reliability.md)."""

import contextlib
import errno
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_reliability
import torch
from safetensors import SafetensorError
from test_reliability import TinySource, cli_error, sweep_yaml, tiny_trainer

from analyses.report import write as write_report
from analyses.report.layout import Report
from sign_sae import runs, storage
from sign_sae.architectures import make_training_sae
from sign_sae.devices import check_device
from sign_sae.errors import DivergedError, SignSAEError
from sign_sae.export import export_run
from sign_sae.harvest import METADATA_FILE, ActivationCache, InvalidCacheError, harvest
from sign_sae.models import hook_name, mid_layer
from sign_sae.storage import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    read_table,
    save_sae,
    staged_folder,
    write_folder,
)
from sign_sae.trainer import TensorBatches, TrainConfig, checkpoints, train

NO_SPACE = "no space left on the device writing"
# the fixtures of the kill / resume tests: the tiny run's uninterrupted weights, a tiny model
straight, tiny_model = test_reliability.straight, test_reliability.tiny_model


def leftovers(root: Path) -> list[Path]:
    """Temporary files or folders of a writer under ``root``."""
    return sorted(root.rglob(".*.tmp"))


# ---- every writer, each taking the folder it writes into and a context that makes the disk
# refuse writes; it returns the path the error must name.
def _text(d: Path, refuse) -> Path:
    with refuse():
        atomic_write_text(d / "notes.txt", "x" * 5000)
    return d / "notes.txt"


def _bytes(d: Path, refuse) -> Path:
    with refuse():
        atomic_write_bytes(d / "seq.bin", bytes(5000))
    return d / "seq.bin"


def _folder(d: Path, refuse) -> Path:
    with refuse():
        write_folder(d / "f", {"w.safetensors": {"w": torch.ones(64, 64)}, "x.json": {"a": 1}})
    return d / "f"


def _staged(d: Path, refuse) -> Path:
    with refuse(), staged_folder(d / "g") as tmp:
        (tmp / "a.txt").write_bytes(bytes(5000))
    return d / "g"


def _sae(d: Path, refuse) -> Path:
    sae = make_training_sae("gated", 8, 16, 1.0)  # SAELens's own save_model inside the stage
    with refuse():
        save_sae(sae, d / "sae")
    return d / "sae"


def _checkpoint(d: Path, refuse) -> Path:
    trainer = tiny_trainer(d)
    with refuse():
        trainer.save_checkpoint(0.0)
    return d / "checkpoint" / "step_000000000"


def _results(d: Path, refuse) -> Path:
    table = runs.ResultsTable(d)
    with refuse():
        table.add({"config_hash": "a", "split": "validation", "r2": 0.5})
    return d / runs.RESULTS_JSON


def _report(d: Path, refuse) -> Path:
    with refuse():
        write_report(Report(title="sweep", facts=[("rows", "1")], rows=[]), d / "report.html")
    return d / "report.html"


def _export(d: Path, refuse) -> Path:
    source = save_sae(make_training_sae("sa_gsae", 8, 16, 1.0), d / "source")
    with refuse():
        export_run(source, d / "release")
    return d / "release" / "source"


WRITERS: dict[str, Callable[[Path, Callable], Path]] = {
    "atomic_write_text": _text,
    "atomic_write_bytes": _bytes,
    "write_folder": _folder,
    "staged_folder": _staged,
    "save_sae": _sae,
    "checkpoint": _checkpoint,
    "results table": _results,
    "report": _report,
    "export": _export,
}


def injected(code: int) -> Callable[[], contextlib.AbstractContextManager]:
    """A context in which the disk refuses data with ``code``: ``fsync`` fails as the kernel
    reports a full disk for written data, and safetensors fails as its Rust writer does."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    def rust(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} "
                              f"(os error {code})")  # fmt: skip

    @contextlib.contextmanager
    def refuse() -> Iterator[None]:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "fsync", fail)
            m.setattr(storage, "save_file", rust)
            m.setattr("sae_lens.saes.sae.save_file", rust)
            yield

    return refuse


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_at_every_writer_is_one_line_and_leaves_nothing(tmp_path, writer):
    with pytest.raises(SignSAEError) as e:
        WRITERS[writer](tmp_path, injected(errno.ENOSPC))
    target = e.value.args[0]
    assert target.startswith(NO_SPACE) and "\n" not in target
    assert "run the same command again; it resumes where it stopped" in target
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "checkpoint" / "latest").exists()
    WRITERS[writer](tmp_path, contextlib.nullcontext)  # with space, the same write succeeds


def test_the_error_names_the_path_and_the_bytes_needed(tmp_path):
    refuse = injected(errno.ENOSPC)
    with pytest.raises(SignSAEError, match=f"{NO_SPACE} {tmp_path / 'seq.bin'} "
                       r"\(the write needed 5,000 bytes\): free some space"):  # fmt: skip
        _bytes(tmp_path, refuse)
    with pytest.raises(SignSAEError, match=rf"{tmp_path / 'f'} \(the write needed 16,3\d\d bytes"):
        _folder(tmp_path, refuse)  # 64 x 64 float32 and the JSON


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.EDQUOT, "over the disk quota writing .*raise the quota"),
        (errno.EROFS, "read-only file system writing .*make it writable"),
        (errno.EACCES, "permission denied writing .*fix the permissions"),
    ],
)
def test_quota_read_only_and_no_permission_are_named(tmp_path, code, words):
    with pytest.raises(SignSAEError, match=words):
        _folder(tmp_path, injected(code))
    assert leftovers(tmp_path) == []


def test_other_write_errors_keep_their_type(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(OSError, match="I/O") as e:
        atomic_write_text(tmp_path / "a.txt", "x")
    assert not isinstance(e.value, SignSAEError) and leftovers(tmp_path) == []


def test_a_full_disk_while_the_cache_is_written(model, eval_tokens, tmp_path, monkeypatch):
    hook = hook_name("mlp_out", mid_layer(model))
    clean = harvest(model, eval_tokens[:2], [hook], tmp_path / "clean")[hook].load()
    with monkeypatch.context() as m:
        m.setattr("safetensors.torch.save_file", _rust_full)
        needs = f"{len(clean) * clean.shape[1] * 4:,} bytes"  # one float32 shard
        with pytest.raises(SignSAEError, match=rf"{NO_SPACE} .*shard_00000.safetensors \(the "
                           rf"write needed {needs}\)"):  # fmt: skip
            harvest(model, eval_tokens[:2], [hook], tmp_path / "acts")
    assert leftovers(tmp_path) == []
    with pytest.raises(InvalidCacheError):  # never read half-written
        ActivationCache.open(tmp_path / "acts" / hook)
    again = harvest(model, eval_tokens[:2], [hook], tmp_path / "acts")[hook]
    assert torch.equal(again.load(), clean)


def _rust_full(*args, **kwargs):
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


# ---- the same on a real, small file system -------------------------------------------------
@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only; skipped where mounting is not possible)."""
    where = tmp_path / "fs"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@contextlib.contextmanager
def filled(root: Path) -> Iterator[None]:
    """``root``'s file system full (a filler file takes every free block) for the block."""
    filler = root / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(65536))
            f.flush()
    try:
        yield
    finally:
        filler.unlink()


@pytest.mark.parametrize("writer", WRITERS)
def test_a_real_full_disk_at_every_writer(small_fs, writer):
    with pytest.raises(SignSAEError, match=NO_SPACE):
        WRITERS[writer](small_fs, lambda: filled(small_fs))
    assert leftovers(small_fs) == []
    WRITERS[writer](small_fs, contextlib.nullcontext)


def test_a_real_read_only_file_system(small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(SignSAEError, match="read-only file system writing"):
        _text(small_fs, contextlib.nullcontext)


def test_a_run_resumes_bit_identical_after_space_is_freed(small_fs, straight, caplog):
    tiny_trainer(small_fs).run(stop_at=2)
    with filled(small_fs), pytest.raises(SignSAEError, match=rf"{NO_SPACE} .*step_000000004"):
        tiny_trainer(small_fs).run(resume=True)
    assert [p.name for p in checkpoints(small_fs / "checkpoint")] == ["step_000000002"]
    assert leftovers(small_fs) == []
    resumed = tiny_trainer(small_fs)
    resumed.run(resume=True)  # space freed: the same command again
    for key, value in straight.items():
        assert torch.equal(resumed.sae.state_dict()[key], value), key


def test_an_injected_full_disk_mid_run_resumes_bit_identical(tmp_path, straight, monkeypatch):
    real = storage.save_file

    def full_at_step_4(tensors, path, *args, **kwargs):
        if "step_000000004" in str(path):
            _rust_full()
        return real(tensors, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(storage, "save_file", full_at_step_4)
        with pytest.raises(SignSAEError, match=rf"{NO_SPACE} .*step_000000004 \(the write"):
            tiny_trainer(tmp_path).run()
    assert [p.name for p in checkpoints(tmp_path / "checkpoint")] == ["step_000000002"]
    assert leftovers(tmp_path) == []
    resumed = tiny_trainer(tmp_path)
    resumed.run(resume=True)
    for key, value in straight.items():
        assert torch.equal(resumed.sae.state_dict()[key], value), key


# ---- what the toolkit wrote, it checks when it reads ---------------------------------------
@pytest.mark.parametrize(
    "damage",
    [b"[]", b"null", b'{"cfg.json": 5}', b'{"cfg.json": "ab', b"\xff\xfe", None],
    ids=["array", "null", "number for a hash", "truncated", "not UTF-8", "deleted"],
)
def test_a_damaged_checkpoint_manifest_falls_back_to_the_previous_one(
    tmp_path, damage, straight, caplog
):
    tiny_trainer(tmp_path).run(stop_at=4)
    newest = checkpoints(tmp_path / "checkpoint")[0] / MANIFEST
    newest.unlink() if damage is None else newest.write_bytes(damage)
    resumed = tiny_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sign_sae.trainer"):
        resumed.run(resume=True)
    assert "checkpoint step_000000004 is damaged" in caplog.text
    assert "resuming from the previous good checkpoint step_000000002" in caplog.text
    for key, value in straight.items():
        assert torch.equal(resumed.sae.state_dict()[key], value), key


def test_read_json_checks_type_and_fields(tmp_path):
    path = tmp_path / "train.json"
    fields = {"run": dict, "steps": int, "wall_s": float}
    fix = "delete the run folder and train it again."
    path.write_text(json.dumps({"run": {}, "steps": 4, "wall_s": 2}))
    assert read_json(path, dict, fields, fix)["steps"] == 4  # an int is a number
    path.write_text(json.dumps({"run": {}, "steps": "4"}))
    with pytest.raises(SignSAEError, match=r"train.json: lacks \['wall_s'\], steps is a string, "
                       r"not a number; delete the run folder"):  # fmt: skip
        read_json(path, dict, fields, fix)
    path.write_text("[1, 2]")
    with pytest.raises(SignSAEError, match="should hold a JSON object, not array; delete"):
        read_json(path, dict, fields, fix)


def test_results_tables_are_checked_on_read(tmp_path):
    table = runs.ResultsTable(tmp_path)
    table.add({"config_hash": "a", "split": "validation", "r2": 0.5, "name": "é"})
    assert read_table(tmp_path / runs.RESULTS_CSV) == read_table(tmp_path / runs.RESULTS_JSON)
    fix = f"delete it and run `sign-sae eval {tmp_path}` to write it again"
    good = (tmp_path / runs.RESULTS_JSON).read_text()
    for text, words in (
        (good[: len(good) // 2], "is not valid JSON"),
        ('{"r2": 1}', "should hold a JSON array, not object"),
        ("[1]", "row 0 is not a JSON object"),
    ):
        (tmp_path / runs.RESULTS_JSON).write_text(text)
        with pytest.raises(SignSAEError, match=f"{words}.*{fix}"):
            read_table(tmp_path / runs.RESULTS_JSON)
    (tmp_path / runs.RESULTS_CSV).write_bytes("name\né\n".encode("latin-1"))
    with pytest.raises(SignSAEError, match=f"results.csv is not a UTF-8 CSV table.*{fix}"):
        read_table(tmp_path / runs.RESULTS_CSV)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: [],
        lambda m: {**m, "shards": 3},
        lambda m: {**m, "shards": [1]},
        lambda m: {k: v for k, v in m.items() if k != "d_in"},
        lambda m: {**m, "n_tokens": "126"},
    ],
    ids=["array", "shards a number", "shard a number", "no d_in", "n_tokens a string"],
)
def test_damaged_cache_metadata_is_named_and_the_cache_rebuilt(
    model, eval_tokens, tmp_path, edit, caplog
):
    hook = hook_name("mlp_out", mid_layer(model))
    cache = harvest(model, eval_tokens[:2], [hook], tmp_path)[hook]
    clean = cache.load()
    meta = cache.path / METADATA_FILE
    meta.write_text(json.dumps(edit(json.loads(meta.read_text()))))
    with pytest.raises(InvalidCacheError, match=f"{METADATA_FILE}.*run harvest"):
        ActivationCache.open(cache.path)
    with caplog.at_level(logging.WARNING, logger="sign_sae.harvest"):
        again = harvest(model, eval_tokens[:2], [hook], tmp_path)[hook]
    assert "Rebuilding activation cache" in caplog.text
    assert torch.equal(again.load(), clean)


# ---- devices and a diverging loss ----------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_absent_cuda_device_is_one_line(tmp_path, capsys):
    with pytest.raises(SignSAEError, match="The device 'cuda:1' is not available: .* no CUDA GPU"):
        check_device("cuda:1")
    path = sweep_yaml(tmp_path / "s.yaml")
    path.write_text(path.read_text().replace("ce_tokens: 32", "ce_tokens: 32, device: cuda"))
    err = cli_error(["train", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "The device 'cuda' is not available" in err and "Use data.device: cpu" in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_an_absent_mps_device_is_one_line(tmp_path):
    with pytest.raises(SignSAEError, match="The device 'mps' is not available"):
        check_device("mps")
    with pytest.raises(SignSAEError, match="'gpu' is not a torch device"):
        check_device("gpu")
    sae = save_sae(make_training_sae("sa_gsae", 8, 16, 1.0), tmp_path / "sae")
    with pytest.raises(SignSAEError, match="The device 'mps' is not available"):
        storage.load_sae(sae, device="mps")


def test_a_diverging_loss_is_one_line_naming_the_step(tmp_path, tiny_model, capsys, monkeypatch):
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", 8, 16, 0.5)
    with pytest.raises(DivergedError, match=r"Step \d+: the loss is (nan|inf)") as e:
        train(sae, TensorBatches(torch.randn(512, 8), 64), TrainConfig(lr=1e30, batch_size=64),
              progress=False)  # fmt: skip
    assert e.value.step > 0
    monkeypatch.setattr(runs.execute, "load_model", lambda name, device: tiny_model)
    monkeypatch.setattr(runs.Inputs, "tokens", TinySource.tokens)
    path = sweep_yaml(tmp_path / "s.yaml", "{lr: 1.0e30, total_steps: 7, batch_size: 64}")
    err = cli_error(["train", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "the loss is" in err and "lower the learning rate" in err


# ---- one line at the command line ----------------------------------------------------------
def test_cli_one_line_for_a_full_disk_during_training(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setattr(runs.execute, "load_model", lambda name, device: tiny_model)
    monkeypatch.setattr(runs.Inputs, "tokens", TinySource.tokens)
    monkeypatch.setattr(storage, "save_file", _rust_full)
    path = sweep_yaml(tmp_path / "s.yaml", "{total_steps: 4, batch_size: 64, checkpoint_every: 2}")
    err = cli_error(["train", str(path), "--out", str(tmp_path / "out")], capsys)
    assert NO_SPACE in err and "checkpoint" in err and "(the write needed" in err
    assert leftovers(tmp_path) == []


def test_cli_one_line_for_damaged_records(tmp_path, capsys):
    folder = save_sae(make_training_sae("sa_gsae", 8, 16, 1.0), tmp_path / "sae")
    (folder / MANIFEST).write_text("[]")
    err = cli_error(["export", str(folder), str(tmp_path / "release")], capsys)
    assert f"{folder / MANIFEST} should hold a JSON object, not array" in err
    runs.ResultsTable(tmp_path).add({"config_hash": "a", "split": "validation", "r2": 0.5})
    (tmp_path / runs.RESULTS_JSON).write_text('[{"config_hash": "a", "r2"')
    err = cli_error(["frontier", str(tmp_path / runs.RESULTS_JSON)], capsys)
    assert "results.json is not valid JSON" in err and "sign-sae eval" in err
    (tmp_path / runs.RESULTS_CSV).write_bytes(b"name,r2\n\xff,1\n")
    err = cli_error(["frontier", str(tmp_path / runs.RESULTS_CSV)], capsys)
    assert "results.csv is not a UTF-8 CSV table" in err


# ---- a missing input names the command that makes it ---------------------------------------
def test_saebench_without_the_fair_runs_says_how_to_make_them(tmp_path, monkeypatch):
    from benchmarks import saebench

    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/
    with pytest.raises(SystemExit) as e:
        saebench.main(["--runs", "runs/fair-cpu"])  # before sae-bench is imported
    line = str(e.value)
    assert line.startswith("runs/fair-cpu/results.json is missing") and "\n" not in line
    assert "`OMP_WAIT_POLICY=PASSIVE python -m experiments.fair`" in line
    assert "leave out --runs to run on the shipped release sign-sae-smollm2-135m" in line


def test_saebench_runs_on_the_shipped_release_by_default(tmp_path, monkeypatch, caplog):
    from benchmarks import saebench

    monkeypatch.chdir(tmp_path)
    args = saebench.parse_args([])
    assert args.runs is None and args.release == "sign-sae-smollm2-135m"
    with caplog.at_level(logging.INFO, logger="saebench"):
        chosen, missing = saebench.chosen_saes(args)
    assert "(--runs runs/fair-cpu) are not here" in caplog.text and missing == []
    assert [r["name"] for r in chosen] == [args.hook, f"{args.hook}/gated_2H"]
    for row in chosen:
        sae = row["load"]()
        assert sae.cfg.architecture() == row["arch"] and sae.cfg.metadata.hook_name == args.hook
        assert 1 < row["l0"] < sae.cfg.d_sae


def test_fair_tables_without_runs_say_how_to_make_them(tmp_path, monkeypatch):
    from experiments import fair

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"runs/fair-cpu/results.json is missing: make the runs "
                       r"with `OMP_WAIT_POLICY=PASSIVE python -m experiments.fair --budget cpu`"):  # fmt: skip
        fair.main(["--stage", "tables"])
