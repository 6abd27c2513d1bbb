"""The training loop around any SAELens ``TrainingSAE``: schedules, checkpoints, exact resume.

The SAE stays an SAELens TrainingSAE (SA-GSAE or a baseline) and is stepped through its own
``training_forward_pass``. Batches are a pure function of the step (``TensorBatches``), the
step itself is deterministic, and checkpoints hold the SAE, Adam's state and the loop's
counters, so a resumed run ends with the same weights as an uninterrupted one.

Inputs are scaled by one scalar so that E||x||^2 = d_in (measured on the whole source where
it can say, so that it does not depend on the seed); the factor is folded into the SAE when
training ends (``fold_activation_norm_scaling_factor``), so the saved SAE takes raw activations.

Two optional controls: ``target_l0`` adapts the sparsity coefficient during training (a
multiplicative integral controller on the batch L0, after the coefficient's warm-up), so that
runs of different variants meet at the same L0; ``lr_scales`` gives parameters matched by
name patterns their own learning rates.

Under ``torchrun`` the loop is data-parallel (docs/distributed.md): rank r takes rows r::world of
each global batch, gradients are summed over ranks with weights (local rows / global rows), so
they equal the 1-process gradient, and are clipped after that. Firing statistics are global too
(a latent fired if it fired on any rank; clocks count global rows), so the run does not depend
on the number of ranks. Rank 0 alone writes checkpoints.
"""

import fnmatch
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
from tqdm.auto import tqdm

from sign_sae import distributed
from sign_sae.storage import atomic_write_text, read_weights, write_folder

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LATEST = "latest"  # a file naming the newest complete step folder under CHECKPOINT


