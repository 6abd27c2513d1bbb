"""Steering dials: does one latent act as a bidirectional causal dial on the model's output?

A ``DialSpec`` says how a sweep runs (alphas, prompts, mode, scale, targets); ``dial``,
``compare_dial`` and ``random_dials`` run the same spec on a latent, on a pair of non-negative
latents and on random directions. For each alpha the model runs on the prompts with the SAE's hook edited at every position:

- ``"add"``: x <- x + alpha * scale * u, with u = W_dec[i] / ||W_dec[i]|| (unit decoder direction);
- ``"clamp"``: the latent is set inside the SAE, spliced with its error term so nothing else
  changes: x <- x + decode(f') - decode(f), f = encode(x), f' = f with f'_i = alpha * scale /
  ||W_dec[i]||. Both modes move the hook by alpha * scale along u (add: on top of the latent's own
  contribution; clamp: replacing it; alpha = 0 in clamp mode ablates the latent).

The spec's ``scale`` fixes the units of alpha: 1.0 (default) means hook-space norm; ``typical_scale(census,
sae, i)`` makes alpha = 1 one typical firing of latent i. Measured per alpha, averaged over all
positions of all prompts: KL(clean || steered) of next-token distributions, the change in
log-prob of target tokens T+ and T-, effect = shift(T+) - shift(T-), and the tokens most promoted
/ suppressed; effect and KL are also kept per prompt, for intervals over prompts. The dial score:
monotonicity = Spearman correlation of alpha and effect; antisymmetry = 1 - sum |e(a) + e(-a)| /
sum (|e(a)| + |e(-a)|) over alpha > 0 with -alpha also given, effects taken relative to alpha = 0
when it is given.

Targets: by default T+ / T- are the logit-lens top tokens of +u / -u, which makes the dial
nearly monotone and antisymmetric for *any* direction (the tokens are chosen by the direction
being scored). ``context_targets`` fixes them beforehand from a disjoint split instead (the
tokens that follow the latent's strongest firings of each sign), and ``random_dials`` steers
norm-matched random directions against the same targets: the control that can fail.
"""

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from analyses.logit_lens import direction_logits, token_strings
from analyses.pairs import matching_pair
from analyses.polarity import PolarityCensus
from analyses.results import Result
from analyses.stream import sae_hook
from sign_sae.errors import SignSAEError
from sign_sae.models import block_entry, block_of

Mode = Literal["add", "clamp"]
HookFn = Callable[[torch.Tensor, Any], torch.Tensor]
# Strings, 1D token tensors, or a [n, seq] token tensor.
Prompts = Sequence[str | torch.Tensor] | torch.Tensor
# (T+ token ids, T- token ids)
Targets = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True, eq=False)
class DialSpec:
    """How a steering sweep runs, the same for a latent's dial and for its controls.

    ``alphas`` are in units of ``scale`` (1.0: hook-space norm; ``typical_scale``: one typical
    firing of the latent). ``prompts``: strings (given a BOS token) or token rows; rows of equal
    length run as one batch. ``targets`` = (T+ ids, T- ids) fixed beforehand (see
    ``context_targets``); None: the logit lens of the steered direction picks ``k_tokens`` a
    side. Each point keeps the ``k_tokens`` most promoted and suppressed tokens, and greedy
    continuations of ``max_new_tokens`` tokens (0: none)."""

    alphas: Sequence[float]
    prompts: Prompts
    mode: Mode = "add"
    scale: float = 1.0
    targets: Targets | None = None
    k_tokens: int = 10
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("add", "clamp"):
            raise SignSAEError(f"mode must be 'add' or 'clamp', got {self.mode!r}.")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))


