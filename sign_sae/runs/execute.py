"""Running a sweep: the one per-model loop behind ``sign-sae train``, ``eval``, ``sweep`` and
``demo``.

For each model of the sweep, the runs still to do are trained in groups: every run of a group
reads one ``ActivationStream`` (one forward pass per chunk of text feeds every hook, and every
SAE at a hook steps on the same batch), up to ``data.saes_at_once`` SAEs at a time; then each
trained run is evaluated on the held-out split into the results table.

    OUT/sweep.yaml                                the config as last run
    OUT/activations/<model>/<split>/<hook>/       the held-out harvest (validation, test)
    OUT/activations/<model>/stream/<key>/<hook>/  the training stream's chunks (data.cache)
    OUT/runs/<model>/<hook>/<name>_<hash>/        sae/, train.json (checkpoint/ while training)

A restarted sweep skips runs that have a row, resumes each run from its last checkpoint and
only evaluates a trained SAE without a row. Processes that share OUT take turns under file
locks (one per run folder, one per harvest, one for the results table). A run whose training
fails (a non-finite loss or batch) writes ``failed.json`` and the others train on; the command
then names the failed runs, and a rerun retries only those. Under ``torchrun`` every rank
streams its own share of the text and the group trains data-parallel.
"""

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save

from sign_sae import distributed
from sign_sae.architectures import parameter_count
from sign_sae.corpus import load_texts, tokenize
from sign_sae.devices import check_device
from sign_sae.errors import SignSAEError
from sign_sae.evaluate import HeldOut
from sign_sae.harvest import DTYPES, ActivationCache, fingerprint, harvest
from sign_sae.metrics import SequenceStats
from sign_sae.models import load_model
from sign_sae.runs.config import SWEEP_FILE, DataConfig, SweepConfig, load_sweep
from sign_sae.runs.memory import check as check_memory
from sign_sae.runs.memory import out_of_memory
from sign_sae.runs.spec import (
    FAILED_FILE,
    TRAIN_FILE,
    Row,
    Run,
    read_train_info,
    resolve,
    safe_name,
)
from sign_sae.runs.table import ResultsTable, sequences_file
from sign_sae.storage import (
    atomic_write_bytes,
    atomic_write_text,
    load_sae,
    locked,
    remove_stale,
    save_sae,
)
from sign_sae.stream import ActivationStream, describe
from sign_sae.trainer import CHECKPOINT, Trainer, train_together

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"  # held by the process that trains a run
# Per-run extra columns from the SAE and its held-out activations at its hook, in pieces.
Columns = Callable[[Any, Iterable[torch.Tensor]], dict[str, Any]]


class Inputs:
    """Where a sweep's models and token rows come from: ``load_model`` (or ``models`` already
    loaded, by name) and ``data.text``; tests swap in a tiny model."""

    def __init__(self, data: DataConfig, models: dict[str, Any] | None = None) -> None:
        self.data, self.models = data, dict(models or {})

    def model(self, name: str) -> Any:
        if name in self.models:
            return self.models[name]
        return load_model(name, device=self.data.device)

    def tokens(self, model: Any, split: str) -> torch.Tensor:
        n = self.data.train_tokens if split == "train" else self.data.eval_tokens
        return tokenize(model, load_texts(self.data.text, split), self.data.context_size, n)


def train_runs(cfg: SweepConfig, inputs: Inputs | None = None, progress: bool = True) -> list[Run]:
    """``sign-sae train``: train every run not trained yet; returns every run of the plan."""
    return run_plan(cfg, inputs, evaluate=False, progress=progress)[0]


def evaluate_runs(
    cfg: SweepConfig, columns: Columns | None = None, inputs: Inputs | None = None
) -> list[Row]:
    """``sign-sae eval``: evaluate every trained run without a row for ``data.eval_split``
    (reading only that split's tokens and harvest); returns every row of the table."""
    return run_plan(cfg, inputs, train=False, columns=columns)[1].rows


def run_sweep(
    cfg: SweepConfig,
    columns: Columns | None = None,
    inputs: Inputs | None = None,
    progress: bool = True,
) -> list[Row]:
    """Train and evaluate every run of ``cfg`` not yet in its results table; returns all rows.
    ``columns(sae, held_out_pieces)`` adds per-run columns."""
    return run_plan(cfg, inputs, columns=columns, progress=progress)[1].rows


