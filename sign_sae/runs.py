"""The one run system: a spec trains one SAE into its folder; a sweep is a list of specs and a
resumable results table. ``sign-sae train``, ``eval``, ``sweep`` and ``demo`` are views of it.

A sweep file (YAML; ``load_sweep`` also takes a run folder or the name of a profile in
``sign_sae/profiles``) has four parts:

- ``data``: the models (each may set its own ``hooks`` and ``layer``), hooks, text and token
  budgets, shared by every run, by the evaluator and by the report (``DataConfig``);
- ``train``: one training recipe (``TrainConfig``);
- ``h_expansion``: H = h_expansion x d_in latents;
- ``grid``: entries, each one label: an architecture at ``width`` x H with ``sparsity`` values
  (coefficient, or k for TopK / AbsTopK), ``seeds``, SAE config ``options``, optionally a subset
  of the hooks, ``ablation_of`` (the label it ablates) and ``train`` overrides of the recipe.

Every (model, hook, entry, sparsity, seed) is one run named ``<label>_sp<sparsity>_seed<seed>``
and keyed by a hash of its resolved configuration: the SAE's full config (library defaults
included, so a changed default re-keys the run), the TrainConfig less its bookkeeping fields,
the label and the text and token budgets that feed it. A single run (``make demo``: the
``demo`` profile) is a sweep of a few cells in the same format.

    OUT/sweep.yaml                                the config as last run
    OUT/results.json, OUT/results.csv             one row per evaluated run, rewritten atomically
    OUT/activations/<model>/{train,eval}/<hook>/  one harvest per model and split, all hooks
    OUT/runs/<model>/<hook>/<name>_<hash>/        sae/, train.json (checkpoint/ while training)

A restarted sweep skips runs that have a row, resumes a run from its last checkpoint and only
evaluates a trained SAE without a row. Processes that share OUT take turns under file locks (one
per run folder, one per harvest, one for the results table, into which each update merges its
row), so none trains a run another is training and no row is lost. Per-run extra columns (the
polarity census of ``analyses.sweep``) come from the ``columns`` callable, so this module needs
nothing above it.
"""

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save

from sign_sae import distributed
from sign_sae.architectures import (
    ARCHITECTURES,
    make_training_sae,
    parameter_count,
    training_config,
)
from sign_sae.corpus import HELD_OUT, load_texts, tokenize
from sign_sae.errors import SignSAEError
from sign_sae.evaluate import HeldOut
from sign_sae.harvest import DTYPES, ActivationCache, harvest
from sign_sae.markdown import markdown_table
from sign_sae.metrics import SequenceStats
from sign_sae.models import (
    DEFAULT_MODEL,
    HOOK_KINDS,
    hook_name,
    load_model,
    mid_layer,
    validate_hook,
)
from sign_sae.storage import (
    atomic_write_bytes,
    atomic_write_text,
    load_sae,
    locked,
    read_json,
    read_weights,
    remove_stale,
    save_sae,
)
from sign_sae.trainer import BOOKKEEPING, CHECKPOINT, TensorBatches, TrainConfig, train
from sign_sae.typed import coerce_fields

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
TRAIN_FILE = "train.json"
LOCK_FILE = ".lock"  # held by the process that trains a run
# The first columns of the table, in this order; any others follow in order of appearance.
COLUMNS = [
    "config_hash", "split", "model", "hook", "hook_kind", "label", "name", "arch", "ablation_of",
    "width_factor", "d_in", "d_sae", "sparsity", "seed", "options", "train", "n_params",
    "n_params_train", "r2", "mse", "l0", "dead_fraction", "bipolar_fraction", "ce_clean",
    "ce_with_sae", "ce_zero_ablation", "ce_loss_recovered", "kl_with_sae", "n_tokens",
    "ce_tokens", "steps", "train_s", "eval_s", "wall_s",
]  # fmt: skip
# The columns of the printed summary (and of a run report's table), with their formats.
SUMMARY = [
    ("name", "{}"),
    ("architecture", "{}"),
    ("d_sae", "{}"),
    ("n_params", "{:,}"),
    ("r2", "{:.3f}"),
    ("l0", "{:.1f}"),
    ("dead_fraction", "{:.3f}"),
    ("bipolar_fraction", "{:.2f}"),
    ("ce_loss_recovered", "{:.3f}"),
    ("kl_with_sae", "{:.3f}"),
    ("train_s", "{:.0f}"),
]
# SAE metadata that only records versions, left out of the run hash with TrainConfig's
# BOOKKEEPING fields.
_VERSIONS = ("sae_lens_version", "sae_lens_training_version")
# The data fields that feed a run's SAE or its row (the rest are in the SAE's config).
_DATA_KEYS = ("text", "train_tokens", "eval_tokens", "ce_tokens", "harvest_dtype", "forward_dtype")

