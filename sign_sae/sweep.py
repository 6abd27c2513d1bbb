"""A grid of SAEs trained from one cached harvest per model, evaluated into one results table.

A sweep file (YAML; ``load_sweep`` also takes the name of a profile in ``sign_sae/profiles``)
lists models, hookpoints, token budgets, one training recipe and grid entries. An entry is one
label: an architecture at a width in units of H (H = ``h_expansion`` x d_in), with sparsity
values (coefficient, or k for TopK / AbsTopK), seeds, config options, optionally a subset of the
hooks, ``ablation_of`` naming the label it ablates, and ``train`` overrides of the recipe (for
example ``target_l0``, or more steps for an equal-compute comparison). Every (model, hook, entry, sparsity,
seed) is one run, identified by a hash of everything that determines its result.

    OUT/sweep.yaml                           the config as last run
    OUT/results.json, OUT/results.csv        one row per finished run, rewritten atomically
    OUT/activations/<model>/{train,eval}/    one harvest per model and split, all hooks in one pass
    OUT/runs/<model>/<hook>/<label>_sp<sparsity>_seed<seed>_<hash>/   sae/, train.json
                                             (checkpoint/ while training)

A restarted sweep skips runs whose hash is in the table, resumes a run from its last checkpoint
and evaluates a trained SAE that has no row yet. Per-run extra columns (the polarity census of
``analyses.sweep``) come from the ``columns`` callable, so this module needs nothing above it.
"""

import csv
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens import SAE

from sign_sae import distributed
from sign_sae.architectures import ARCHITECTURES, make_training_sae, parameter_count
from sign_sae.corpus import load_texts, tokenize
from sign_sae.harvest import DTYPES, harvest
from sign_sae.heldout import HeldOut
from sign_sae.models import HOOK_KINDS, hook_name, load_model, mid_layer
from sign_sae.pipeline import _build
from sign_sae.storage import atomic_write_text
from sign_sae.training import CHECKPOINT, TensorBatches, TrainConfig, train

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
# The first columns of the table, in this order; any others follow in order of appearance.
COLUMNS = [
    "config_hash", "model", "hook", "hook_kind", "label", "arch", "ablation_of", "width_factor",
    "d_in", "d_sae", "sparsity", "seed", "options", "train", "n_params", "n_params_train", "r2", "mse",
    "l0", "dead_fraction", "bipolar_fraction", "ce_clean", "ce_with_sae", "ce_zero_ablation",
    "ce_loss_recovered", "kl_with_sae", "n_tokens", "ce_tokens", "steps", "train_s", "eval_s",
    "wall_s",
]  # fmt: skip
# TrainConfig fields that never change a result (left out of the run hash).
_BOOKKEEPING = ("checkpoint_every", "log_every")
# Controls left out of the hash while they are off (field: its off value, the fields that only
# matter when it is on), so that older runs keep their hashes.
_OFF = {"target_l0": (None, ("target_l0", "target_l0_rate")), "lr_scales": ({}, ("lr_scales",))}

Columns = Callable[[Any, torch.Tensor], dict[str, Any]]
Row = dict[str, Any]


@dataclass
class GridEntry:
    """One label of the grid: ``arch`` at ``width`` x H with every ``sparsity`` and ``seeds``."""

    label: str
    arch: str
    sparsity: list[float]
    width: float = 1.0  # in units of H
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)
    hooks: list[str] | None = None  # a subset of the sweep's hooks; None = all
    ablation_of: str | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this entry

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise ValueError(
                f"Grid entry {self.label!r}: unknown train settings {unknown}; see TrainConfig."
            )
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"Grid entry {self.label!r}: unknown architecture {self.arch!r}; choose one of "
                f"{sorted(ARCHITECTURES)}."
            )
        if not self.sparsity or not self.seeds or self.width <= 0:
            raise ValueError(
                f"Grid entry {self.label!r} needs sparsity values, seeds and a positive width."
            )


@dataclass
class ModelSpec:
    """A model of the sweep; ``hooks`` / ``layer`` override the sweep's for this model."""

    name: str
    hooks: list[str] | None = None
    layer: int | None = None


