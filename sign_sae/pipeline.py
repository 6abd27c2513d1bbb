"""The real-model pipeline: text -> model -> cached activations -> trained SAEs -> held-out metrics.

A ``RunConfig`` (a dataclass; JSON or YAML files set it) describes one run: a model, a text
source, one hook, and the SAEs to train on it. The run folder holds everything:

    RUN_DIR/config.json
    RUN_DIR/activations/<hook>/...          (train split, reused across runs)
    RUN_DIR/<sae name>/checkpoint/          (training state, for --resume)
    RUN_DIR/<sae name>/sae/                 (the trained SAE in SAELens's format)
    RUN_DIR/<sae name>/train.json           (steps, wall time, scaling factor, loss history)
    RUN_DIR/results.json                    (held-out metrics of every SAE)
"""

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens import SAE

from sign_sae import distributed
from sign_sae.architectures import ARCHITECTURES, make_training_sae
from sign_sae.corpus import load_texts, tokenize
from sign_sae.evaluate import evaluate_many
from sign_sae.harvest import DTYPES, harvest
from sign_sae.models import DEFAULT_MODEL, HOOK_KINDS, hook_name, load_model, mid_layer
from sign_sae.storage import atomic_write_text
from sign_sae.training import TensorBatches, TrainConfig, train

log = logging.getLogger(__name__)


@dataclass
class SAESpec:
    """One SAE to train: a name (its folder), an architecture, a width and a sparsity knob."""

    name: str
    arch: str = "sa_gsae"
    width: int = 2304
    sparsity: float = 1.0  # L1/L0 coefficient, or k for topk/abstopk
    options: dict[str, Any] = field(default_factory=dict)  # extra config fields

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"SAE {self.name!r}: unknown architecture {self.arch!r}; choose one of "
                f"{sorted(ARCHITECTURES)}."
            )
        if self.width <= 0:
            raise ValueError(f"SAE {self.name!r}: width must be positive, got {self.width}.")


@dataclass
class RunConfig:
    """Everything one run needs; ``RunConfig.load(path)`` reads it from JSON or YAML."""

    out_dir: str = "runs/demo"
    model: str = DEFAULT_MODEL
    text: str = "shakespeare"
    hook: str = "mlp_out"  # a kind (resid_mid, mlp_out, attn_out) or a full hook name
    layer: int | None = None  # default: mid depth
    context_size: int = 128
    train_tokens: int = 200_000
    eval_tokens: int = 16_384
    harvest_dtype: str = "float32"
    harvest_batch_size: int = 32
    eval_batch_size: int = 8
    saes: list[SAESpec] = field(default_factory=lambda: [SAESpec("sa_gsae")])
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.saes = [s if isinstance(s, SAESpec) else _build(SAESpec, s) for s in self.saes]
        if not isinstance(self.train, TrainConfig):
            self.train = _build(TrainConfig, self.train)
        if self.harvest_dtype not in DTYPES:
            raise ValueError(f"harvest_dtype must be one of {sorted(DTYPES)}.")
        names = [s.name for s in self.saes]
        if len(set(names)) != len(names):
            raise ValueError(f"SAE names must be unique, got {names}.")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        text = Path(path).read_text()
        data = yaml.safe_load(text)  # YAML is a superset of JSON
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of RunConfig fields.")
        return _build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Construct a dataclass from a dict, naming unknown keys instead of ignoring them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}.")
    return cls(**data)


def resolve_hook(model: Any, cfg: RunConfig) -> str:
    """A hook kind at the configured (or mid) layer, or a full hook name as given."""
    if cfg.hook in HOOK_KINDS:
        return hook_name(cfg.hook, mid_layer(model) if cfg.layer is None else cfg.layer)
    return cfg.hook


