"""The one training loop for every SAE (SA-GSAE and SAELens's baselines): ``Trainer``.

The SAE stays an SAELens ``TrainingSAE`` and is stepped through its own
``training_forward_pass``. The trainer owns everything around it: Adam with one parameter group
per learning-rate multiplier, the learning-rate and sparsity schedules, input scaling, the one
dead-latent clock, the log rows, and checkpoints with exact resume (batches are a pure function
of the step, the step is deterministic, and a checkpoint holds the SAE, Adam's state and the
trainer's own state in its own files).

An SAE may implement ``Constrained`` (SA-GSAE does): the trainer then calls ``constrain`` after
every optimiser step, with the clock, to reset dead latents. SAEs without it train unchanged.

Inputs are scaled by one scalar so that E||x||^2 = d_in (over the whole source where it can
say, so that it does not depend on the seed); the factor is folded into the SAE when training
ends (``fold_activation_norm_scaling_factor``), so the saved SAE takes raw activations.

Under ``torchrun`` the same code runs data-parallel (docs/distributed.md): rank r takes rows
r::world of each global batch; one all-reduce per step makes the loss, the firing statistics and
the log row global, and gradients are summed over ranks with weights (local rows / global rows),
so they equal the 1-process gradient, before clipping. The run does not depend on the number of
ranks. Rank 0 alone writes checkpoints.
"""

import fnmatch
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from tqdm.auto import tqdm

from sign_sae import distributed, sharding
from sign_sae.errors import DivergedError, SignSAEError
from sign_sae.storage import (
    atomic_write_text,
    check_finite,
    read_json,
    read_weights,
    verify_folder,
    write_folder,
)
from sign_sae.typed import coerce_fields

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LATEST = "latest"  # a file naming the newest complete step folder under CHECKPOINT
CHECKPOINT_FILES = (
    "sae_weights.safetensors",  # the SAE's state dict
    "cfg.json",  # the SAE's config
    "optimizer.safetensors",  # Adam's state, flat
    "trainer.safetensors",  # the trainer's tensors: the dead-latent clock
    "trainer.json",  # the trainer's counters, schedule state, history and Adam's groups
)
# TrainConfig fields that never change a result (compile: beyond rounding): a resume may
# change them.
BOOKKEEPING = ("checkpoint_every", "log_every", "compile", "latent_shards", "sparse_decode")
AUTOCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Optimisation settings shared by every architecture (Adam, as in SAELens)."""

    total_steps: int = 1000  # optimiser steps
    batch_size: int = 4096  # rows (tokens) per step, over all ranks
    lr: float = 1e-3  # base learning rate
    lr_warm_up_steps: int = 0  # linear warm-up from lr / lr_warm_up_steps
    lr_decay_steps: int = 0  # linear decay to lr_end over the last lr_decay_steps
    lr_end: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    normalize: bool = True  # scale inputs to E||x||^2 = d_in; folded back at the end
    dead_window_tokens: int = 1_000_000  # tokens without firing that make a latent dead (TopK aux)
    checkpoint_every: int = 0  # steps; 0 = only at the end
    scaling_batches: int = 8  # streamed batches the input scaling is estimated from
    skip_nonfinite: bool = False  # drop rows with NaN/Inf (logged) instead of stopping
    log_every: int = 50  # steps between history rows
    seed: int = 0
    # learning-rate multipliers by parameter-name pattern (fnmatch), e.g. {"b_gate": 10.0} for
    # a Gated SAE (SA-GSAE's threshold_lr_scale is part of its parametrisation instead)
    lr_scales: dict[str, float] = field(default_factory=dict)
    # "bfloat16": the SAE's forward under torch.autocast (matmuls in bf16; master weights,
    # optimiser state and gradients stay fp32); "float32": off
    autocast_dtype: str = "float32"
    compile: bool = False  # fuse the SA-GSAE step's element-wise passes (torch.compile)
    # split the SA-GSAE's latents over this many ranks (world = data x latent_shards ranks;
    # sign_sae.sharding, docs/distributed.md); 1 = data parallel only
    latent_shards: int = 1
    sparse_decode: bool = False  # SA-GSAE: decode from the active latents only

    def __post_init__(self) -> None:
        coerce_fields(self, "train.")  # YAML's lr: 1e-3 is a string; refuse what does not convert
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise SignSAEError(
                f"train.autocast_dtype must be one of {sorted(AUTOCAST_DTYPES)}, "
                f"got {self.autocast_dtype!r}."
            )
        for name in ("total_steps", "batch_size", "lr", "scaling_batches"):
            if not getattr(self, name) > 0:
                raise SignSAEError(f"{name} must be positive, got {getattr(self, name)}.")
        bad = {k: v for k, v in self.lr_scales.items() if not v > 0}
        if bad:
            raise SignSAEError(f"lr_scales must be positive, got {bad}.")


@runtime_checkable
class Constrained(Protocol):
    """What an SAE may offer the trainer beyond SAELens's ``TrainingSAE``."""

    def constrain(self, tokens_since_fired: torch.Tensor) -> torch.Tensor:
        """Apply constraints after an optimiser step, given the tokens since each latent last
        fired; returns the mask of latents it reset (their clocks restart)."""
        ...