@dataclass
class SweepConfig:
    """Everything a sweep needs; ``load_sweep`` reads it from YAML or a profile name."""

    out_dir: str = "runs/sweep"
    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec("smollm2-135m")])
    hooks: list[str] = field(default_factory=lambda: list(HOOK_KINDS))
    layer: int | None = None  # default: mid depth
    text: str = "shakespeare"
    context_size: int = 128
    train_tokens: int = 100_000
    eval_tokens: int = 8192  # activation metrics and the polarity census
    ce_tokens: int = 2048  # CE loss recovered and KL (the first rows of the eval tokens)
    h_expansion: float = 1.0  # H = h_expansion x d_in
    harvest_dtype: str = "float32"
    harvest_batch_size: int = 32
    eval_batch_size: int = 8
    device: str = "cpu"
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: list[GridEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.models = [
            m
            if isinstance(m, ModelSpec)
            else _build(ModelSpec, {"name": m} if isinstance(m, str) else m)
            for m in self.models
        ]
        self.grid = [g if isinstance(g, GridEntry) else _build(GridEntry, g) for g in self.grid]
        if not isinstance(self.train, TrainConfig):
            self.train = _build(TrainConfig, self.train)
        if self.harvest_dtype not in DTYPES:
            raise ValueError(f"harvest_dtype must be one of {sorted(DTYPES)}.")
        if min(self.eval_tokens, self.ce_tokens) < 2 * self.context_size:
            raise ValueError("eval_tokens and ce_tokens must cover at least two sequences.")
        for g in self.grid:
            unknown = set(g.hooks or []) - {h for m in self.models for h in m.hooks or self.hooks}
            if unknown:
                raise ValueError(f"Grid entry {g.label!r} names hooks not in the sweep: {unknown}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    """One point of the grid, before the model resolves its hook name and widths."""

    model: ModelSpec
    hook: str  # as written in the config (a kind or a full hook name)
    entry: GridEntry
    sparsity: float
    seed: int
    config_hash: str

    @property
    def folder_name(self) -> str:
        return f"{self.entry.label}_sp{self.sparsity:g}_seed{self.seed}_{self.config_hash[:10]}"


def profiles() -> list[str]:
    """Names of the profiles shipped in ``sign_sae/profiles``."""
    folder = resources.files("sign_sae") / "profiles"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_sweep(arg: str | Path) -> SweepConfig:
    """A sweep from a YAML file or a profile name (``cpu``, ``paper``, ``gpu-smoke``). A file
    with ``base: <profile or file>`` starts from that one and replaces the fields it sets."""
    return _build(SweepConfig, _read_sweep(arg))


def _read_sweep(arg: str | Path) -> dict[str, Any]:
    path = Path(arg)
    if path.is_file():
        text = path.read_text()
    elif str(arg) in profiles():
        text = (resources.files("sign_sae") / "profiles" / f"{arg}.yaml").read_text()
    else:
        raise FileNotFoundError(
            f"No sweep file {arg!r} and no profile of that name; profiles: {profiles()}."
        )
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{arg} must hold a mapping of SweepConfig fields.")
    base = data.pop("base", None)
    return {**_read_sweep(base), **data} if base is not None else data


def plan(cfg: SweepConfig) -> list[Run]:
    """Every run of the grid: model, then entry (the file's order is the priority), hook,
    sparsity, seed."""
    runs = []
    for model in cfg.models:
        hooks = model.hooks or cfg.hooks
        for entry in cfg.grid:
            for hook in [h for h in hooks if entry.hooks is None or h in entry.hooks]:
                for sparsity in entry.sparsity:
                    for seed in entry.seeds:
                        key = _hash_key(cfg, model, hook, entry, sparsity, seed)
                        runs.append(Run(model, hook, entry, sparsity, seed, key))
    return runs


def train_config(cfg: SweepConfig, entry: GridEntry, seed: int) -> TrainConfig:
    """The sweep's training recipe with the entry's overrides and the run's seed."""
    return replace(cfg.train, **entry.train, seed=seed)


def _hash_key(
    cfg: SweepConfig, model: ModelSpec, hook: str, entry: GridEntry, sparsity: float, seed: int
) -> str:
    """sha256 of everything that determines a run's result."""
    recipe = asdict(train_config(cfg, entry, seed))
    dropped = [*_BOOKKEEPING]
    for k, (off, fields_when_on) in _OFF.items():
        if recipe[k] == off:
            dropped += fields_when_on
    for k in dropped:
        recipe.pop(k)
    spec = {
        "model": model.name,
        "hook": hook,
        "layer": model.layer if model.layer is not None else cfg.layer,
        "text": cfg.text,
        "context_size": cfg.context_size,
        "train_tokens": cfg.train_tokens,
        "eval_tokens": cfg.eval_tokens,
        "ce_tokens": cfg.ce_tokens,
        "harvest_dtype": cfg.harvest_dtype,
        "h_expansion": cfg.h_expansion,
        "device": cfg.device,
        "label": entry.label,
        "arch": entry.arch,
        "width": entry.width,
        "options": entry.options,
        "sparsity": float(sparsity),
        "train": recipe,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class ResultsTable:
    """The sweep's rows, keyed by ``config_hash``; ``add`` rewrites JSON and CSV atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / RESULTS_JSON
        self.rows: list[Row] = json.loads(path.read_text()) if path.is_file() else []

    def __contains__(self, config_hash: str) -> bool:
        return any(r["config_hash"] == config_hash for r in self.rows)

    def add(self, row: Row) -> None:
        self.rows = [r for r in self.rows if r["config_hash"] != row["config_hash"]] + [row]
        if not distributed.is_main():
            return
        atomic_write_text(self.folder / RESULTS_JSON, json.dumps(_json_safe(self.rows), indent=1))
        atomic_write_text(self.folder / RESULTS_CSV, to_csv(self.rows))


def to_csv(rows: list[Row]) -> str:
    """The rows as CSV: ``COLUMNS`` first, then the rest; NaN and None as empty cells."""
    extra = [k for r in rows for k in r if k not in COLUMNS]
    names = [c for c in COLUMNS if any(c in r for r in rows)] + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in names})
    return buf.getvalue()


def read_results(path: str | Path) -> list[Row]:
    """Rows of a results table (``results.json`` or ``results.csv``; numbers parsed, empty
    cells None)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


Loader = Callable[[SweepConfig, str], tuple[Any, torch.Tensor, torch.Tensor]]


def load_data(cfg: SweepConfig, model_name: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The model on ``cfg.device`` and its (train, eval) token rows from ``cfg.text``."""
    model = load_model(model_name, device=cfg.device)
    train_tokens = tokenize(
        model, load_texts(cfg.text, "train"), cfg.context_size, cfg.train_tokens
    )
    eval_tokens = tokenize(model, load_texts(cfg.text, "eval"), cfg.context_size, cfg.eval_tokens)
    return model, train_tokens, eval_tokens


def run_sweep(
    cfg: SweepConfig,
    columns: Columns | None = None,
    load: Loader | None = None,
    progress: bool = True,
) -> list[Row]:
    """Train and evaluate every run of ``cfg`` not yet in its results table; returns all rows.

    ``columns(sae, held_out_acts)`` adds per-run columns; ``load`` supplies the model and tokens
    (default ``load_data``).
    """
    load = load or load_data
    out = Path(cfg.out_dir)
    table = ResultsTable(out)
    if distributed.is_main():
        atomic_write_text(out / "sweep.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    runs = plan(cfg)
    for spec in cfg.models:
        todo = [r for r in runs if r.model is spec and r.config_hash not in table]
        log.info(
            "%s: %d of %d runs to do", spec.name, len(todo), sum(r.model is spec for r in runs)
        )
        if todo:
            _model_runs(cfg, spec, todo, table, columns, load, progress)
    return table.rows


def _model_runs(
    cfg: SweepConfig,
    spec: ModelSpec,
    todo: list[Run],
    table: ResultsTable,
    columns: Columns | None,
    load: Loader,
    progress: bool,
) -> None:
    """All pending runs of one model from its two harvests (train and eval, every hook)."""
    model, train_tokens, eval_tokens = load(cfg, spec.name)
    layer = spec.layer if spec.layer is not None else cfg.layer
    names = {h: _resolve(model, h, layer) for h in spec.hooks or cfg.hooks}
    acts_dir = Path(cfg.out_dir) / "activations" / _safe(spec.name)
    kwargs = {
        "batch_size": cfg.harvest_batch_size,
        "dtype": DTYPES[cfg.harvest_dtype],
        "model_name": spec.name,
    }
    with distributed.main_first():  # under torchrun, rank 0 harvests and the others reuse it
        train_caches = harvest(
            model, train_tokens, list(names.values()), acts_dir / "train", **kwargs
        )
        eval_caches = harvest(model, eval_tokens, list(names.values()), acts_dir / "eval", **kwargs)
    held = HeldOut(
        model,
        eval_tokens,
        {h: c.load() for h, c in eval_caches.items()},
        ce_rows=max(cfg.ce_tokens // cfg.context_size, 1),
        batch_size=cfg.eval_batch_size,
    )
    loaded: dict[str, torch.Tensor] = {}
    order = {run.config_hash: i for i, run in enumerate(todo)}
    world = distributed.get_world()
    for start in range(0, len(todo), world):  # under torchrun, rank r takes run start + r
        rows = []
        for run in distributed.shard(todo[start : start + world]):
            hook = names[run.hook]
            if hook not in loaded:  # one hook's training activations in memory at a time
                loaded = {hook: train_caches[hook].load()}
            i = order[run.config_hash]
            log.info("[%d/%d] %s %s %s", i + 1, len(todo), spec.name, hook, run.folder_name)
            with distributed.alone():  # each run is one process's job
                rows.append(_one_run(cfg, run, model, hook, loaded[hook], held, columns, progress))
        for row in distributed.gather_rows(rows, key=lambda r: order[r["config_hash"]]):
            table.add(row)


def _one_run(
    cfg: SweepConfig,
    run: Run,
    model: Any,
    hook: str,
    acts: torch.Tensor,
    held: HeldOut,
    columns: Columns | None,
    progress: bool,
) -> Row:
    """Train (or resume, or reuse) one SAE, evaluate it and return its row."""
    d_in = acts.shape[1]
    entry = run.entry
    width = max(1, round(entry.width * cfg.h_expansion * d_in))
    folder = Path(cfg.out_dir) / "runs" / _safe(run.model.name) / _safe(run.hook) / run.folder_name
    if not (folder / "train.json").is_file():
        torch.manual_seed(run.seed)
        tcfg = train_config(cfg, entry, run.seed)
        sae = make_training_sae(
            entry.arch,
            d_in,
            width,
            run.sparsity,
            warm_up_steps=tcfg.total_steps // 10,
            metadata={
                "model_name": run.model.name,
                "hook_name": hook,
                "context_size": cfg.context_size,
                "prepend_bos": True,
            },
            device=cfg.device,
            **entry.options,
        )
        batches = TensorBatches(acts, tcfg.batch_size, seed=run.seed)
        result = train(sae, batches, tcfg, run_dir=folder, resume=True, progress=progress)
        sae.save_inference_model(folder / "sae")
        info = {**asdict(result), "n_params_train": parameter_count(sae)}
        atomic_write_text(folder / "train.json", json.dumps(info, indent=1))
        shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
    info = json.loads((folder / "train.json").read_text())
    sae = SAE.load_from_disk(folder / "sae", device=cfg.device)
    start = time.perf_counter()
    res = held.evaluate(sae, hook)
    extra = columns(sae, held.acts[hook]) if columns is not None else {}
    eval_s = time.perf_counter() - start
    return {
        "config_hash": run.config_hash,
        "model": run.model.name,
        "hook": hook,
        "hook_kind": run.hook,
        "label": entry.label,
        "arch": entry.arch,
        "ablation_of": entry.ablation_of,
        "width_factor": entry.width,
        "d_in": d_in,
        "sparsity": run.sparsity,
        "seed": run.seed,
        "options": json.dumps(entry.options, sort_keys=True),
        "train": json.dumps(entry.train, sort_keys=True),
        "n_params_train": info["n_params_train"],
        **res.to_dict(),
        "ce_tokens": held.n_ce_tokens,
        "steps": info["steps"],
        "train_s": info["wall_s"],
        "eval_s": eval_s,
        "wall_s": info["wall_s"] + eval_s,
        **extra,
        "folder": str(folder.relative_to(Path(cfg.out_dir))),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _resolve(model: Any, hook: str, layer: int | None) -> str:
    if hook in HOOK_KINDS:
        return hook_name(hook, mid_layer(model) if layer is None else layer)
    return hook


def _safe(name: str) -> str:
    return name.replace("/", "--")


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


def _parse(text: str | None) -> Any:
    if text is None or text.strip() == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