Columns = Callable[[Any, torch.Tensor], dict[str, Any]]
Row = dict[str, Any]


# ---- configuration ------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model of the sweep; ``hooks`` / ``layer`` override the data config's for this model."""

    name: str
    hooks: list[str] | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        coerce_fields(self, f"data.models: {self.name!r}: ")
        if self.hooks is not None:
            _check_hooks(f"model {self.name!r}: hooks", self.hooks)
        if self.layer is not None and not (isinstance(self.layer, int) and self.layer >= 0):
            raise SignSAEError(
                f"model {self.name!r}: layer must be an int >= 0, got {self.layer!r}."
            )


@dataclass
class DataConfig:
    """What every run, the evaluator and the report read: models, hooks, text, token budgets."""

    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec(DEFAULT_MODEL)])
    hooks: list[str] = field(default_factory=lambda: list(HOOK_KINDS))
    layer: int | None = None  # default: mid depth
    text: str = "shakespeare"
    context_size: int = 128
    train_tokens: int = 100_000
    eval_tokens: int = 8192  # held-out tokens: activation metrics and the polarity census
    ce_tokens: int = 2048  # CE loss recovered and KL (the first rows of the held-out tokens)
    # the held-out split the evaluator reads: "validation" (choose here) or "test" (report only)
    eval_split: str = "validation"
    harvest_dtype: str = "float32"
    forward_dtype: str = "float32"  # "bfloat16": harvest under autocast, ~2x faster on CPU
    harvest_batch_size: int = 32
    eval_batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self) -> None:
        coerce_fields(self, "data.")
        if not isinstance(self.models, list) or not self.models:
            raise SignSAEError(f"data.models must be a non-empty list, got {self.models!r}.")
        self.models = [
            _build(ModelSpec, {"name": m} if isinstance(m, str) else m, "data.models[]")
            for m in self.models
        ]
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise SignSAEError(f"data.models: each model once, got {names}.")
        _check_hooks("data.hooks", self.hooks)
        if self.harvest_dtype not in DTYPES:
            raise SignSAEError(
                f"data.harvest_dtype must be one of {sorted(DTYPES)}, got {self.harvest_dtype!r}."
            )
        if self.eval_split not in HELD_OUT:
            raise SignSAEError(
                f"data.eval_split must be one of {list(HELD_OUT)}, got {self.eval_split!r}."
            )
        if self.forward_dtype not in ("float32", "bfloat16"):
            raise SignSAEError(
                f"data.forward_dtype must be float32 or bfloat16, got {self.forward_dtype!r}."
            )
        try:
            torch.device(self.device)
        except RuntimeError:
            raise SignSAEError(
                f"data.device must be a torch device (cpu, cuda, cuda:1, mps), got {self.device!r}."
            ) from None
        for name in ("context_size", "train_tokens", "eval_tokens", "ce_tokens"):
            _check_int(f"data.{name}", getattr(self, name), 2)
        _check_int("data.harvest_batch_size", self.harvest_batch_size, 1)
        _check_int("data.eval_batch_size", self.eval_batch_size, 1)
        if self.layer is not None:
            _check_int("data.layer", self.layer, 0)
        if min(self.eval_tokens, self.ce_tokens) < 2 * self.context_size:
            raise SignSAEError("data.eval_tokens and data.ce_tokens must cover two sequences.")
        if self.ce_tokens > self.eval_tokens:
            raise SignSAEError("data.ce_tokens must not exceed data.eval_tokens (its first rows).")


