"""Sweep files: their schema, checks and loading, and the plan of points they describe.

A sweep file (YAML; ``load_sweep`` also takes a run folder or the name of a profile in
``sign_sae/profiles``) has four parts:

- ``data``: the models (each may set its own ``hooks`` and ``layer``), hooks, text, token
  budgets and the stream that feeds training, shared by every run, by the evaluator and by the
  report (``DataConfig``);
- ``train``: one training recipe (``TrainConfig``);
- ``h_expansion``: H = h_expansion x d_in latents;
- ``grid``: entries, each one label: an architecture at ``width`` x H with ``sparsity`` values
  (coefficient, or k for TopK / AbsTopK), ``seeds``, SAE config ``options``, optionally a subset
  of the hooks, ``ablation_of`` (the label it ablates) and ``train`` overrides of the recipe.

Every (model, hook, entry, sparsity, seed) is one ``Point`` of the ``plan``, named
``<label>_sp<sparsity>_seed<seed>``. Everything here is checked before a model loads.
"""

import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from sign_sae.architectures import ARCHITECTURES, training_config
from sign_sae.corpus import HELD_OUT
from sign_sae.errors import SignSAEError
from sign_sae.harvest import DTYPES
from sign_sae.models import DEFAULT_MODEL, HOOK_KINDS
from sign_sae.stream import DEFAULT_BUFFER_TOKENS
from sign_sae.trainer import TrainConfig
from sign_sae.typed import coerce_fields

SWEEP_FILE = "sweep.yaml"


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
    harvest_batch_size: int = 32  # sequences per forward pass (stream and held-out harvest)
    eval_batch_size: int = 8
    device: str = "cpu"
    # The training stream (sign_sae.stream): rows per hook in its mixing buffer (memory: up to
    # 2 x buffer_tokens x d_in values of harvest_dtype per hook), the seed of its order (one
    # order for every run of the sweep), the passes over train_tokens a run may take, and
    # whether the chunks the model computes are kept on disk for later epochs, runs and sweeps.
    buffer_tokens: int = DEFAULT_BUFFER_TOKENS
    stream_seed: int = 0
    epochs: int = 1
    cache: bool = False
    saes_at_once: int = 0  # SAEs trained together from one pass over the stream; 0 = all

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
        _check_int("data.buffer_tokens", self.buffer_tokens, 1)
        _check_int("data.stream_seed", self.stream_seed, 0)
        _check_int("data.epochs", self.epochs, 1)
        _check_int("data.saes_at_once", self.saes_at_once, 0)
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
                recipe = replace(self.train, **g.train)
            except (ValueError, TypeError) as e:
                raise SignSAEError(f"grid entry {g.label!r}: train: {e}") from e
            if recipe.batch_size > self.data.buffer_tokens:
                raise SignSAEError(
                    f"grid entry {g.label!r}: train.batch_size {recipe.batch_size} is larger than "
                    f"data.buffer_tokens {self.data.buffer_tokens}, the stream's buffer; raise "
                    "data.buffer_tokens or lower the batch size."
                )
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
