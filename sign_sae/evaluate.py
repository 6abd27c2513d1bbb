"""The one evaluator: held-out metrics of SAEs spliced into their model, sharing every pass that
does not depend on the SAE.

- R^2, MSE, L0, dead and bipolar fractions come from held-out activations at the hook (one row
  per token without BOS, as ``harvest`` stores them; no model run);
- the clean pass runs once per model (its log-probs kept when they fit in ``max_cache_bytes``,
  and the residual stream entering each hooked block kept for the next point);
- the zero-ablation pass runs once per hook, and each SAE's spliced pass starts at the hook's
  block from the cached residual stream (``start_at_layer`` of a HookedTransformer; other models
  run from the tokens).

Position 0 (BOS, an attention sink) is left clean and excluded from every metric; CE and KL use
the first ``ce_rows`` rows of the tokens. Sign-aware throughout: L0 and the dead fraction count
f != 0 (docs/metrics.md).

``HeldOut(model, tokens, acts)`` takes activations already harvested (a sweep's eval cache);
``held_out(model, tokens, hooks)`` reads them from the model on the fly, and
``evaluate(sae, model, tokens)`` scores one SAE that way.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch.nn import functional as F

from sign_sae.architectures import parameter_count
from sign_sae.errors import SignSAEError
from sign_sae.metrics import LatentStats, SequenceStats, bipolar_fraction
from sign_sae.models import block_entry, block_of, stop_at_layer, validate_hook

_ENCODE_ROWS = 4096


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
    bipolar_fraction: float  # alive latents with balance >= metrics.BIPOLAR_BALANCE
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    ce_loss_recovered: float
    kl_with_sae: float  # mean over positions of KL(clean || with SAE)
    # per-sequence sums behind r2 and l0, for paired bootstrap intervals (not a table column)
    sequences: SequenceStats | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The table columns (every field but ``sequences``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sequences"}


class Rows(Protocol):
    """Held-out activations of one hook: ``n_tokens`` rows, read ``n_rows`` at a time in order
    (``sign_sae.harvest.ActivationCache`` reads them from disk one piece at a time)."""

    @property
    def n_tokens(self) -> int: ...

    def iter_rows(self, n_rows: int) -> Iterator[torch.Tensor]: ...


class InMemoryRows:
    """A ``[rows, d_in]`` tensor as ``Rows``."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    @property
    def n_tokens(self) -> int:
        return self.rows.shape[0]

    def iter_rows(self, n_rows: int) -> Iterator[torch.Tensor]:
        return iter(self.rows.split(n_rows))