class BatchSource(Protocol):
    """Anything that returns the training batch for a given step (deterministically)."""

    def batch(self, step: int) -> torch.Tensor: ...


class TensorBatches:
    """Shuffled batches from an in-memory [n, d] tensor; batch k is a pure function of (k, seed).

    With ``world`` > 1 it yields rank ``rank``'s share, rows rank::world, of global batch k.
    """

    def __init__(
        self, data: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1
    ):
        if data.ndim != 2 or data.shape[0] < batch_size:
            raise SignSAEError(
                f"Need a [n, d] tensor with n >= batch_size={batch_size}, got {tuple(data.shape)}."
            )
        if not 0 <= rank < world <= batch_size:
            raise SignSAEError(f"Need 0 <= rank < world <= batch_size, got {rank}, {world}.")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = data.shape[0] // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.data.shape[0], generator=g)
        idx = self._perm[k * self.batch_size : (k + 1) * self.batch_size]
        if self.world > 1:
            idx = idx[self.rank :: self.world]
        return self.data[idx].float()

    def shard(self, rank: int, world: int) -> "TensorBatches":
        """The same global batches, seen by rank ``rank`` of ``world``."""
        return TensorBatches(self.data, self.batch_size, self.seed, rank, world)


@dataclass
class TrainResult:
    steps: int
    wall_s: float
    scaling_factor: float
    history: list[dict[str, float]] = field(default_factory=list)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    lr = cfg.lr
    if cfg.lr_warm_up_steps and step < cfg.lr_warm_up_steps:
        return lr * (step + 1) / cfg.lr_warm_up_steps
    decay_start = cfg.total_steps - cfg.lr_decay_steps
    if cfg.lr_decay_steps and step >= decay_start:
        frac = (step - decay_start + 1) / cfg.lr_decay_steps
        return lr + (cfg.lr_end - lr) * frac
    return lr


def _coefficients(sae: TrainingSAE, step: int) -> dict[str, float]:
    out = {}
    for name, c in sae.get_coefficients().items():
        if isinstance(c, TrainCoefficientConfig):
            warm = min(1.0, (step + 1) / c.warm_up_steps) if c.warm_up_steps else 1.0
            out[name] = c.value * warm
        else:
            out[name] = float(c)
    return out