@dataclass
class TrainConfig:
    """Optimisation settings shared by every architecture (Adam, as in SAELens)."""

    total_steps: int = 1000
    batch_size: int = 4096
    lr: float = 1e-3
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0  # linear decay to lr_end over the last lr_decay_steps
    lr_end: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    normalize: bool = True  # scale inputs to E||x||^2 = d_in; folded back at the end
    dead_window_tokens: int = 1_000_000  # for dead-latent masks (TopK aux loss)
    checkpoint_every: int = 0  # steps; 0 = only at the end
    skip_nonfinite: bool = False  # drop rows with NaN/Inf (logged) instead of stopping
    log_every: int = 50
    seed: int = 0
    target_l0: float | None = None  # adapt the sparsity coefficient until the batch L0 is this
    target_l0_rate: float = 0.02  # log-gain change per step per unit of log(L0 / target)
    lr_scales: dict[str, float] = field(default_factory=dict)  # name pattern -> lr multiplier

    def __post_init__(self) -> None:
        for name in ("total_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("lr", "target_l0_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be positive, got {self.target_l0}.")
        bad = {k: v for k, v in self.lr_scales.items() if not v > 0}
        if bad:
            raise ValueError(f"lr_scales must be positive, got {bad}.")


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
            raise ValueError(
                f"Need a [n, d] tensor with n >= batch_size={batch_size}, got {tuple(data.shape)}."
            )
        if not 0 <= rank < world <= batch_size:
            raise ValueError(f"Need 0 <= rank < world <= batch_size, got {rank}, {world}.")
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
    """sqrt(d_in / E||x||^2): over every row of an in-memory source (``TensorBatches``), so
    the factor does not depend on the seed; otherwise over the first ``n_batches`` batches."""
    rows = getattr(data, "data", None)
    if isinstance(rows, torch.Tensor):
        sq = torch.cat([c.double().pow(2).sum(-1) for c in rows.split(65536)]).mean()
        return math.sqrt(d_in / sq.item())
    sq = [data.batch(i).pow(2).sum(-1).mean() for i in range(n_batches)]
    return math.sqrt(d_in / torch.stack(sq).mean().item())


SPARSITY_KEYS = ("sparsity", "l1", "l0")  # SA-GSAE, Gated, JumpReLU coefficient names


def _sparsity_key(sae: TrainingSAE) -> str:
    """The name of the SAE's sparsity coefficient, which ``target_l0`` scales."""
    names = sae.get_coefficients()
    for key in SPARSITY_KEYS:
        if key in names:
            return key
    raise ValueError(
        f"target_l0 needs an SAE with a sparsity coefficient ({', '.join(SPARSITY_KEYS)}); "
        f"{type(sae).__name__} has {sorted(names) or 'none'}. TopK-style SAEs set L0 with k."
    )


def _param_groups(sae: TrainingSAE, lr_scales: dict[str, float]) -> list[dict[str, Any]]:
    """Adam parameter groups: one per learning-rate multiplier. The first pattern of
    ``lr_scales`` that matches a parameter's name decides, then the SAE's own ``lr_scales()``
    (SA-GSAE's ``threshold_lr_scale``); other parameters keep 1."""
    own = getattr(sae, "lr_scales", dict)()
    groups: dict[float, list[torch.nn.Parameter]] = {}
    used = set()
    for name, param in sae.named_parameters():
        pattern = next((p for p in lr_scales if fnmatch.fnmatchcase(name, p)), None)
        used.add(pattern)
        scale = lr_scales[pattern] if pattern is not None else own.get(name, 1.0)
        groups.setdefault(scale, []).append(param)
    unused = sorted(set(lr_scales) - used - {None})
    if unused:
        names = [n for n, _ in sae.named_parameters()]
        raise ValueError(f"lr_scales patterns {unused} match no parameter; parameters: {names}.")
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def _finite_rows(x: torch.Tensor, step: int, skip: bool) -> torch.Tensor:
    """The batch, or an error naming the step and count of NaN/Inf values (or, with
    ``skip``, the batch without the rows that hold them)."""
    finite = torch.isfinite(x).all(-1)
    if bool(finite.all()):
        return x
    if skip:
        log.warning("step %d: skipped %d row(s) with NaN/Inf", step, int((~finite).sum()))
        return x[finite]
    bad = int((~torch.isfinite(x)).sum())
    raise ValueError(
        f"Step {step}: the batch holds {bad} NaN/Inf activation(s). Rebuild the activation "
        "cache, or set skip_nonfinite to drop such rows."
    )


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``ckpt_root``, or None."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    folder = ckpt_root / pointer.read_text().strip()
    if not (folder / "trainer.json").is_file():
        raise ValueError(
            f"{pointer} names {folder.name}, which is missing or incomplete; delete "
            f"{ckpt_root} to restart the run from scratch."
        )
    return folder


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


def train(
    sae: TrainingSAE,
    data: BatchSource,
    cfg: TrainConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
) -> TrainResult:
    """Train ``sae`` in place for ``cfg.total_steps`` and fold the input scaling back into it.

    With ``run_dir``, an atomic checkpoint is written every ``cfg.checkpoint_every`` steps and
    at the end; ``resume=True`` continues from it (same weights as an uninterrupted run).
    ``stop_at`` pauses early (checkpoint written, scaling NOT folded) so a later call resumes.
    Under ``torchrun`` every rank calls it with the same (global) ``data``, which must have a
    ``shard(rank, world)`` method like ``TensorBatches``; the result does not depend on the
    number of ranks, and a checkpoint resumes with any number of them.
    """
    torch.manual_seed(cfg.seed)
    world = distributed.get_world()
    opt = torch.optim.Adam(
        _param_groups(sae, cfg.lr_scales), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    key = _sparsity_key(sae) if cfg.target_l0 is not None else None
    d_sae = sae.cfg.d_sae
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
    start, history, wall_before, log_gain = 0, [], 0.0, 0.0
    ckpt_root = run_dir / CHECKPOINT if run_dir is not None else None
    ckpt = latest_checkpoint(ckpt_root) if resume and ckpt_root is not None else None
    scale = estimate_scaling_factor(data, sae.cfg.d_in) if cfg.normalize and ckpt is None else 1.0
    init = getattr(sae, "initialize_from_activations", None)
    if ckpt is None and init is not None:
        init(data.batch(0).to(sae.device, sae.dtype) * scale)
    if ckpt is not None:
        state = json.loads((ckpt / "trainer.json").read_text())
        sae.load_state_dict(read_weights(ckpt / "sae_weights.safetensors"))
        opt_flat = read_weights(ckpt / "optimizer.safetensors")
        tokens_since_fired = opt_flat.pop("trainer.tokens_since_fired")
        _load_optimizer(opt, opt_flat, state["param_groups"])
        start, history, scale = state["step"], state["history"], state["scaling_factor"]
        wall_before, log_gain = state["wall_s"], state.get("log_gain", 0.0)
        log.info("resumed from %s at step %d", ckpt, start)
    if world > 1:
        data = _local_share(data, world)
        _start_together(sae, start)

    def save_checkpoint(step: int, wall: float) -> None:
        if not distributed.is_main():
            return
        flat, groups = _optimizer_tensors(opt)
        flat["trainer.tokens_since_fired"] = tokens_since_fired
        trainer = {
            "step": step,
            "scaling_factor": scale,
            "wall_s": wall,
            "log_gain": log_gain,
            "history": history,
            "param_groups": groups,
            "train_config": asdict(cfg),
        }
        name = f"step_{step:09d}"
        write_folder(
            ckpt_root / name,
            {
                "sae_weights.safetensors": sae.state_dict(),
                "cfg.json": sae.cfg.to_dict(),
                "optimizer.safetensors": flat,
                "trainer.json": trainer,
            },
        )
        # The pointer moves only once the new folder is complete; then older folders go.
        atomic_write_text(ckpt_root / LATEST, name)
        for old in ckpt_root.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    t0 = time.perf_counter()
    sae.train()
    end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)
    bar = tqdm(
        range(start, end),
        disable=not progress or not distributed.is_main(),
        desc="train",
        leave=False,
    )
    for step in bar:
        x = _finite_rows(data.batch(step), step, cfg.skip_nonfinite)
        x = x.to(sae.device, sae.dtype) * scale
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step) * group["lr_scale"]
        coefficients = _coefficients(sae, step)
        if key is not None:
            coefficients[key] *= math.exp(log_gain)
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=coefficients,
                dead_neuron_mask=(tokens_since_fired >= cfg.dead_window_tokens).to(sae.device),
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        if world == 1 and not torch.isfinite(out.loss):
            raise _loss_error(step, out.loss.item())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        active = (out.feature_acts != 0).reshape(-1, d_sae)
        n_rows, fired, n_active = active.shape[0], active.any(0), active.sum()
        if world > 1:
            n_rows, fired, n_active = _reduce_step(sae, out, active, step)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            tokens_since_fired += n_rows
            tokens_since_fired[fired.cpu()] = 0
        if key is not None and step >= _warm_up_steps(sae, key):
            l0 = n_active.item() / n_rows
            log_gain += cfg.target_l0_rate * math.log((l0 + 1) / (cfg.target_l0 + 1))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.total_steps:
            row = _log_row(done, out, x) if world == 1 else _global_log_row(done, out, x)
            if key is not None:
                row["sparsity_coefficient"] = coefficients[key]
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{row['l0']:.1f}")
            log.debug("step %d %s", done, row)
        if ckpt_root is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save_checkpoint(done, wall_before + time.perf_counter() - t0)
    wall = wall_before + time.perf_counter() - t0
    if ckpt_root is not None:
        save_checkpoint(end, wall)
        distributed.barrier()  # on every rank, the checkpoint exists once train() returns
    if end < cfg.total_steps:
        return TrainResult(end, wall, scale, history)
    sae.eval()
    if scale != 1.0:
        sae.fold_activation_norm_scaling_factor(scale)
    return TrainResult(cfg.total_steps, wall, scale, history)