def run_plan(
    cfg: SweepConfig,
    inputs: Inputs | None = None,
    train: bool = True,
    evaluate: bool = True,
    columns: Columns | None = None,
    progress: bool = True,
) -> tuple[list[Run], ResultsTable]:
    """The one loop: per model, train the pending runs group by group from one stream each
    (``train``), and evaluate each trained run without a row (``evaluate``). Raises a
    ``SignSAEError`` naming the runs whose training failed once all others are done."""
    check_device(cfg.data.device)
    inputs = inputs or Inputs(cfg.data)
    # every model's runs resolved (hooks checked against the model) before anything is written
    plans = []
    for spec in cfg.data.models:
        model = inputs.model(spec.name)
        plans.append((spec, resolve(cfg, spec, model)))
    table = _start(cfg) if train else ResultsTable(Path(cfg.out_dir))
    every, failed = [], []
    for spec, runs in plans:
        if len(plans) > 1:
            model = inputs.model(spec.name)  # with one model, the one loaded above
        every += runs
        pending = [r for r in runs if not (table.has(r) if evaluate else r.trained)]
        if not train:
            pending = [r for r in pending if r.trained]
        log.info("%s: %d of %d runs to do", spec.name, len(pending), len(runs))
        if not pending:
            continue
        held = None
        if evaluate:
            tokens = inputs.tokens(model, cfg.data.eval_split)
            held = held_out_split(cfg, spec.name, model, tokens, [r.hook for r in pending])
        untrained = [r for r in pending if not r.trained] if train else []
        for group in [
            [r for r in pending if r not in untrained],
            *groups(untrained, cfg.data.saes_at_once),
        ]:
            if group and any(not r.trained for r in group):
                lost = train_group(cfg, inputs, model, group, progress)
                if distributed.is_main():
                    for run, why in lost:
                        table.fail(run, why)
                failed += lost
            if held is not None and distributed.is_main():
                for run in group:
                    if run.trained:
                        table.add(evaluate_run(run, held, columns))
        distributed.barrier()
    if not distributed.is_main():  # rank 0 wrote the rows: every rank returns the table
        table = ResultsTable(Path(cfg.out_dir))
    if failed:
        why = "; ".join(f"{r.folder.relative_to(r.out_dir)}: {e['error']}" for r, e in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise SignSAEError(
            f"{len(failed)} run(s) failed, the others finished; rerun to retry only these, each "
            f"folder's {FAILED_FILE} and results row say why and at which step. {why}{more}"
        )
    return every, table


def groups(runs: list[Run], at_once: int) -> list[list[Run]]:
    """Runs that train from one pass over the stream: those with the same batch size (and
    latent shards, which decide each rank's share), at most ``at_once`` (0: no limit) per
    group, in plan order."""
    by_batch: dict[tuple[int, int], list[Run]] = {}
    for run in runs:
        by_batch.setdefault((run.train.batch_size, run.train.latent_shards), []).append(run)
    size = at_once or max(len(runs), 1)
    return [g[i : i + size] for g in by_batch.values() for i in range(0, len(g), size)]


def train_group(
    cfg: SweepConfig, inputs: Inputs, model: Any, group: list[Run], progress: bool = True
) -> list[tuple[Run, dict[str, Any]]]:
    """Train (or resume, or reuse) every run of ``group`` from one stream into its folder:
    ``sae/`` and ``train.json`` (``checkpoint/`` while training). Returns the runs whose
    training failed, each with what its ``failed.json`` says (step, error). The runs' lock files keep a second process
    off their folders: it waits, then finds them trained."""
    data, name = cfg.data, group[0].point.model.name
    with contextlib.ExitStack() as held:
        if distributed.is_main():
            for run in group:  # plan order: two processes never wait on each other
                held.enter_context(locked(run.folder / LOCK_FILE))
        distributed.barrier()  # the other ranks wait while rank 0 waits for the locks
        todo = [r for r in group if not r.trained]
        if not todo:
            return []
        check_memory(todo, data)
        stream = training_stream(cfg, name, model, inputs.tokens(model, "train"), todo)
        stream.check_supply(max(r.train.total_steps for r in todo), data.epochs)
        trainers = []
        for run in todo:
            torch.manual_seed(run.train.seed)
            trainers.append(
                Trainer(run.training_sae(), stream.view(run.hook), run.train, run.folder, False)
            )
        where = ", ".join(sorted({r.hook for r in todo}))
        log.info("training %d SAE(s) at %s from one stream", len(todo), where)
        failed = []
        try:
            results = train_together(trainers, progress=progress)
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise out_of_memory(todo, data) from e
        for run, trainer, result in zip(todo, trainers, results, strict=True):
            if isinstance(result, Exception):
                why = {"step": trainer.step, "error": str(result)}
                failed.append((run, why))
                if distributed.is_main():
                    atomic_write_text(run.folder / FAILED_FILE, json.dumps(why, indent=1))
                continue
            if distributed.is_main():
                save_sae(trainer.sae, run.folder / "sae")
                info = {
                    "run": run.record(),
                    **asdict(result),
                    "n_params_train": parameter_count(trainer.sae),
                    "scaling_batches": run.train.scaling_batches,
                    "stream": {**describe(stream), "forwards": stream.forwards},
                }
                atomic_write_text(run.folder / TRAIN_FILE, json.dumps(info, indent=1))
                shutil.rmtree(run.folder / CHECKPOINT, ignore_errors=True)
                (run.folder / FAILED_FILE).unlink(missing_ok=True)
        distributed.barrier()
        return failed


def training_stream(
    cfg: SweepConfig, model_name: str, model: Any, tokens: torch.Tensor, runs: list[Run]
) -> ActivationStream:
    """The stream of the training split at the runs' hooks; under torchrun this rank's share,
    the same for every latent shard of one data rank (``sign_sae.sharding``)."""
    data, shards = cfg.data, runs[0].train.latent_shards
    cache = None
    if data.cache:
        key = {
            "tokens": fingerprint(tokens),
            "seed": data.stream_seed,
            "buffer": data.buffer_tokens,
            "dtype": data.harvest_dtype,
            "forward": data.forward_dtype,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        cache = activations_dir(cfg.out_dir, model_name, "stream") / digest
    return ActivationStream(
        model,
        tokens,
        [r.hook for r in runs],
        runs[0].train.batch_size,
        buffer_tokens=data.buffer_tokens,
        seed=data.stream_seed,
        dtype=DTYPES[data.harvest_dtype],
        forward_dtype=DTYPES[data.forward_dtype],
        forward_batch=data.harvest_batch_size,
        cache_dir=cache,
        model_name=model_name,
        rank=distributed.get_rank() // shards,
        world=max(1, distributed.get_world() // shards),
    )


def evaluate_run(run: Run, held: HeldOut, columns: Columns | None = None) -> Row:
    """The results row of one trained run: its identity, held-out metrics and timings."""
    info = read_train_info(run.folder / TRAIN_FILE)
    sae = load_sae(run.folder / "sae", device=run.data.device)
    start = time.perf_counter()
    res = held.evaluate(sae, run.hook)
    extra = columns(sae, held.chunks(run.hook)) if columns is not None else {}
    eval_s = time.perf_counter() - start
    sums = {k: getattr(res.sequences, k).contiguous() for k in SequenceStats.__dataclass_fields__}
    atomic_write_bytes(run.folder / sequences_file(run.data.eval_split), save(sums))
    return {
        **run.record(),
        "split": run.data.eval_split,
        "n_params_train": info["n_params_train"],
        **res.to_dict(),
        "ce_tokens": held.n_ce_tokens,
        "steps": info["steps"],
        "train_s": info["wall_s"],
        "eval_s": eval_s,
        "wall_s": info["wall_s"] + eval_s,
        **extra,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _start(cfg: SweepConfig) -> ResultsTable:
    """Remove temporary files that killed processes left, record the config in the run folder
    (rank 0) and open its results table.

    ``sweep.yaml`` keeps every grid the folder has run: the entries of an earlier sweep whose
    labels this one does not use stay beside this one's, so ``eval``, ``report`` and ``frontier``
    of the folder see every run (the data and train settings are this sweep's)."""
    out = Path(cfg.out_dir)
    if distributed.is_main():
        remove_stale(out)
        with locked(out / ".sweep.lock"):
            record = cfg.to_dict()
            if (out / SWEEP_FILE).is_file():
                ours = {g.label for g in cfg.grid}
                kept = [g for g in load_sweep(out).to_dict()["grid"] if g["label"] not in ours]
                record["grid"] = kept + record["grid"]
                SweepConfig(**record)  # the union is a valid sweep (no run given twice)
            atomic_write_text(out / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))
    return ResultsTable(out)


def activations_dir(out_dir: str | Path, model_name: str, split: str) -> Path:
    """The folder of one model's activations of one split (a subfolder per hook)."""
    return Path(out_dir) / "activations" / safe_name(model_name) / split


def harvest_split(
    cfg: SweepConfig,
    model_name: str,
    model: Any,
    tokens: torch.Tensor,
    hooks: list[str],
    split: str,
) -> dict[str, ActivationCache]:
    """One harvest of ``tokens`` (a held-out split's) at ``hooks`` into the sweep's folder, or
    the cache as it is when it holds them; under torchrun rank 0 fills it, the others reuse it."""
    folder = activations_dir(cfg.out_dir, model_name, split)
    with distributed.main_first(), locked(folder.parent / f".{split}.lock"):
        return harvest(
            model,
            tokens,
            list(dict.fromkeys(hooks)),
            folder,
            batch_size=cfg.data.harvest_batch_size,
            dtype=DTYPES[cfg.data.harvest_dtype],
            model_name=model_name,
            forward_dtype=DTYPES[cfg.data.forward_dtype],
        )


def held_out_split(
    cfg: SweepConfig, model_name: str, model: Any, tokens: torch.Tensor, hooks: list[str]
) -> HeldOut:
    """The evaluator of one model over the harvest of ``data.eval_split`` at ``hooks``, read
    from disk one piece at a time."""
    caches = harvest_split(cfg, model_name, model, tokens, hooks, cfg.data.eval_split)
    return HeldOut(
        model,
        tokens,
        caches,
        ce_rows=max(cfg.data.ce_tokens // cfg.data.context_size, 1),
        batch_size=cfg.data.eval_batch_size,
    )