@dataclass(eq=False)
class DialPoint(Result):
    """Measurements at one alpha (log-probs in nats)."""

    alpha: float
    kl: float
    shift_pos: float  # mean change in log-prob of the +side tokens T+
    shift_neg: float  # mean change in log-prob of the -side tokens T-
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    continuations: list[str]
    effect_prompts: list[float] = field(default_factory=list)  # per prompt, prompt order
    kl_prompts: list[float] = field(default_factory=list)  # per prompt, prompt order

    @property
    def effect(self) -> float:
        return self.shift_pos - self.shift_neg

    def specificity(self, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
        """On-target shift per unit of distribution change, sign(alpha) * mean effect /
        sqrt(mean KL) over prompts, with a 95% percentile bootstrap interval over prompts:
        (value, low, high). Positive: the targets move the way alpha points. The square root
        makes it independent of the step for small steps (effect grows like alpha, KL like
        alpha^2), so directions steered with different strengths compare fairly."""
        sign = 1.0 if self.alpha >= 0 else -1.0
        return ratio_interval(
            [sign * e for e in self.effect_prompts], self.kl_prompts, 0.5, n_boot, seed
        )


@dataclass(eq=False)
class Dial(Result):
    """A steering sweep of one signed latent (``latents = [i]``), of a pair of non-negative
    latents (``latents = [a, b]``: +alpha on a, |alpha| on b for alpha < 0), or of a direction
    that is no latent (``latents = []``: a random control)."""

    hook_name: str
    latents: list[int]
    mode: str
    scale: float
    pos_tokens: list[str]
    neg_tokens: list[str]
    points: list[DialPoint]
    monotonicity: float
    antisymmetry: float

    def at(self, alpha: float) -> DialPoint:
        """The point measured at ``alpha``."""
        for p in self.points:
            if p.alpha == float(alpha):
                return p
        raise SignSAEError(
            f"alpha {alpha} was not measured; measured: {[p.alpha for p in self.points]}."
        )

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "alpha": [p.alpha for p in self.points],
                "kl": [p.kl for p in self.points],
                "shift_pos": [p.shift_pos for p in self.points],
                "shift_neg": [p.shift_neg for p in self.points],
                "effect": [p.effect for p in self.points],
            }
        )


@dataclass(eq=False)
class DialComparison(Result):
    """The same sweep for one signed latent and for a pair of opposite non-negative latents."""

    signed: Dial
    paired: Dial

    def to_dataframe(self) -> pd.DataFrame:
        return pd.concat(
            {"signed": self.signed.to_dataframe(), "paired": self.paired.to_dataframe()},
            names=["dial", "row"],
        )


def dial(model: Any, sae: Any, latent: int, spec: DialSpec) -> Dial:
    """Steer one latent as ``spec`` says and measure the dial."""
    ids = _targets(model, unit_direction(sae, latent), spec.targets, spec.k_tokens)

    def steer(alpha: float) -> HookFn:
        return steering_hook(sae, latent, alpha * spec.scale, spec.mode)

    return _sweep(model, spec, sae_hook(sae), [latent], steer, ids)


def compare_dial(
    model: Any,
    signed_sae: Any,
    latent: int,
    gated_sae: Any,
    spec: DialSpec,
    pair: tuple[int, int] | None = None,
) -> DialComparison:
    """``dial`` for a signed latent and for the pair (a, b) of non-negative latents that best
    match +d and -d (``pairs.matching_pair`` unless ``pair`` is given): alpha >= 0 steers
    +alpha on a, alpha < 0 steers +|alpha| on b. With ``spec.targets`` both dials score the
    same tokens; without, the pair's T+ / T- are the logit-lens tokens of d_a / d_b."""
    signed = dial(model, signed_sae, latent, spec)
    a, b = pair if pair is not None else matching_pair(signed_sae, latent, gated_sae)

    def steer(alpha: float) -> HookFn:
        return steering_hook(gated_sae, a if alpha >= 0 else b, abs(alpha) * spec.scale, spec.mode)

    if spec.targets is not None:
        ids = _targets(model, None, spec.targets, spec.k_tokens)
    else:
        k = spec.k_tokens
        ids = (
            direction_logits(model, unit_direction(gated_sae, a)).topk(k).indices,
            direction_logits(model, unit_direction(gated_sae, b)).topk(k).indices,
        )
    paired = _sweep(model, spec, sae_hook(gated_sae), [a, b], steer, ids)
    return DialComparison(signed, paired)