class HeldOut:
    """Held-out tokens ``[n_seq, context]`` and their activations at each hook, one row per
    token without BOS (a tensor ``[n_seq * (context - 1), d_in]`` or ``Rows`` read piece by
    piece, so a large held-out split is never loaded whole); ``evaluate(sae)`` scores one SAE,
    reusing every SAE-free pass."""

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor,
        acts: Mapping[str, torch.Tensor | Rows],
        ce_rows: int | None = None,
        batch_size: int = 8,
        max_cache_bytes: int = 2**30,
    ) -> None:
        n_seq, context = tokens.shape
        self.acts = {
            h: InMemoryRows(a) if isinstance(a, torch.Tensor) else a for h, a in acts.items()
        }
        for hook, a in self.acts.items():
            validate_hook(model, hook)
            if a.n_tokens != n_seq * (context - 1):
                raise SignSAEError(
                    f"{hook}: {a.n_tokens} activation rows for {n_seq} x {context} tokens; "
                    "expected one per token without BOS."
                )
        self.model, self.batch_size = model, batch_size
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
    def evaluate(self, sae: Any, hook: str | None = None) -> EvalResult:
        """Every metric of ``EvalResult`` for ``sae`` at ``hook`` (default: its metadata's)."""
        hook = hook or sae.cfg.metadata.hook_name
        if hook not in self.acts:
            raise SignSAEError(f"No held-out activations at {hook!r}; have {sorted(self.acts)}.")
        latents, parts = LatentStats(sae.cfg.d_sae), []
        per_seq = self.tokens.shape[1] - 1  # rows of one sequence (BOS dropped)
        for x in self.chunks(hook):
            x = x.to(sae.device, sae.dtype)
            feats = sae.encode(x)
            x_hat = sae.decode(feats)
            latents.update(feats)
            parts.append(SequenceStats.of(x, x_hat, feats, per_seq))
        sequences = SequenceStats.cat(parts)  # R^2 and MSE come from these sums too
        clean = self._clean_pass()
        ce_sae = kl = 0.0
        for i, batch in enumerate(self._batches()):
            logits = self._run(batch, i, hook, _splice(sae))
            ce_sae += _next_token_ce(logits, batch).sum().item()
            logp = logits[:, 1:-1].log_softmax(-1)
            logp_clean = clean["logprobs"][i] if self.cache_logprobs else self._clean_logp(batch, i)
            kl += F.kl_div(logp, logp_clean, log_target=True, reduction="sum").item()
        n = self.n_ce_tokens
        ce_clean, ce_zero, ce_sae = clean["ce"] / n, self._zero_ce(hook) / n, ce_sae / n
        gap = ce_zero - ce_clean
        return EvalResult(
            architecture=sae.cfg.architecture(),
            hook=hook,
            d_sae=sae.cfg.d_sae,
            n_params=parameter_count(sae),
            n_tokens=latents.n_tokens,
            r2=sequences.r2(),
            mse=sequences.mse(),
            l0=latents.l0,
            dead_fraction=latents.dead_fraction,
            bipolar_fraction=bipolar_fraction(latents),
            ce_clean=ce_clean,
            ce_with_sae=ce_sae,
            ce_zero_ablation=ce_zero,
            ce_loss_recovered=(ce_zero - ce_sae) / gap if gap > 0 else float("nan"),
            kl_with_sae=kl / n,
            sequences=sequences,
        )

    def chunks(self, hook: str) -> Iterator[torch.Tensor]:
        """The held-out rows at ``hook`` in pieces of whole sequences, one piece in memory."""
        per_seq = self.tokens.shape[1] - 1
        return self.acts[hook].iter_rows(per_seq * max(1, _ENCODE_ROWS // per_seq))

    def _batches(self) -> list[torch.Tensor]:
        return list(self.tokens.to(self.model.cfg.device).split(self.batch_size))

    def _clean_pass(self) -> dict[str, Any]:
        """One clean forward: CE sum, log-probs (when cached) and the residual stream entering
        every hooked block."""
        if self._clean is not None:
            return self._clean
        names = sorted({block_entry(L) for L in self.layers.values() if L is not None})
        ce, logprobs, resid = 0.0, [], {n: [] for n in names}
        for batch in self._batches():
            logits, cache = self.model.run_with_cache(batch, names_filter=names)
            ce += _next_token_ce(logits, batch).sum().item()
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
                _next_token_ce(self._run(b, i, hook, _zero), b).sum().item()
                for i, b in enumerate(self._batches())
            )
        return self._zero[hook]

    def _run(self, batch: torch.Tensor, i: int, hook: str | None, fn: Any) -> torch.Tensor:
        """Logits of batch ``i`` with ``fn`` at ``hook``, from the hook's block when possible."""
        hooks = [] if hook is None else [(hook, fn)]
        layer = self.layers.get(hook) if hook is not None else None
        if layer is None:
            return self.model.run_with_hooks(batch, fwd_hooks=hooks)
        resid = self._clean_pass()["resid"][block_entry(layer)][i]
        return self.model.run_with_hooks(resid, start_at_layer=layer, tokens=batch, fwd_hooks=hooks)


def held_out(
    model: Any,
    tokens: torch.Tensor,
    hooks: Sequence[str],
    ce_rows: int | None = None,
    batch_size: int = 8,
) -> HeldOut:
    """A ``HeldOut`` whose activations at ``hooks`` are read from ``model`` now (in memory)."""
    hooks = list(dict.fromkeys(hooks))
    for hook in hooks:
        validate_hook(model, hook)
    stop = stop_at_layer(hooks)
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    with torch.inference_mode():
        for batch in tokens.to(model.cfg.device).split(batch_size):
            _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop)
            for h in hooks:
                a = cache[h][:, 1:]
                parts[h].append(a.reshape(-1, a.shape[-1]).to("cpu", torch.float32))
    acts = {h: torch.cat(p) for h, p in parts.items()}
    return HeldOut(model, tokens, acts, ce_rows=ce_rows, batch_size=batch_size)


def evaluate(
    sae: Any, model: Any, tokens: torch.Tensor, hook: str | None = None, batch_size: int = 8
) -> EvalResult:
    """R^2, L0, dead and bipolar fractions, CE loss recovered and KL of ``sae`` spliced into
    ``model`` at ``hook`` (default: its metadata's) on the held-out ``tokens``."""
    hook = hook or sae.cfg.metadata.hook_name
    if not hook:
        raise SignSAEError("The SAE names no hook in its metadata; pass hook='blocks.L.hook_...'.")
    return held_out(model, tokens, [hook], batch_size=batch_size).evaluate(sae, hook)


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of predicting tokens[t+1] from position t >= 1 (BOS left out)."""
    logp = logits[:, 1:-1].log_softmax(-1)
    return -logp.gather(-1, tokens[:, 2:, None]).squeeze(-1)


def _layer(model: Any, hook: str) -> int | None:
    """The block a hook sits in, when the model can start a forward there; else None."""
    from transformer_lens import HookedTransformer

    return block_of(hook) if isinstance(model, HookedTransformer) else None


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