def estimate_scaling_factor(data: BatchSource, d_in: int, n_batches: int = 8) -> float:
    """sqrt(d_in / E||x||^2) over the rows training can use (those without NaN/Inf): every row
    of an in-memory source (``TensorBatches``), so the factor does not depend on the seed;
    otherwise the first ``n_batches`` batches."""
    rows = getattr(data, "data", None)
    chunks = (
        rows.split(65536) if isinstance(rows, torch.Tensor) else map(data.batch, range(n_batches))
    )
    sq = torch.cat([c[torch.isfinite(c).all(-1)].double().pow(2).sum(-1) for c in chunks])
    if sq.numel() == 0 or not sq.mean() > 0:
        return 1.0  # nothing to scale by: the first step names the bad rows
    return math.sqrt(d_in / sq.mean().item())


def _finite_rows(x: torch.Tensor, step: int, skip: bool) -> torch.Tensor:
    """The batch, or an error naming the step and count of NaN/Inf values (or, with
    ``skip``, the batch without the rows that hold them)."""
    finite = torch.isfinite(x).all(-1)
    if bool(finite.all()):
        return x
    if skip and finite.any():
        log.warning("step %d: skipped %d row(s) with NaN/Inf", step, int((~finite).sum()))
        return x[finite]
    bad = int((~torch.isfinite(x)).sum())
    raise SignSAEError(
        f"Step {step}: the batch holds {bad} NaN/Inf activation(s). Rebuild the activation "
        "cache, or set skip_nonfinite to drop such rows."
    )


def checkpoints(ckpt_root: Path) -> list[Path]:
    """The checkpoint folders under ``ckpt_root``, newest first (``latest`` names the first)."""
    return sorted((p for p in Path(ckpt_root).glob("step_*") if p.is_dir()), reverse=True)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """A checkpoint's files, after checking each against the sha256 recorded when it was
    written; a damaged, truncated or incomplete folder is a ``SignSAEError`` naming the file."""
    fix = f"delete {folder} to resume from an older checkpoint."
    verify_folder(folder, fix, required=CHECKPOINT_FILES)
    state = read_json(folder / "trainer.json")
    clock = read_weights(folder / "trainer.safetensors")
    keys = ("step", "history", "scaling_factor", "wall_s", "param_groups", "train_config")
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    missing += [] if "tokens_since_fired" in clock else ["tokens_since_fired"]
    if missing:
        raise SignSAEError(f"{folder} lacks {missing} in its files; {fix}")
    return {
        "state": state,
        "sae_cfg": read_json(folder / "cfg.json"),
        "sae": read_weights(folder / "sae_weights.safetensors"),
        "optimizer": read_weights(folder / "optimizer.safetensors"),
        "clock": clock["tokens_since_fired"],
    }


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields (both dicts have) whose values differ, as ``name: saved -> now``; metadata
    entries are compared one by one, SAELens's version stamps left out."""
    norm = lambda d: json.loads(json.dumps(d, default=str))
    saved, now = norm(saved), norm(now)
    for d in (saved, now):
        meta = d.pop("metadata", None) or {}
        d.update({f"metadata.{k}": v for k, v in meta.items() if "version" not in k})
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in saved if k in now and saved[k] != now[k]]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam's state as flat tensors (safetensors) plus its JSON-able param groups."""
    sd = opt.state_dict()
    flat = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return flat, sd["param_groups"]


def _load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor], groups) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


