"""Evaluate any SAELens SAE spliced into its model on held-out tokens; all metrics in one result.

Per batch: one clean forward (caching the SAE's hook), one with the hook's activations replaced
by the SAE's reconstruction, one with them zero-ablated. Position 0 (BOS, an attention sink) is
left clean and excluded from every metric when ``exclude_bos``. Sign-aware throughout: L0 and the
dead fraction count f != 0 (see docs/metrics.md).
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from sign_sae.architectures import parameter_count
from sign_sae.metrics import LatentStats, ReconstructionStats
from sign_sae.models import validate_hook


@dataclass
class EvalResult:
    """Held-out metrics of one SAE; ``dead_fraction`` is over the ``n_tokens`` evaluated."""

    architecture: str
    hook: str
    d_sae: int
    n_params: int
    n_tokens: int
    r2: float
    mse: float
    l0: float
    dead_fraction: float
    bipolar_fraction: float  # alive latents with polarity balance >= 0.1
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    ce_loss_recovered: float
    kl_with_sae: float  # mean over positions of KL(clean || with SAE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Per-position cross-entropy of predicting tokens[t+1] from position t >= start."""
    logp = logits[:, start:-1].log_softmax(-1)
    return -logp.gather(-1, tokens[:, start + 1 :, None]).squeeze(-1)


def _replace(start: int, value: torch.Tensor | float):
    """A forward hook that overwrites positions >= start of the hooked activation."""

    def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        act[:, start:] = value
        return act

    return hook_fn


@dataclass
class _Tally:
    """Running sums for one SAE."""

    latents: LatentStats
    recon: ReconstructionStats = field(default_factory=ReconstructionStats)
    ce: float = 0.0
    kl: float = 0.0


def evaluate(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    hook: str | None = None,
    batch_size: int = 8,
    exclude_bos: bool = True,
    progress: bool = True,
) -> EvalResult:
    """R^2, L0, dead fraction, CE loss recovered and KL of ``sae`` at ``hook`` on ``tokens``."""
    return evaluate_many([sae], model, tokens, hook, batch_size, exclude_bos, progress)[0]


@torch.inference_mode()
def evaluate_many(
    saes: Sequence[Any],
    model: Any,
    tokens: torch.Tensor,
    hook: str | None = None,
    batch_size: int = 8,
    exclude_bos: bool = True,
    progress: bool = True,
) -> list[EvalResult]:
    """``evaluate`` for several SAEs on one hook, sharing the clean and zero-ablated forwards."""
    hooks = {hook or sae.cfg.metadata.hook_name for sae in saes}
    if None in hooks or len(hooks) != 1:
        raise ValueError(
            f"The SAEs must name one hook in their metadata (got {sorted(map(str, hooks))}); "
            "pass hook='blocks.L.hook_...'."
        )
    (hook,) = hooks
    validate_hook(model, hook)
    start = 1 if exclude_bos else 0
    tallies = [_Tally(LatentStats(sae.cfg.d_sae)) for sae in saes]
    ce_clean = ce_zero = 0.0
    n_pred = 0
    for batch in tqdm(tokens.split(batch_size), desc="eval", disable=not progress, leave=False):
        clean_logits, cache = model.run_with_cache(batch, names_filter=[hook])
        acts = cache[hook]
        zero_logits = model.run_with_hooks(batch, fwd_hooks=[(hook, _replace(start, 0.0))])
        ce_clean += _next_token_ce(clean_logits, batch, start).sum().item()
        ce_zero += _next_token_ce(zero_logits, batch, start).sum().item()
        logp_clean = clean_logits[:, start:-1].log_softmax(-1)
        n_pred += logp_clean.shape[0] * logp_clean.shape[1]
        for sae, tally in zip(saes, tallies, strict=True):
            feats = sae.encode(acts[:, start:])
            x_hat = sae.decode(feats).to(acts.dtype)
            tally.latents.update(feats)
            tally.recon.update(acts[:, start:], x_hat)
            logits = model.run_with_hooks(batch, fwd_hooks=[(hook, _replace(start, x_hat))])
            tally.ce += _next_token_ce(logits, batch, start).sum().item()
            logp = logits[:, start:-1].log_softmax(-1)
            tally.kl += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
    ce_clean, ce_zero = ce_clean / n_pred, ce_zero / n_pred
    return [
        _result(sae, t, hook, ce_clean, ce_zero, n_pred)
        for sae, t in zip(saes, tallies, strict=True)
    ]


def _result(
    sae: Any, t: _Tally, hook: str, ce_clean: float, ce_zero: float, n_pred: int
) -> EvalResult:
    alive = t.latents.alive
    bipolar = (t.latents.balance[alive] >= 0.1).double().mean().item() if alive.any() else 0.0
    ce_sae = t.ce / n_pred
    gap = ce_zero - ce_clean
    return EvalResult(
        architecture=sae.cfg.architecture(),
        hook=hook,
        d_sae=sae.cfg.d_sae,
        n_params=parameter_count(sae),
        n_tokens=t.latents.n_tokens,
        r2=t.recon.explained_variance,
        mse=t.recon.mse,
        l0=t.latents.l0,
        dead_fraction=t.latents.dead_fraction,
        bipolar_fraction=bipolar,
        ce_clean=ce_clean,
        ce_with_sae=ce_sae,
        ce_zero_ablation=ce_zero,
        ce_loss_recovered=(ce_zero - ce_sae) / gap if gap > 0 else float("nan"),
        kl_with_sae=t.kl / n_pred,
    )