def random_dials(model: Any, sae: Any, spec: DialSpec, n: int = 3, seed: int = 0) -> list[Dial]:
    """The control for ``dial(model, sae, latent, spec)``: the same sweep along ``n`` random
    unit directions of the hook (norm-matched: alpha * scale moves the hook by the same amount)
    scored on the same ``spec.targets``. A latent is a dial only where it beats these."""
    if spec.targets is None or spec.mode != "add":
        raise SignSAEError(
            "Random directions are added and scored on targets fixed beforehand: give the spec "
            "mode='add' and targets=context_targets(...)."
        )
    gen = torch.Generator().manual_seed(seed)
    d = sae.W_dec.shape[1]
    ids = _targets(model, None, spec.targets, 0)
    out = []
    for _ in range(n):
        r = torch.randn(d, generator=gen)
        v = (r / r.norm()).to(sae.W_dec)

        def steer(alpha: float, v: torch.Tensor = v) -> HookFn:
            return _add_hook(alpha * spec.scale * v)

        out.append(_sweep(model, spec, sae_hook(sae), [], steer, ids))
    return out


def context_targets(
    census: PolarityCensus,
    tokens: torch.Tensor,
    latent: int,
    k: int = 10,
    exclude_rows: int = 0,
) -> Targets:
    """(T+, T-) fixed before any steering: the tokens that most often follow the latent's
    strongest positive (T+) and negative (T-) firings in ``census`` (which kept ``top_examples``
    on ``tokens``), ranked by count on their side minus count on the other; a token is on at
    most one side. Examples in the first ``exclude_rows`` rows are skipped, so that the rows
    used as steering prompts never choose their own targets."""
    counts = []
    for sign in ("+", "-"):
        nxt = [
            int(tokens[s, p + 1])
            for s, p, _ in census.examples(latent, sign)
            if p + 1 < tokens.shape[1] and s >= exclude_rows
        ]
        counts.append(Counter(nxt))
    plus, minus = counts
    pos = sorted(plus, key=lambda t: (minus[t] - plus[t], t))
    neg = sorted(minus, key=lambda t: (plus[t] - minus[t], t))
    pos = [t for t in pos if plus[t] > minus[t]][:k]
    neg = [t for t in neg if minus[t] > plus[t]][:k]
    if not pos or not neg:
        raise SignSAEError(
            f"Latent {latent} has no context targets on one side (fired + {len(plus)} / "
            f"- {len(minus)} distinct next tokens); pick a latent that fires with both signs."
        )
    return pos, neg


