"""The plan resolved against its model: a ``Run`` is the spec that trains one SAE (hook name,
width, TrainConfig with the seed), keyed by a hash of its resolved configuration and given a
folder.

The hash covers the SAE's full config (library defaults included, so a changed default re-keys
the run), the TrainConfig less its bookkeeping fields, the label and the data fields that feed
the run (text, token budgets, precisions, the stream). Folders:

    OUT/runs/<model>/<hook>/<name>_<hash>/        sae/, train.json (checkpoint/ while training)
"""

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from sign_sae.architectures import make_training_sae, training_config
from sign_sae.errors import SignSAEError
from sign_sae.models import HOOK_KINDS, hook_name, mid_layer, validate_hook
from sign_sae.runs.config import DataConfig, ModelSpec, Point, SweepConfig, plan
from sign_sae.storage import read_json
from sign_sae.trainer import BOOKKEEPING, TrainConfig

TRAIN_FILE = "train.json"
FAILED_FILE = "failed.json"  # why and at which step a run's training stopped
# SAE metadata that only records versions, left out of the run hash with TrainConfig's
# BOOKKEEPING fields.
_VERSIONS = ("sae_lens_version", "sae_lens_training_version")
# The data fields that feed a run's SAE or its row (the rest are in the SAE's config).
_DATA_KEYS = (
    "text", "train_tokens", "eval_tokens", "ce_tokens", "harvest_dtype", "forward_dtype",
    "buffer_tokens", "stream_seed",
)  # fmt: skip

Row = dict[str, Any]


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
        return self.out_dir / "runs" / safe_name(p.model.name) / safe_name(p.hook) / leaf

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


# what every reader of a run's train.json relies on, and the identity record's fields
_TRAIN_INFO = {"run": dict, "steps": int, "wall_s": float, "n_params_train": int}
_RECORD = ("name", "label", "model", "hook", "hook_kind", "folder", "config_hash")


def read_train_info(path: Path) -> dict[str, Any]:
    """A run's ``train.json``, checked for the fields its readers use; a damaged one is one
    line naming the file and the fix."""
    fix = f"delete {Path(path).parent} and train the run again."
    info = read_json(path, dict, _TRAIN_INFO, fix=fix)
    missing = [k for k in _RECORD if k not in info["run"]]
    if missing:
        raise SignSAEError(f"{path}: its run record lacks {missing}; {fix}")
    return info


def safe_name(name: str) -> str:
    """A model or hook name as one folder name."""
    return name.replace("/", "--")