def prepare(
    cfg: RunConfig, model: Any | None = None
) -> tuple[Any, str, torch.Tensor, torch.Tensor]:
    """Load the model, pick the hook and make (train activations, eval tokens)."""
    model = model if model is not None else load_model(cfg.model)
    hook = resolve_hook(model, cfg)
    train_tokens = tokenize(
        model, load_texts(cfg.text, "train"), cfg.context_size, cfg.train_tokens
    )
    eval_tokens = tokenize(model, load_texts(cfg.text, "eval"), cfg.context_size, cfg.eval_tokens)
    cache = harvest(
        model,
        train_tokens,
        [hook],
        Path(cfg.out_dir) / "activations",
        batch_size=cfg.harvest_batch_size,
        dtype=DTYPES[cfg.harvest_dtype],
        model_name=cfg.model,
    )[hook]
    return model, hook, cache.load(), eval_tokens


def train_saes(
    cfg: RunConfig, model: Any, hook: str, acts: torch.Tensor, resume: bool = False
) -> dict[str, Path]:
    """Train every SAE of the run (skipping finished ones); returns their SAE folders.

    Under ``torchrun`` every rank calls it; the ranks train each SAE together and rank 0 writes.
    """
    out = Path(cfg.out_dir)
    if distributed.is_main():
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    folders = {}
    for spec in cfg.saes:
        run_dir = out / spec.name
        folders[spec.name] = run_dir / "sae"
        if (run_dir / "train.json").exists() and not resume:
            log.info("%s already trained; skipping", spec.name)
            continue
        torch.manual_seed(cfg.train.seed)
        sae = make_training_sae(
            spec.arch,
            acts.shape[1],
            spec.width,
            spec.sparsity,
            warm_up_steps=cfg.train.total_steps // 10,
            metadata={
                "model_name": cfg.model,
                "hook_name": hook,
                "context_size": cfg.context_size,
                "prepend_bos": True,
            },
            **spec.options,
        )
        log.info("training %s (%s, width %d)", spec.name, spec.arch, spec.width)
        batches = TensorBatches(acts, cfg.train.batch_size, seed=cfg.train.seed)
        result = train(sae, batches, cfg.train, run_dir=run_dir, resume=resume)
        if distributed.is_main():
            sae.save_inference_model(run_dir / "sae")
            atomic_write_text(run_dir / "train.json", json.dumps(asdict(result), indent=2))
    return folders


def evaluate_run(cfg: RunConfig, model: Any, eval_tokens: torch.Tensor) -> list[dict[str, Any]]:
    """Evaluate every trained SAE of the run on held-out tokens; writes results.json."""
    out = Path(cfg.out_dir)
    saes = [SAE.load_from_disk(out / spec.name / "sae") for spec in cfg.saes]
    results = evaluate_many(saes, model, eval_tokens, batch_size=cfg.eval_batch_size)
    rows = []
    for spec, res in zip(cfg.saes, results, strict=True):
        info = json.loads((out / spec.name / "train.json").read_text())
        rows.append(
            {"name": spec.name, **res.to_dict(), "train_s": info["wall_s"], "steps": info["steps"]}
        )
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    return rows


COLUMNS = [
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


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the results."""
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(f.format(r[c]) for c, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def demo_config(out_dir: str = "runs/demo") -> RunConfig:
    """The ``make demo`` run: half-width SA-GSAE vs full-width Gated on SmolLM2 MLP-out."""
    return RunConfig(
        out_dir=out_dir,
        hook="mlp_out",
        train_tokens=200_000,
        eval_tokens=16_384,
        saes=[
            SAESpec("sa_gsae_H", "sa_gsae", width=1152, sparsity=5.0),
            SAESpec("gated_2H", "gated", width=2304, sparsity=10.0),
        ],
        # three epochs of the 200k training tokens, warm-up then linear decay
        train=TrainConfig(
            total_steps=585,
            batch_size=1024,
            lr=1e-3,
            lr_warm_up_steps=30,
            lr_decay_steps=117,
            checkpoint_every=100,
            log_every=15,
        ),
    )