def _warm_up_steps(sae: TrainingSAE, key: str) -> int:
    c = sae.get_coefficients()[key]
    return c.warm_up_steps if isinstance(c, TrainCoefficientConfig) else 0


def _loss_error(step: int, loss: float) -> FloatingPointError:
    return FloatingPointError(
        f"Step {step}: the loss is {loss}; lower the learning rate or check the inputs."
    )


def _local_share(data: BatchSource, world: int) -> BatchSource:
    """This rank's share of every global batch."""
    if not hasattr(data, "shard"):
        raise TypeError(
            f"Data-parallel training needs batches with a shard(rank, world) method (as "
            f"TensorBatches has); {type(data).__name__} has none."
        )
    return data.shard(distributed.get_rank(), world)


def _start_together(sae: TrainingSAE, start: int) -> None:
    """Check every rank starts at the same step, then give all of them rank 0's weights."""
    if not distributed.same_on_all_ranks(start):
        raise ValueError(
            "Ranks found different checkpoints to resume from; the run folder must be on a "
            "file system that every node shares."
        )
    distributed.broadcast_tensors(sae.state_dict().values())


@torch.no_grad()
def _reduce_step(
    sae: TrainingSAE, out: Any, active: torch.Tensor, step: int
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Make one step global; returns (global rows, fired-on-any-rank mask, global number of
    non-zero latent activations), from this rank's ``active`` mask ``[rows, d_sae]``.

    One all-reduce carries the rows, the loss sum, the non-zero count and the per-latent
    firing counts; a
    non-finite global loss stops every rank. Gradients become the global-batch gradient. An SAE
    that keeps its own ``tokens_since_fired`` clock (SA-GSAE) advanced it by the local rows and
    zeroed locally fired latents in its forward; it is corrected to the global rows and firings.
    """
    n_local = active.shape[0]
    stats = torch.cat(
        [
            torch.tensor([n_local], dtype=torch.float64, device=active.device),
            out.loss.detach().double().reshape(1) * n_local,
            active.sum().double().reshape(1),
            active.any(0).double(),
        ]
    )
    distributed.all_reduce_sum(stats)
    n_rows = int(stats[0])
    loss = stats[1].item() / n_rows
    if not math.isfinite(loss):
        raise _loss_error(step, loss)
    distributed.reduce_gradients(sae.parameters(), n_local / n_rows)
    fired = stats[3:] > 0
    clock = getattr(sae, "tokens_since_fired", None)
    if isinstance(clock, torch.Tensor):
        clock.add_(n_rows - n_local)  # latents not fired anywhere: + global rows in all
        clock[fired.to(clock.device)] = 0
    return n_rows, fired, stats[2]


@torch.no_grad()
def _global_log_row(step: int, out: Any, x: torch.Tensor) -> dict[str, float]:
    """``_log_row`` over the global batch (sums over ranks)."""
    n = x.shape[0]
    x64 = x.double()
    sums = torch.cat(
        [
            torch.tensor([n], dtype=torch.float64, device=x.device),
            torch.stack([out.loss.detach(), *(v.detach() for v in out.losses.values())]).double()
            * n,
            (out.sae_out - x).pow(2).sum().double().reshape(1),
            (out.feature_acts != 0).sum().double().reshape(1),
            x64.pow(2).sum().reshape(1),
            x64.sum(0),
        ]
    )
    distributed.all_reduce_sum(sums)
    n_rows, k = sums[0], len(out.losses)
    losses = (sums[1 : k + 2] / n_rows).tolist()
    resid, fired, sq = sums[k + 2 : k + 5].tolist()
    total = sq - (sums[k + 5 :].pow(2).sum() / n_rows).item()
    row = {"step": step, "loss": losses[0]}
    row.update(zip(out.losses, losses[1:], strict=True))
    row["l0"] = fired / n_rows.item()
    row["r2"] = 1.0 - resid / total
    return row


@torch.no_grad()
def _log_row(step: int, out: Any, x: torch.Tensor) -> dict[str, float]:
    resid = (out.sae_out - x).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    row = {"step": step, "loss": out.loss.item()}
    row.update({k: v.item() for k, v in out.losses.items()})
    row["l0"] = (out.feature_acts != 0).sum(-1).float().mean().item()
    row["r2"] = 1.0 - (resid / total).item()
    return row