class Trainer:
    """Trains one SAE in place on ``data`` with ``cfg``; ``run`` returns a ``TrainResult``.

    With ``run_dir``, a checkpoint is written atomically every ``cfg.checkpoint_every`` steps
    and at the end, and ``run(resume=True)`` continues from the newest one with the same
    weights an uninterrupted run gets.
    """

    def __init__(
        self,
        sae: TrainingSAE,
        data: BatchSource,
        cfg: TrainConfig,
        run_dir: Path | None = None,
        progress: bool = True,
    ) -> None:
        torch.manual_seed(cfg.seed)
        self.full, self.mesh = sae, sharding.Mesh.of(cfg.latent_shards, sae.device)
        if self.mesh.sharded:  # this rank trains its shard; ``full`` gets them back in run()
            sae = sharding.shard(sae, self.mesh)
        self.sae, self.data, self.cfg, self.progress = sae, data, cfg, progress
        self.ckpt_root = Path(run_dir) / CHECKPOINT if run_dir is not None else None
        self.constrained = isinstance(sae, Constrained)
        self.opt = torch.optim.Adam(
            _param_groups(sae, cfg.lr_scales),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        self.step, self.history, self.wall_before, self.scale = 0, [], 0.0, 1.0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        if cfg.compile and not hasattr(sae, "compile_step"):
            log.warning("train.compile: %s has no compiled step; it runs eager", type(sae).__name__)
        elif hasattr(sae, "compile_step"):
            sae.compile_step = cfg.compile
        if cfg.sparse_decode and not hasattr(sae, "sparse_decode"):
            log.warning("train.sparse_decode: %s decodes densely", type(sae).__name__)
        elif hasattr(sae, "sparse_decode"):
            sae.sparse_decode = cfg.sparse_decode
        dtype = AUTOCAST_DTYPES[cfg.autocast_dtype]
        self.autocast = lambda: torch.autocast(
            sae.device.type, dtype, enabled=dtype != torch.float32
        )

    def run(self, resume: bool = False, stop_at: int | None = None) -> TrainResult:
        """Train to ``cfg.total_steps`` (or pause at ``stop_at``: checkpoint written, scaling
        NOT folded, so a later ``run(resume=True)`` continues) and fold the scaling in."""
        self.start(resume)
        end = self.cfg.total_steps if stop_at is None else min(stop_at, self.cfg.total_steps)
        bar = tqdm(
            range(self.step, end),
            disable=not self.progress or not distributed.is_main(),
            desc="train",
            leave=False,
        )
        for _ in bar:
            row = self.advance()
            if row is not None:
                bar.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{row['l0']:.1f}")
        return self.finish()

    def start(self, resume: bool = False) -> None:
        """Resume from the newest checkpoint (with ``resume``) or estimate the input scaling,
        and give every rank the same weights; ``advance`` then takes the steps."""
        cfg, sae = self.cfg, self.sae
        resumed = self.resume() if resume and self.ckpt_root else False
        world = distributed.get_world()
        if not resumed and cfg.normalize:
            scale = estimate_scaling_factor(self.data, sae.cfg.d_in, cfg.scaling_batches)
            # ranks that stream their own shares estimate apart: every rank takes the mean
            self.scale = (
                distributed.all_reduce_sum(torch.tensor([scale], dtype=torch.float64)).item()
                / world
            )
        mesh = self.mesh
        self.local = _local_share(self.data, mesh) if mesh.data > 1 else self.data
        if world > 1:
            _start_together(sae, self.step, broadcast=not mesh.sharded)
        sae.train()
        self._t0 = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.total_steps

    def advance(self) -> dict[str, float] | None:
        """One step on this step's batch, and the checkpoint when one is due; returns the log
        row when one is due."""
        row = self._step(self.step, self.local.batch(self.step))
        if (
            self.ckpt_root
            and self.cfg.checkpoint_every
            and self.step % self.cfg.checkpoint_every == 0
        ):
            self.save_checkpoint(self._wall())
        return row

    def finish(self) -> TrainResult:
        """Write the last checkpoint; once at ``total_steps``, fold the input scaling in and
        check the weights are finite."""
        self.wall_before, self._t0 = self._wall(), time.perf_counter()
        if self.ckpt_root is not None:
            self.save_checkpoint(self.wall_before)
            distributed.barrier()  # on every rank, the checkpoint exists once run() returns
        if self.mesh.sharded:  # the whole SAE again, on every rank
            sharding.unshard(self.sae, self.full, self.mesh)
            self.sae = self.full
        if self.done:
            self.sae.eval()
            if self.scale != 1.0:
                self.sae.fold_activation_norm_scaling_factor(self.scale)
            check_finite(
                dict(self.sae.named_parameters()), f"the SAE trained for {self.step} steps"
            )
        return TrainResult(self.step, self.wall_before, self.scale, self.history)

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self._t0

    def _step(self, step: int, batch: torch.Tensor) -> dict[str, float] | None:
        """One optimiser step on ``batch``; returns the log row when one is due."""
        cfg, sae, clock = self.cfg, self.sae, self.tokens_since_fired
        x = _finite_rows(batch, step, cfg.skip_nonfinite)
        x = x.to(sae.device, sae.dtype) * self.scale
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(cfg, step) * group["lr_scale"]
        with self.autocast():
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients=_coefficients(sae, step),
                    dead_neuron_mask=(clock >= cfg.dead_window_tokens).to(sae.device),
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )
        self.opt.zero_grad(set_to_none=True)
        n_rows, fired = self._reduce_step(out, step)
        out.loss.backward()
        if self.mesh.data > 1:
            weight = out.sae_in.shape[0] / n_rows
            distributed.reduce_gradients(sae.parameters(), weight, self.mesh.group("data"))
        if cfg.grad_clip:
            sharding.clip_gradients(sae, cfg.grad_clip, self.mesh)
        self.opt.step()
        with torch.no_grad():
            clock += n_rows
            clock[fired.cpu()] = 0
            if self.constrained:
                clock[sae.constrain(clock).cpu()] = 0
        self.step = step + 1
        if self.step % cfg.log_every and self.step != cfg.total_steps:
            return None
        row = _log_row(self.step, out, self.mesh)
        self.history.append(row)
        log.debug("step %d %s", self.step, row)
        return row

    @torch.no_grad()
    def _reduce_step(self, out: TrainStepOutput, step: int) -> tuple[int, torch.Tensor]:
        """(global rows, mask of latents fired on any rank); stops every rank on a non-finite
        global loss. One all-reduce under torchrun, none in one process."""
        active = (out.feature_acts != 0).reshape(-1, self.sae.cfg.d_sae)
        n_local = active.shape[0]
        if self.mesh.data == 1:
            if not torch.isfinite(out.loss):
                raise _loss_error(step, out.loss.item())
            return n_local, active.any(0)
        stats = torch.cat(
            [
                torch.tensor([n_local], dtype=torch.float64, device=active.device),
                out.loss.detach().double().reshape(1) * n_local,
                active.any(0).double(),
            ]
        )
        self.mesh.sum_(stats, "data")
        n_rows = int(stats[0])
        if not math.isfinite(stats[1].item() / n_rows):
            raise _loss_error(step, stats[1].item() / n_rows)
        return n_rows, stats[2:] > 0

    def save_checkpoint(self, wall: float) -> None:
        """Write ``step_<n>/`` atomically with its hashes and check it reads back; then point
        ``latest`` at it and drop all but it and the one before (kept to fall back on)."""
        if self.ckpt_root is None:
            return
        weights, (flat, groups) = self.sae.state_dict(), _optimizer_tensors(self.opt)
        clock = {"tokens_since_fired": self.tokens_since_fired}
        if self.mesh.sharded:  # the 1-process checkpoint, gathered on every rank
            names = sharding.optimizer_names(self.sae, self.opt)
            weights, clock = (sharding.gather_state(s, self.mesh) for s in (weights, clock))
            flat = sharding.gather_state(flat, self.mesh, names)
        if not distributed.is_main():
            return
        check_finite(weights, f"the SAE at step {self.step}")
        state = {
            "step": self.step,
            "scaling_factor": self.scale,
            "wall_s": wall,
            "history": self.history,
            "param_groups": groups,
            "train_config": asdict(self.cfg),
        }
        name = f"step_{self.step:09d}"
        contents = (weights, self.full.cfg.to_dict(), flat, clock, state)
        folder = self.ckpt_root / name
        write_folder(folder, dict(zip(CHECKPOINT_FILES, contents, strict=True)))
        read_checkpoint(folder)  # the pointer moves only once the new folder reads back whole
        atomic_write_text(self.ckpt_root / LATEST, name)
        for old in checkpoints(self.ckpt_root)[2:]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        """Restore the newest checkpoint whose files match their hashes, falling back to the
        one before (logged) when it is damaged; False when there is none."""
        folders = checkpoints(self.ckpt_root)
        for i, folder in enumerate(folders):
            try:
                ckpt = read_checkpoint(folder)
            except (SignSAEError, FileNotFoundError) as e:
                log.warning("checkpoint %s is damaged: %s", folder.name, e)
                continue
            if i:
                log.warning("resuming from the previous good checkpoint %s", folder.name)
            self.load_checkpoint(ckpt, folder)
            return True
        if folders:
            raise SignSAEError(
                f"No checkpoint under {self.ckpt_root} reads back whole (see the warnings "
                f"above); delete {self.ckpt_root} to restart the run from scratch."
            )
        return False

    def load_checkpoint(self, ckpt: dict[str, Any], folder: Path) -> None:
        """Restore the SAE, Adam and the trainer from ``read_checkpoint(folder)``, after
        checking that the SAE and training configs are the ones it was written with."""
        state = ckpt["state"]
        ours = {k: v for k, v in asdict(self.cfg).items() if k not in BOOKKEEPING}
        changed = config_changes(ckpt["sae_cfg"], self.full.cfg.to_dict())
        changed += config_changes(state["train_config"], ours)
        if changed:
            raise SignSAEError(
                f"{folder} was written with another config ({'; '.join(changed)}). Resume with "
                f"the same settings, or delete {folder.parent} to start again with the new ones."
            )
        weights, flat, clock = ckpt["sae"], ckpt["optimizer"], {"tokens_since_fired": ckpt["clock"]}
        if self.mesh.sharded:  # this rank's shard of the 1-process checkpoint
            names = sharding.optimizer_names(self.sae, self.opt)
            weights, clock = (sharding.local_state(s, self.mesh) for s in (weights, clock))
            flat = sharding.local_state(flat, self.mesh, names)
        self.sae.load_state_dict(weights)
        _load_optimizer(self.opt, flat, state["param_groups"])
        self.tokens_since_fired = clock["tokens_since_fired"]
        self.step, self.history = state["step"], state["history"]
        self.scale, self.wall_before = state["scaling_factor"], state["wall_s"]
        log.info("resumed from %s at step %d", folder, self.step)