def ratio_interval(
    num: Sequence[float],
    den: Sequence[float],
    power: float = 1.0,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """mean(num) / mean(den) ** power over paired items, with its 95% percentile bootstrap
    interval over the items: (value, low, high); NaN where the denominator is 0."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if x.size == 0 or x.size != y.size:
        raise SignSAEError(f"Need equal, non-empty samples, got {x.size} and {y.size}.")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        value = x.mean() / y.mean() ** power
        boots = x[idx].mean(1) / y[idx].mean(1) ** power
    lo, hi = np.nanpercentile(boots, [2.5, 97.5]) if np.isfinite(boots).any() else (np.nan,) * 2
    return float(value), float(lo), float(hi)


def unit_direction(sae: Any, latent: int) -> torch.Tensor:
    """W_dec[latent] / ||W_dec[latent]||."""
    d = sae.W_dec[latent].detach()
    return d / d.norm().clamp(min=1e-12)


def typical_scale(census: PolarityCensus, sae: Any, latent: int) -> float:
    """Mean |f_i| over the latent's firings times ||W_dec[i]||: the hook-space size of one
    typical firing, so that alpha = 1 means "as strong as usual"."""
    n = int(census.n_fired[latent])
    if n == 0:
        raise SignSAEError(f"Latent {latent} never fired in this census; it has no typical scale.")
    mass = float(census.mass_pos[latent] + census.mass_neg[latent])
    return mass / n * float(sae.W_dec[latent].detach().norm())


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if either side is constant."""
    rx = pd.Series(list(x), dtype=float).rank().to_numpy()
    ry = pd.Series(list(y), dtype=float).rank().to_numpy()
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def antisymmetry(alphas: Sequence[float], effects: Sequence[float]) -> float:
    """1 - sum |e(a) + e(-a)| / sum (|e(a)| + |e(-a)|) over a > 0 with -a given; effects relative
    to e(0) when alpha = 0 is given. 1: perfectly antisymmetric; NaN: nothing to compare."""
    by_alpha = dict(zip((float(a) for a in alphas), effects, strict=True))
    base = by_alpha.get(0.0, 0.0)
    num = den = 0.0
    for a, e in by_alpha.items():
        if a > 0 and -a in by_alpha:
            plus, minus = e - base, by_alpha[-a] - base
            num += abs(plus + minus)
            den += abs(plus) + abs(minus)
    return 1.0 - num / den if den > 0 else float("nan")


def steering_hook(sae: Any, latent: int, amount: float, mode: Mode) -> HookFn:
    """A hook moving the activation by ``amount`` along the latent's unit decoder direction."""
    if mode == "add":
        return _add_hook(amount * unit_direction(sae, latent))
    if mode == "clamp":
        value = amount / float(sae.W_dec[latent].detach().norm().clamp(min=1e-12))

        def clamp(act: torch.Tensor, hook: Any) -> torch.Tensor:
            f = sae.encode(act)
            edited = f.clone()
            edited[..., latent] = value
            return act + (sae.decode(edited) - sae.decode(f)).to(act)

        return clamp
    raise SignSAEError(f"mode must be 'add' or 'clamp', got {mode!r}.")


def _add_hook(v: torch.Tensor) -> HookFn:
    def add(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + v.to(act).reshape(act.shape[2:])

    return add


def _targets(
    model: Any, u: torch.Tensor | None, targets: Targets | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target token ids: the given (T+, T-), or the logit lens's top-k of +u and -u."""
    if targets is None:
        lens = direction_logits(model, u)
        return lens.topk(k).indices, (-lens).topk(k).indices
    pos, neg = (torch.as_tensor(list(t), dtype=torch.long) for t in targets)
    if pos.numel() == 0 or neg.numel() == 0:
        raise SignSAEError("targets must name at least one token on each side.")
    return pos, neg


def _sweep(
    model: Any,
    spec: DialSpec,
    hook: str,
    latents: list[int],
    steer: Callable[[float], HookFn],
    ids: tuple[torch.Tensor, torch.Tensor],
) -> Dial:
    """The dial of ``steer`` (alpha -> the hook function) at ``hook``, run as ``spec`` says and
    scored on the target token ids ``ids`` = (T+, T-)."""
    pos_ids, neg_ids = ids
    max_new_tokens, k_tokens = spec.max_new_tokens, spec.k_tokens
    groups = _by_length(_prompt_rows(model, spec.prompts))
    n_prompts = sum(len(idx) for idx, _ in groups)
    owner = torch.cat([torch.tensor(idx).repeat_interleave(b.shape[1]) for idx, b in groups])
    with torch.inference_mode():
        clean_logits, run = _from_hook_block(model, hook, [b for _, b in groups])
        clean = _log_probs(clean_logits)
        points = []
        for alpha in spec.alphas:
            fwd = [(hook, steer(alpha))]
            logits = run(fwd)
            steered = _log_probs(logits)
            kl_pos = (clean.exp() * (clean - steered)).sum(-1)
            kl = kl_pos.mean().item()
            delta = steered - clean
            shift = delta.mean(0)
            on_target = delta[:, pos_ids.to(delta.device)].mean(1) - delta[
                :, neg_ids.to(delta.device)
            ].mean(1)
            up, down = shift.topk(k_tokens), (-shift).topk(k_tokens)
            texts = [""] * n_prompts if max_new_tokens > 0 else []
            for (idx, b), lg in zip(groups, logits, strict=True):
                if max_new_tokens > 0:
                    for i, text in zip(
                        idx, _greedy(model, b, lg, max_new_tokens, fwd), strict=True
                    ):
                        texts[i] = text
            points.append(
                DialPoint(
                    alpha=alpha,
                    kl=kl,
                    shift_pos=shift[pos_ids].mean().item(),
                    shift_neg=shift[neg_ids].mean().item(),
                    promoted=_scored(model, up.indices, up.values),
                    suppressed=_scored(model, down.indices, -down.values),
                    continuations=texts,
                    effect_prompts=_per_prompt(on_target, owner, n_prompts),
                    kl_prompts=_per_prompt(kl_pos, owner, n_prompts),
                )
            )
    effects = [p.effect for p in points]
    return Dial(
        hook_name=hook,
        latents=latents,
        mode=spec.mode,
        scale=spec.scale,
        pos_tokens=token_strings(model, pos_ids.tolist()),
        neg_tokens=token_strings(model, neg_ids.tolist()),
        points=points,
        monotonicity=spearman([p.alpha for p in points], effects),
        antisymmetry=antisymmetry([p.alpha for p in points], effects),
    )


def _from_hook_block(
    model: Any, hook: str, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], Callable[[list[tuple[str, HookFn]]], list[torch.Tensor]]]:
    """The clean logits of ``batches`` and a function giving their logits under forward hooks
    placed at or after ``hook``'s block. The blocks before it run once: the steered passes
    start from the clean residual stream entering that block (the same numbers, about half the
    work for a hook at mid depth)."""
    layer = block_of(hook)
    if layer is None:
        logits = [model.run_with_hooks(b, fwd_hooks=[]) for b in batches]
        return logits, lambda fwd: [model.run_with_hooks(b, fwd_hooks=fwd) for b in batches]
    entry = block_entry(layer)
    logits, starts = [], []
    for b in batches:
        lg, cache = model.run_with_cache(b, names_filter=[entry])
        logits.append(lg)
        starts.append(cache[entry])
    return logits, lambda fwd: [
        model.run_with_hooks(s, start_at_layer=layer, fwd_hooks=fwd) for s in starts
    ]


def _per_prompt(values: torch.Tensor, owner: torch.Tensor, n: int) -> list[float]:
    """Mean of per-position ``values`` within each prompt (``owner`` = prompt of each position)."""
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, values.double().cpu())
    return (total / torch.bincount(owner, minlength=n).double()).tolist()


def _prompt_rows(model: Any, prompts: Prompts) -> list[torch.Tensor]:
    """One 1D token tensor per prompt (strings get a BOS token, as corpus.tokenize rows do)."""
    rows = (
        list(prompts) if not isinstance(prompts, torch.Tensor) or prompts.ndim == 2 else [prompts]
    )
    if not rows:
        raise SignSAEError("No prompts given.")
    return [
        (model.to_tokens(r, prepend_bos=True)[0] if isinstance(r, str) else r).to(model.cfg.device)
        for r in rows
    ]


def _by_length(rows: list[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Prompts of equal length batched together (no padding): (prompt indices, [n, len])."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.numel(), []).append(i)
    return [(idx, torch.stack([rows[i] for i in idx])) for idx in groups.values()]


def _log_probs(logits: list[torch.Tensor]) -> torch.Tensor:
    """Next-token log-probs ``[all positions of all prompts, d_vocab]``."""
    return torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in logits]).float().log_softmax(-1)


def _scored(model: Any, ids: torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
    return list(zip(token_strings(model, ids.tolist()), values.tolist(), strict=True))


def _greedy(
    model: Any, batch: torch.Tensor, logits: torch.Tensor, n: int, fwd: list[tuple[str, HookFn]]
) -> list[str]:
    """Greedy continuations of ``n`` tokens with the steering hook on; ``logits`` are the steered
    logits of ``batch`` (they give the first token). No KV cache."""
    toks = torch.cat([batch, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for _ in range(n - 1):
        nxt = model.run_with_hooks(toks, fwd_hooks=fwd)[:, -1].argmax(-1, keepdim=True)
        toks = torch.cat([toks, nxt], dim=1)
    tok = getattr(model, "tokenizer", None)
    new = toks[:, batch.shape[1] :].tolist()
    return [tok.decode(r) if tok is not None else " ".join(map(str, r)) for r in new]
