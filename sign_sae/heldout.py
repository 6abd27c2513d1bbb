"""Held-out metrics for many SAEs of one model, sharing every pass that does not depend on the SAE.

``sign_sae.evaluate.evaluate`` runs three full forward passes per batch for every SAE. A sweep
evaluates dozens of SAEs at a few hooks of one model, so here

- R^2, MSE, L0, dead and bipolar fractions come from cached held-out activations at the hook
  (the harvest of the eval tokens; no model run),
- the clean pass runs once per model (its log-probs kept when they fit in ``max_cache_bytes``,
  and the residual stream entering each hooked block kept for the next point),
- the zero-ablation pass runs once per hook, and each SAE's spliced pass starts at the hook's
  block from the cached residual stream (``start_at_layer`` of a HookedTransformer; other models
  run from the tokens).

CE and KL use the first ``ce_rows`` rows of the tokens. The definitions are those of
``evaluate``: position 0 (BOS) is left clean and excluded, L0 and dead count f != 0.
"""

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from sign_sae.architectures import parameter_count
from sign_sae.evaluate import EvalResult, _next_token_ce
from sign_sae.metrics import LatentStats, ReconstructionStats

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_ENCODE_ROWS = 4096


class HeldOut:
    """Held-out tokens ``[n_seq, context]`` and their activations ``{hook: [n_seq * (context - 1),
    d_in]}`` (BOS dropped, as ``harvest`` stores them); ``evaluate(sae, hook)`` scores one SAE."""

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor,
        acts: Mapping[str, torch.Tensor],
        ce_rows: int | None = None,
        batch_size: int = 8,
        max_cache_bytes: int = 2**30,
    ) -> None:
        n_seq, context = tokens.shape
        for hook, a in acts.items():
            if a.shape[0] != n_seq * (context - 1):
                raise ValueError(
                    f"{hook}: {a.shape[0]} activation rows for {n_seq} x {context} tokens; "
                    "expected one per token without BOS."
                )
        self.model, self.acts, self.batch_size = model, dict(acts), batch_size
        self.tokens = tokens[: n_seq if ce_rows is None else min(ce_rows, n_seq)]
        self.layers = {h: _layer(model, h) for h in self.acts}
        n_pred = self.tokens.shape[0] * (context - 2)
        self.cache_logprobs = n_pred * model.cfg.d_vocab * 4 <= max_cache_bytes
        self._clean: dict[str, Any] | None = None
        self._zero: dict[str, float] = {}

    @property
    def n_ce_tokens(self) -> int:
        """Predicted positions that CE and KL average over."""
        return self.tokens.shape[0] * (self.tokens.shape[1] - 2)

    @torch.inference_mode()
    def evaluate(self, sae: Any, hook: str) -> EvalResult:
        """Every metric of ``sign_sae.evaluate.EvalResult`` for ``sae`` at ``hook``."""
        latents, recon = LatentStats(sae.cfg.d_sae), ReconstructionStats()
        for x in self.acts[hook].split(_ENCODE_ROWS):
            x = x.to(sae.device, sae.dtype)
            feats = sae.encode(x)
            latents.update(feats)
            recon.update(x, sae.decode(feats))
        clean = self._clean_pass()
        ce_sae = kl = 0.0
        for i, batch in enumerate(self._batches()):
            logits = self._run(batch, i, hook, _splice(sae))
            ce_sae += _next_token_ce(logits, batch, 1).sum().item()
            logp = logits[:, 1:-1].log_softmax(-1)
            logp_clean = clean["logprobs"][i] if self.cache_logprobs else self._clean_logp(batch, i)
            kl += F.kl_div(logp, logp_clean, log_target=True, reduction="none").sum().item()
        n = self.n_ce_tokens
        ce_clean, ce_zero, ce_sae = clean["ce"] / n, self._zero_ce(hook) / n, ce_sae / n
        gap = ce_zero - ce_clean
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
            ce_clean=ce_clean,
            ce_with_sae=ce_sae,
            ce_zero_ablation=ce_zero,
            ce_loss_recovered=(ce_zero - ce_sae) / gap if gap > 0 else float("nan"),
            kl_with_sae=kl / n,
        )

    def _batches(self) -> list[torch.Tensor]:
        return list(self.tokens.to(self.model.cfg.device).split(self.batch_size))

    def _clean_pass(self) -> dict[str, Any]:
        """One clean forward: CE sum, log-probs (when cached) and the residual stream entering
        every hooked block."""
        if self._clean is not None:
            return self._clean
        names = sorted(
            {f"blocks.{L}.hook_resid_pre" for L in self.layers.values() if L is not None}
        )
        ce, logprobs, resid = 0.0, [], {n: [] for n in names}
        for batch in self._batches():
            logits, cache = self.model.run_with_cache(batch, names_filter=names)
            ce += _next_token_ce(logits, batch, 1).sum().item()
            if self.cache_logprobs:
                logprobs.append(logits[:, 1:-1].log_softmax(-1))
            for n in names:
                resid[n].append(cache[n])
        self._clean = {"ce": ce, "logprobs": logprobs, "resid": resid}
        return self._clean

    def _clean_logp(self, batch: torch.Tensor, i: int) -> torch.Tensor:
        return self._run(batch, i, None, None)[:, 1:-1].log_softmax(-1)

    def _zero_ce(self, hook: str) -> float:
        if hook not in self._zero:
            self._zero[hook] = sum(
                _next_token_ce(self._run(b, i, hook, _zero), b, 1).sum().item()
                for i, b in enumerate(self._batches())
            )
        return self._zero[hook]

    def _run(self, batch: torch.Tensor, i: int, hook: str | None, fn: Any) -> torch.Tensor:
        """Logits of batch ``i`` with ``fn`` at ``hook``, from the hook's block when possible."""
        hooks = [] if hook is None else [(hook, fn)]
        layer = self.layers.get(hook) if hook is not None else None
        if layer is None:
            return self.model.run_with_hooks(batch, fwd_hooks=hooks)
        resid = self._clean_pass()["resid"][f"blocks.{layer}.hook_resid_pre"][i]
        return self.model.run_with_hooks(resid, start_at_layer=layer, tokens=batch, fwd_hooks=hooks)


def _layer(model: Any, hook: str) -> int | None:
    """The block a hook sits in, when the model can start a forward there; else None."""
    from transformer_lens import HookedTransformer

    match = _BLOCK.match(hook)
    if match is None or not isinstance(model, HookedTransformer):
        return None
    return int(match.group(1))


def _splice(sae: Any) -> Any:
    """A hook that replaces positions >= 1 with the SAE's reconstruction of them."""

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        out = act.clone()
        x = act[:, 1:]
        out[:, 1:] = sae.decode(sae.encode(x.to(sae.dtype))).to(act.dtype)
        return out

    return fn


def _zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
    out = act.clone()
    out[:, 1:] = 0.0
    return out