def train(
    sae: TrainingSAE,
    data: BatchSource,
    cfg: TrainConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """``Trainer(sae, data, cfg, run_dir, progress).run(resume, stop_at)``: train ``sae`` in
    place and fold the input scaling back into it. Under ``torchrun`` every rank calls it with
    the same (global) ``data``, which must have a ``shard(rank, world)`` method like
    ``TensorBatches``; a checkpoint resumes with any number of ranks."""
    return Trainer(sae, data, cfg, run_dir, progress).run(resume, stop_at)


def train_together(
    trainers: Sequence[Trainer], resume: bool = True, progress: bool = True
) -> list[TrainResult | Exception]:
    """Train every trainer to its own ``total_steps``, all in step: step k of each before step
    k + 1 of any, so SAEs that read one stream (``sign_sae.stream``) share each batch, computed
    once. Each resumes from its own checkpoint. A trainer whose step fails (a non-finite loss or
    batch) ends there with its error in its place of the result; the others train on."""
    results: list[TrainResult | Exception | None] = [None] * len(trainers)
    for t in trainers:
        t.start(resume)
    live = [i for i, t in enumerate(trainers) if not t.done]
    first = min((trainers[i].step for i in live), default=0)
    last = max((t.cfg.total_steps for t in trainers), default=0)
    bar = tqdm(
        range(first, last),
        disable=not progress or not distributed.is_main(),
        desc=f"train {len(trainers)} SAE(s)",
        leave=False,
    )
    for step in bar:
        for i in list(live):
            t = trainers[i]
            if t.step != step:
                continue  # resumed further than the others: it waits for them
            try:
                t.advance()
            except (SignSAEError, FloatingPointError) as e:
                log.error("SAE %d of %d stopped at step %d: %s", i + 1, len(trainers), step, e)
                results[i] = e
                live.remove(i)
                continue
            if t.done:
                results[i] = t.finish()
                live.remove(i)
    for i, t in enumerate(trainers):
        if results[i] is None:
            results[i] = t.finish()
    return results  # type: ignore[return-value]


def _param_groups(sae: TrainingSAE, patterns: dict[str, float]) -> list[dict[str, Any]]:
    """Adam parameter groups, one per learning-rate multiplier: the first of ``patterns`` that
    matches a parameter's name decides, else 1."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    used = set()
    for name, param in sae.named_parameters():
        pattern = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
        used.add(pattern)
        scale = patterns[pattern] if pattern is not None else 1.0
        groups.setdefault(scale, []).append(param)
    unused = sorted(set(patterns) - used)
    if unused:
        names = [n for n, _ in sae.named_parameters()]
        raise SignSAEError(f"lr_scales patterns {unused} match no parameter; parameters: {names}.")
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def _loss_error(step: int, loss: float) -> DivergedError:
    return DivergedError(
        f"Step {step}: the loss is {loss}; lower the learning rate or check the inputs.", step
    )


def _local_share(data: BatchSource, mesh: sharding.Mesh) -> BatchSource:
    """This rank's share of every global batch (split over the data dimension)."""
    if not hasattr(data, "shard"):
        raise TypeError(
            f"Data-parallel training needs batches with a shard(rank, world) method (as "
            f"TensorBatches has); {type(data).__name__} has none."
        )
    return data.shard(mesh.data_rank, mesh.data)


def _start_together(sae: TrainingSAE, start: int, broadcast: bool = True) -> None:
    """Check every rank starts at the same step, then give all of them rank 0's weights
    (a shard has them already: ``sharding.shard``)."""
    if not distributed.same_on_all_ranks(start):
        raise SignSAEError(
            "Ranks found different checkpoints to resume from; the run folder must be on a "
            "file system that every node shares."
        )
    if broadcast:
        distributed.broadcast_tensors([t.detach() for t in (*sae.parameters(), *sae.buffers())])


@torch.no_grad()
def _log_row(step: int, out: TrainStepOutput, mesh: sharding.Mesh) -> dict[str, float]:
    """Loss terms, L0 and R^2 (around the batch mean) over the global batch: float64 sums,
    all-reduced under torchrun (the active latents over the latent shards too)."""
    x = out.sae_in.double()
    n = x.shape[0]
    sums = torch.cat(
        [
            torch.tensor([n], dtype=torch.float64, device=x.device),
            torch.stack([out.loss.detach(), *(v.detach() for v in out.losses.values())]).double()
            * n,
            (out.sae_out.double() - x).pow(2).sum().reshape(1),
            mesh.sum_((out.feature_acts != 0).sum().double().reshape(1), "latents"),
            x.pow(2).sum().reshape(1),
            x.sum(0),
        ]
    )
    mesh.sum_(sums, "data")
    n_rows, k = sums[0].item(), len(out.losses)
    losses = (sums[1 : k + 2] / n_rows).tolist()
    resid, active, sq = sums[k + 2 : k + 5].tolist()
    total = sq - sums[k + 5 :].pow(2).sum().item() / n_rows
    row = {"step": step, "loss": losses[0], **dict(zip(out.losses, losses[1:], strict=True))}
    row["l0"] = active / n_rows
    row["r2"] = 1.0 - resid / total
    return row
