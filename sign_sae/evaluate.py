"""Evaluate any SAELens SAE spliced into its model on held-out tokens; all metrics in one result.

Per batch: one clean forward (caching the SAE's hook), one with the hook's activations replaced
by the SAE's reconstruction, one with them zero-ablated. Position 0 (BOS, an attention sink) is
left clean and excluded from every metric when ``exclude_bos``. Sign-aware throughout: L0 and the
dead fraction count f != 0 (see docs/metrics.md).
"""

from dataclasses import asdict, dataclass
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


@torch.inference_mode()
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
    hook = hook or sae.cfg.metadata.hook_name
    if hook is None:
        raise ValueError("The SAE's metadata names no hook; pass hook='blocks.L.hook_...'.")
    validate_hook(model, hook)
    start = 1 if exclude_bos else 0
    latents, recon = LatentStats(sae.cfg.d_sae), ReconstructionStats()
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    n_pred = 0
    for batch in tqdm(tokens.split(batch_size), desc="eval", disable=not progress, leave=False):
        clean_logits, cache = model.run_with_cache(batch, names_filter=[hook])
        acts = cache[hook]
        feats = sae.encode(acts[:, start:])
        x_hat = sae.decode(feats).to(acts.dtype)
        latents.update(feats)
        recon.update(acts[:, start:], x_hat)

        sae_logits = model.run_with_hooks(batch, fwd_hooks=[(hook, _replace(start, x_hat))])
        zero_logits = model.run_with_hooks(batch, fwd_hooks=[(hook, _replace(start, 0.0))])
        sums["clean"] += _next_token_ce(clean_logits, batch, start).sum().item()
        sums["sae"] += _next_token_ce(sae_logits, batch, start).sum().item()
        sums["zero"] += _next_token_ce(zero_logits, batch, start).sum().item()
        logp_clean = clean_logits[:, start:-1].log_softmax(-1)
        logp_sae = sae_logits[:, start:-1].log_softmax(-1)
        kl = F.kl_div(logp_sae, logp_clean, log_target=True, reduction="none").sum(-1)
        sums["kl"] += kl.sum().item()
        n_pred += kl.numel()
    ce = {k: v / n_pred for k, v in sums.items()}
    gap = ce["zero"] - ce["clean"]
    alive = latents.alive
    bipolar = (latents.balance[alive] >= 0.1).double().mean().item() if alive.any() else 0.0
    return EvalResult(
        architecture=sae.cfg.architecture(),
        hook=hook,
        d_sae=sae.cfg.d_sae,
        n_params=parameter_count(sae),
        n_tokens=latents.n_tokens,
        r2=recon.explained_variance,
        mse=recon.mse,
        l0=latents.l0,
        dead_fraction=latents.dead_fraction,
        bipolar_fraction=bipolar,
        ce_clean=ce["clean"],
        ce_with_sae=ce["sae"],
        ce_zero_ablation=ce["zero"],
        ce_loss_recovered=(ce["zero"] - ce["sae"]) / gap if gap > 0 else float("nan"),
        kl_with_sae=ce["kl"],
    )