@dataclass
class GridEntry:
    """One label of the grid: ``arch`` at ``width`` x H with every ``sparsity`` and ``seeds``."""

    label: str
    arch: str
    sparsity: list[float]
    width: float = 1.0  # in units of H
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, Any] = field(default_factory=dict)  # SAE config fields
    hooks: list[str] | None = None  # a subset of the sweep's hooks; None = all
    ablation_of: str | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this entry

    def __post_init__(self) -> None:
        where = f"grid entry {self.label!r}"
        coerce_fields(self, f"{where}: ")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", self.label):
            raise SignSAEError(
                f"{where}: a label names folders, so it must be a plain name (letters, digits, "
                "and _ . + = - after the first character; no / or ..)."
            )
        if self.arch not in ARCHITECTURES:
            raise SignSAEError(
                f"{where}: arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}."
            )
        if not _numbers(self.sparsity, float) or not _numbers(self.seeds, int):
            raise SignSAEError(f"{where}: sparsity and seeds must be non-empty lists of numbers.")
        if not (_numbers([self.width], float) and self.width > 0):
            raise SignSAEError(f"{where}: width must be a positive number, got {self.width!r}.")
        if self.hooks is not None:
            _check_hooks(f"{where}: hooks", self.hooks)
        if not isinstance(self.options, dict) or not isinstance(self.train, dict):
            raise SignSAEError(f"{where}: options and train must be mappings of config fields.")
        unknown = sorted(set(self.train) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise SignSAEError(
                f"{where}: unknown train field(s) {unknown}; known: "
                f"{[f.name for f in fields(TrainConfig)]}."
            )
        try:  # the overrides, converted as TrainConfig converts them
            self.train = {
                k: v for k, v in asdict(TrainConfig(**self.train)).items() if k in self.train
            }
        except SignSAEError as e:
            raise SignSAEError(f"{where}: train: {str(e).removeprefix('train.')}") from None
        for sparsity in self.sparsity:  # the SAE config, with stand-in widths
            try:
                training_config(self.arch, 16, 16, sparsity, **self.options)
            except (ValueError, TypeError) as e:
                raise SignSAEError(f"{where}: {e}") from e


@dataclass
class SweepConfig:
    """Everything a sweep needs; ``load_sweep`` reads it from YAML, a run folder or a profile."""

    out_dir: str = "runs/sweep"
    data: DataConfig = field(default_factory=DataConfig)
    h_expansion: float = 1.0  # H = h_expansion x d_in
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: list[GridEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        coerce_fields(self)
        self.data = _build(DataConfig, self.data, "data")
        self.train = _build(TrainConfig, self.train, "train")
        if not isinstance(self.grid, list) or not self.grid:
            raise SignSAEError("grid must be a non-empty list of entries (label, arch, sparsity).")
        self.grid = [_build(GridEntry, g, "grid[]") for g in self.grid]
        if not (_numbers([self.h_expansion], float) and self.h_expansion > 0):
            raise SignSAEError(f"h_expansion must be a positive number, got {self.h_expansion!r}.")
        hooks = {h for m in self.data.models for h in m.hooks or self.data.hooks}
        for g in self.grid:
            if set(g.hooks or []) - hooks:
                raise SignSAEError(
                    f"grid entry {g.label!r}: hooks {sorted(set(g.hooks) - hooks)} are not in the "
                    f"sweep's hooks {sorted(hooks)}."
                )
            try:
                replace(self.train, **g.train)
            except (ValueError, TypeError) as e:
                raise SignSAEError(f"grid entry {g.label!r}: train: {e}") from e
        plan(self)  # refuses repeated runs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a mapping, naming unknown and missing fields instead of a TypeError."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise SignSAEError(f"{where} must be a mapping of {cls.__name__} fields, got {data!r}.")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SignSAEError(f"{where}: unknown field(s) {unknown}; known: {known}.")
    required = [
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise SignSAEError(f"{where}: missing field(s) {missing}.")
    return cls(**data)


def _check_hooks(where: str, hooks: Any) -> None:
    if not isinstance(hooks, list) or not hooks or len(set(hooks)) != len(hooks):
        raise SignSAEError(f"{where} must be a non-empty list without repeats, got {hooks!r}.")
    for h in hooks:
        if not isinstance(h, str) or (h not in HOOK_KINDS and "hook_" not in h):
            raise SignSAEError(
                f"{where}: {h!r} is neither a hook kind ({', '.join(sorted(HOOK_KINDS))}) nor a "
                "hook name such as blocks.6.hook_mlp_out."
            )


def _check_int(where: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SignSAEError(f"{where} must be an int >= {low}, got {value!r}.")


def _numbers(values: Any, kind: type) -> bool:
    ok = (int, float) if kind is float else (int,)
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, ok) and not isinstance(v, bool) for v in values)
    )


# ---- loading sweep files ------------------------------------------------------------------
def profiles() -> list[str]:
    """Names of the profiles shipped in ``sign_sae/profiles``."""
    folder = resources.files("sign_sae") / "profiles"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_sweep(arg: str | Path) -> SweepConfig:
    """A sweep from a YAML file, a run folder (its ``sweep.yaml``, with the folder as out_dir) or
    a profile name (``demo``, ``cpu``, ``gpu-smoke``, ``paper``). A file with ``base: <profile or
    file>`` starts from that one and replaces what it sets (mappings such as ``data`` and
    ``train`` key by key)."""
    cfg = _build(SweepConfig, _read_sweep(arg), str(arg))
    if Path(arg).is_dir():
        cfg.out_dir = str(arg)
    return cfg


def _read_sweep(arg: str | Path) -> dict[str, Any]:
    path = Path(arg)
    if path.is_dir():
        path = path / SWEEP_FILE
    if path.is_file():
        text = path.read_text()
    elif str(arg) in profiles():
        text = (resources.files("sign_sae") / "profiles" / f"{arg}.yaml").read_text()
    else:
        raise FileNotFoundError(
            f"No sweep file {arg!r} (nor a run folder holding {SWEEP_FILE}) and no profile of "
            f"that name; profiles: {profiles()}."
        )
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise SignSAEError(
            f"{path if path.is_file() else arg}{at}: YAML syntax error: {e.problem or e.context}."
        ) from None
    except yaml.YAMLError as e:
        raise SignSAEError(f"{arg}: YAML error: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise SignSAEError(f"{arg} must hold a mapping of SweepConfig fields.")
    base = data.pop("base", None)
    return _merge(_read_sweep(base), data) if base is not None else data


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested mappings merge key by key, the rest replace."""
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


# ---- the plan and its runs ----------------------------------------------------------------
@dataclass
class Point:
    """One point of the grid before its model is loaded."""

    model: ModelSpec
    hook: str  # as written in the config: a kind or a full hook name
    entry: GridEntry
    sparsity: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.entry.label}_sp{self.sparsity:g}_seed{self.seed}"


def plan(cfg: SweepConfig) -> list[Point]:
    """Every point of the grid: model, then entry (the file's order is the priority), hook,
    sparsity, seed. Refuses a point that two entries both give."""
    points, seen = [], set()
    for model in cfg.data.models:
        hooks = model.hooks or cfg.data.hooks
        for entry in cfg.grid:
            for hook in [h for h in hooks if entry.hooks is None or h in entry.hooks]:
                for sparsity in entry.sparsity:
                    for seed in entry.seeds:
                        p = Point(model, hook, entry, sparsity, seed)
                        if (model.name, hook, p.name) in seen:
                            raise SignSAEError(
                                f"grid: run {p.name} at {model.name} {hook} is given twice; "
                                "entries with the same label need other sparsities or seeds."
                            )
                        seen.add((model.name, hook, p.name))
                        points.append(p)
    return points


@dataclass
class Run:
    """A point resolved against its model: the spec that trains one SAE (hook, architecture,
    width, sparsity, options, TrainConfig with the seed), its hash and its folder."""

    point: Point
    hook: str  # the full hook name
    d_in: int
    width: int  # d_sae
    train: TrainConfig  # the sweep's recipe, the entry's overrides and the point's seed
    data: DataConfig
    out_dir: Path

    def sae_config(self) -> Any:
        """The SAE's full training config (SAELens object, library defaults filled in)."""
        return self._make(training_config)

    def training_sae(self) -> Any:
        """A fresh TrainingSAE of this spec; the sparsity warms up over the first 10% of steps."""
        return self._make(make_training_sae)

    def _make(self, fn: Callable[..., Any]) -> Any:
        p = self.point
        metadata = {
            "model_name": p.model.name,
            "hook_name": self.hook,
            "context_size": self.data.context_size,
            "prepend_bos": True,
        }
        return fn(
            p.entry.arch,
            self.d_in,
            self.width,
            p.sparsity,
            warm_up_steps=self.train.total_steps // 10,
            metadata=metadata,
            device=self.data.device,
            **p.entry.options,
        )

    @cached_property
    def config_hash(self) -> str:
        """sha256 of the resolved configuration: everything that determines the run's rows (one
        per held-out split, ``data.eval_split``)."""
        sae = self.sae_config().to_dict()
        sae["metadata"] = {k: v for k, v in sae["metadata"].items() if k not in _VERSIONS}
        recipe = {k: v for k, v in asdict(self.train).items() if k not in BOOKKEEPING}
        key = {
            "label": self.point.entry.label,
            "sae": sae,
            "train": recipe,
            "data": {k: getattr(self.data, k) for k in _DATA_KEYS},
        }
        text = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def folder(self) -> Path:
        p = self.point
        leaf = f"{p.name}_{self.config_hash[:10]}"
        return self.out_dir / "runs" / _safe(p.model.name) / _safe(p.hook) / leaf

    @property
    def trained(self) -> bool:
        return (self.folder / TRAIN_FILE).is_file()

    def record(self) -> Row:
        """The run's identity columns (also kept in its train.json)."""
        p, e = self.point, self.point.entry
        return {
            "config_hash": self.config_hash,
            "model": p.model.name,
            "hook": self.hook,
            "hook_kind": p.hook,
            "label": e.label,
            "name": p.name,
            "arch": e.arch,
            "ablation_of": e.ablation_of,
            "width_factor": e.width,
            "d_in": self.d_in,
            "sparsity": p.sparsity,
            "seed": p.seed,
            "options": json.dumps(e.options, sort_keys=True),
            "train": json.dumps(e.train, sort_keys=True),
            "folder": str(self.folder.relative_to(self.out_dir)),
        }


def resolve(cfg: SweepConfig, model_spec: ModelSpec, model: Any) -> list[Run]:
    """The plan's runs of one model, resolved against it: hook names, widths, hashes."""
    points = [p for p in plan(cfg) if p.model.name == model_spec.name]
    layer = model_spec.layer if model_spec.layer is not None else cfg.data.layer
    names = {h: resolve_hook(model, h, layer) for h in dict.fromkeys(p.hook for p in points)}
    d_in = _hook_widths(model, list(names.values()))
    return [
        Run(
            point=p,
            hook=names[p.hook],
            d_in=d_in[names[p.hook]],
            width=max(1, round(p.entry.width * cfg.h_expansion * d_in[names[p.hook]])),
            train=replace(cfg.train, **p.entry.train, seed=p.seed),
            data=cfg.data,
            out_dir=Path(cfg.out_dir),
        )
        for p in points
    ]


def resolve_hook(model: Any, hook: str, layer: int | None) -> str:
    """A hook kind (``mlp_out``) at ``layer`` (default: mid depth), or a full hook name as is."""
    if hook in HOOK_KINDS:
        return hook_name(hook, mid_layer(model) if layer is None else layer)
    return hook


@torch.inference_mode()
def _hook_widths(model: Any, hooks: list[str]) -> dict[str, int]:
    """Width of one token's activation at each hook, from a two-token forward."""
    for hook in hooks:
        validate_hook(model, hook)
    tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=hooks)
    return {h: math.prod(cache[h].shape[2:]) for h in hooks}


def _safe(name: str) -> str:
    return name.replace("/", "--")


# ---- one run: train, evaluate -------------------------------------------------------------
def train_run(run: Run, acts: torch.Tensor, progress: bool = True) -> Row:
    """Train (or resume, or reuse) one SAE into ``run.folder``: ``sae/`` and ``train.json``
    (``checkpoint/`` while training); returns its train.json. Under torchrun the ranks that
    call it train it together; inside ``distributed.alone()`` one process does. The run's lock
    file keeps a second process off the folder: it waits, then finds the run trained."""
    folder = run.folder
    with locked(folder / LOCK_FILE) if distributed.is_main() else contextlib.nullcontext():
        distributed.barrier()  # the other ranks wait while rank 0 waits for the lock
        if not run.trained:
            torch.manual_seed(run.train.seed)
            sae = run.training_sae()
            batches = TensorBatches(acts, run.train.batch_size, seed=run.train.seed)
            result = train(sae, batches, run.train, run_dir=folder, resume=True, progress=progress)
            if distributed.is_main():
                save_sae(sae, folder / "sae")
                info = {
                    "run": run.record(),
                    **asdict(result),
                    "n_params_train": parameter_count(sae),
                }
                atomic_write_text(folder / TRAIN_FILE, json.dumps(info, indent=1))
                shutil.rmtree(folder / CHECKPOINT, ignore_errors=True)
            distributed.barrier()
    return read_json(folder / TRAIN_FILE)


def evaluate_run(run: Run, held: HeldOut, columns: Columns | None = None) -> Row:
    """The results row of one trained run: its identity, held-out metrics and timings."""
    info = read_json(run.folder / TRAIN_FILE)
    sae = load_sae(run.folder / "sae", device=run.data.device)
    start = time.perf_counter()
    res = held.evaluate(sae, run.hook)
    extra = columns(sae, held.acts[run.hook]) if columns is not None else {}
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


# ---- many runs: the commands --------------------------------------------------------------
class Source:
    """Where a sweep's models and token rows come from: ``load_model`` (or ``models`` already
    loaded, by name) and ``data.text``; tests swap in a tiny model."""

    def __init__(self, data: DataConfig, models: dict[str, Any] | None = None) -> None:
        self.data, self.models = data, dict(models or {})

    def model(self, name: str) -> Any:
        if name in self.models:
            return self.models[name]
        return load_model(name, device=self.data.device)

    def tokens(self, model: Any, split: str) -> torch.Tensor:
        n = (
            self.data.train_tokens if split == "train" else self.data.eval_tokens
        )  # validation, test
        return tokenize(model, load_texts(self.data.text, split), self.data.context_size, n)


def train_runs(cfg: SweepConfig, source: Source | None = None, progress: bool = True) -> list[Run]:
    """``sign-sae train``: harvest and train every run not trained yet; returns every run.
    Under torchrun the ranks train each run together (data-parallel)."""
    source = source or Source(cfg.data)
    _start(cfg)
    every = []
    for spec in cfg.data.models:
        model = source.model(spec.name)
        runs = resolve(cfg, spec, model)
        todo = [r for r in runs if not r.trained]
        log.info("%s: %d of %d runs to train", spec.name, len(todo), len(runs))
        if todo:
            tokens, hooks = source.tokens(model, "train"), [r.hook for r in todo]
            acts = _TrainActs(harvest_split(cfg, spec.name, model, tokens, hooks, "train"))
            for i, run in enumerate(todo):
                log.info("[%d/%d] training %s at %s", i + 1, len(todo), run.point.name, run.hook)
                train_run(run, acts(run.hook), progress)
        every += runs
    return every


def evaluate_runs(
    cfg: SweepConfig, columns: Columns | None = None, source: Source | None = None
) -> list[Row]:
    """``sign-sae eval``: evaluate every trained run without a row for ``data.eval_split``
    (reading only that split's tokens and harvest) into the results table; returns all its
    rows."""
    source = source or Source(cfg.data)
    table = ResultsTable(Path(cfg.out_dir))
    for spec in cfg.data.models:
        model = source.model(spec.name)
        runs = resolve(cfg, spec, model)
        todo = [r for r in runs if r.trained and not table.has(r)]
        untrained = sum(not r.trained for r in runs)
        log.info("%s: %d runs to evaluate, %d not trained", spec.name, len(todo), untrained)
        if todo:
            tokens = source.tokens(model, cfg.data.eval_split)
            held = held_out_split(cfg, spec.name, model, tokens, [r.hook for r in todo])
            for run in todo:
                table.add(evaluate_run(run, held, columns))
    return table.rows


def run_sweep(
    cfg: SweepConfig,
    columns: Columns | None = None,
    source: Source | None = None,
    progress: bool = True,
) -> list[Row]:
    """Train and evaluate every run of ``cfg`` not yet in its results table; returns all rows.
    Under torchrun the runs are shared out over the ranks, each trained by one process.

    ``columns(sae, held_out_acts)`` adds per-run columns; ``source`` supplies the models and
    tokens (default ``Source(cfg.data)``)."""
    source = source or Source(cfg.data)
    table = _start(cfg)
    for spec in cfg.data.models:
        model = source.model(spec.name)
        runs = resolve(cfg, spec, model)
        todo = [r for r in runs if not table.has(r)]
        log.info("%s: %d of %d runs to do", spec.name, len(todo), len(runs))
        if todo:
            _sweep_model(cfg, source, model, todo, table, columns, progress)
    return table.rows


def _sweep_model(
    cfg: SweepConfig,
    source: Source,
    model: Any,
    todo: list[Run],
    table: "ResultsTable",
    columns: Columns | None,
    progress: bool,
) -> None:
    """All pending runs of one model from its two harvests (train and the held-out split, every
    hook)."""
    name, hooks = todo[0].point.model.name, [r.hook for r in todo]
    acts = _TrainActs(
        harvest_split(cfg, name, model, source.tokens(model, "train"), hooks, "train")
    )
    held = held_out_split(cfg, name, model, source.tokens(model, cfg.data.eval_split), hooks)
    order = {run.config_hash: i for i, run in enumerate(todo)}
    world = distributed.get_world()
    for start in range(0, len(todo), world):  # under torchrun, rank r takes run start + r
        rows = []
        for run in distributed.shard(todo[start : start + world]):
            where = run.folder.relative_to(run.out_dir)
            log.info("[%d/%d] %s", order[run.config_hash] + 1, len(todo), where)
            with distributed.alone():  # each run is one process's job
                train_run(run, acts(run.hook), progress)
                rows.append(evaluate_run(run, held, columns))
        for row in distributed.gather_rows(rows, key=lambda r: order[r["config_hash"]]):
            table.add(row)


def _start(cfg: SweepConfig) -> "ResultsTable":
    """Remove temporary files that killed processes left, write the config into the run folder
    (rank 0) and open its results table."""
    out = Path(cfg.out_dir)
    if distributed.is_main():
        remove_stale(out)
        atomic_write_text(out / SWEEP_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return ResultsTable(out)


def activations_dir(out_dir: str | Path, model_name: str, split: str) -> Path:
    """The folder of one model's harvest of one split (a subfolder per hook)."""
    return Path(out_dir) / "activations" / _safe(model_name) / split


def harvest_split(
    cfg: SweepConfig,
    model_name: str,
    model: Any,
    tokens: torch.Tensor,
    hooks: list[str],
    split: str,
) -> dict[str, ActivationCache]:
    """One harvest of ``tokens`` (a split's) at ``hooks`` into the sweep's cache, or the cache
    as it is when it holds them; under torchrun rank 0 fills it and the others reuse it."""
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
    """The evaluator of one model over the harvest of ``data.eval_split`` at ``hooks``."""
    caches = harvest_split(cfg, model_name, model, tokens, hooks, cfg.data.eval_split)
    return HeldOut(
        model,
        tokens,
        {h: c.load() for h, c in caches.items()},
        ce_rows=max(cfg.data.ce_tokens // cfg.data.context_size, 1),
        batch_size=cfg.data.eval_batch_size,
    )


class _TrainActs:
    """Training activations by hook, one hook in memory at a time."""

    def __init__(self, caches: dict[str, ActivationCache]) -> None:
        self.caches, self.hook, self.acts = caches, "", torch.empty(0)

    def __call__(self, hook: str) -> torch.Tensor:
        if hook != self.hook:
            self.hook, self.acts = hook, torch.empty(0)  # free the last hook's first
            self.acts = self.caches[hook].load()
        return self.acts


# ---- trained runs of a folder -------------------------------------------------------------
def trained_runs(out_dir: str | Path) -> dict[str, Row]:
    """Every trained run under ``out_dir`` in the plan's order, by its ``short_names`` name; the
    value is its identity record (``Run.record``: name, model, hook, folder, config_hash, ...)."""
    out = Path(out_dir)
    records = [read_json(p)["run"] for p in sorted(out.glob(f"runs/*/*/*/{TRAIN_FILE}"))]
    if (out / SWEEP_FILE).is_file():
        rank = {(p.model.name, p.hook, p.name): i for i, p in enumerate(plan(load_sweep(out)))}
        records.sort(key=lambda r: rank.get((r["model"], r["hook_kind"], r["name"]), len(rank)))
    return dict(zip(short_names(records), records, strict=True))


def short_names(records: list[Row]) -> list[str]:
    """A name per run (record or results row) that no other run of ``records`` has: its label,
    else ``<label>_sp<sparsity>_seed<seed>``, qualified by hook kind, then model, where those
    repeat; else its folder. Reports, exports and printed tables name runs this way."""
    for key in _KEYS:
        names = [key(r) for r in records]
        if len(set(names)) == len(names):
            return names
    raise AssertionError("two runs share a folder")


_KEYS: list[Callable[[Row], str]] = [
    lambda r: r["label"],
    lambda r: r["name"],
    lambda r: f"{r['hook_kind']}/{r['name']}",
    lambda r: f"{r['model']}/{r['hook_kind']}/{r['name']}",
    lambda r: r["folder"],
]


# ---- the results table --------------------------------------------------------------------
def sequences_file(split: str) -> str:
    """The run folder's file of per-sequence sums (``SequenceStats``) on a held-out split."""
    return f"sequences-{split}.safetensors"


def load_sequences(run_folder: str | Path, split: str) -> SequenceStats:
    """A run's per-sequence sums on ``split``, for the paired bootstrap of ``analyses.gaps``."""
    tensors = read_weights(Path(run_folder) / sequences_file(split))
    return SequenceStats(**{k: tensors[k] for k in SequenceStats.__dataclass_fields__})


def row_split(row: Row) -> str:
    """The held-out split of a results row; rows written before the three splits have none and
    were evaluated on what is now the validation split."""
    return row.get("split") or "validation"


def _key(row: Row) -> tuple[str, str]:
    return row["config_hash"], row_split(row)


class ResultsTable:
    """The sweep's rows, one per run and held-out split (``config_hash``, ``split``); ``add``
    rewrites JSON and CSV atomically.

    Processes that share the folder take turns under its lock file, and each ``add`` merges
    into the rows on disk, so no process drops another's rows."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.rows: list[Row] = self._read()

    def _read(self) -> list[Row]:
        path = self.folder / RESULTS_JSON
        return read_json(path) if path.is_file() else []

    def has(self, run: Run) -> bool:
        """Whether ``run`` has a row for its ``data.eval_split``."""
        return (run.config_hash, run.data.eval_split) in {_key(r) for r in self.rows}

    def add(self, row: Row) -> None:
        if not distributed.is_main():
            self.rows = [r for r in self.rows if _key(r) != _key(row)] + [row]
            return
        with locked(self.folder / ".results.lock"):
            ours = {_key(r): r for r in self.rows}  # as computed (NaN, not null)
            disk = [r for r in self._read() if _key(r) != _key(row)]
            self.rows = [ours.get(_key(r), r) for r in disk] + [row]
            atomic_write_text(
                self.folder / RESULTS_JSON, json.dumps(_json_safe(self.rows), indent=1)
            )
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


def format_table(rows: list[Row]) -> str:
    """The ``SUMMARY`` columns of the rows as a Markdown table, runs named by ``short_names``."""
    named = [{**r, "name": n} for r, n in zip(rows, short_names(rows), strict=True)]
    return markdown_table(
        [c for c, _ in SUMMARY], ([f.format(r[c]) for c, f in SUMMARY] for r in named)
    )


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
