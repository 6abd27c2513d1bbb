"""Polarity census: how often and how strongly each latent fires with each sign.

Per latent over N tokens: n+ = #{f > 0}, n- = #{f < 0}, mass+ = sum of f over f > 0,
mass- = sum of |f| over f < 0, balance = min(n+, n-) / (n+ + n-) (0 for a latent that never
fires). A latent is alive when it fired with either sign (``f != 0``); a latent that fires only
negative is alive and unipolar. For a non-negative SAE every balance is 0, which is the point of
comparison. Definitions and the null model: docs/analyses.md.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch

from analyses.results import Result
from analyses.stream import hook_activations, latent_batches, sae_hook
from sign_sae.errors import SignSAEError
from sign_sae.metrics import BIPOLAR_BALANCE, LatentStats, balance

MAX_TOP_EXAMPLES = 100
_ROWS_PER_UPDATE = 512  # bounds the float64 temporaries of LatentStats.update

Among = Literal["alive", "all"]


@dataclass(eq=False)
class TopExamples(Result):
    """Per latent, the k activations of largest magnitude with one sign.

    ``value`` is the signed activation, ``seq`` the row of the token batch, ``pos`` the position
    in the sequence; empty slots (fewer than k firings of that sign) have seq = pos = -1, value 0.
    """

    value: torch.Tensor  # [d_sae, k] float64
    seq: torch.Tensor  # [d_sae, k] int64
    pos: torch.Tensor  # [d_sae, k] int64

    def of(self, latent: int) -> list[tuple[int, int, float]]:
        """(sequence index, position, value) of one latent, strongest first."""
        return [
            (int(s), int(p), float(v))
            for v, s, p in zip(self.value[latent], self.seq[latent], self.pos[latent], strict=True)
            if s >= 0
        ]


@dataclass(eq=False)
class PolarityCensus(Result):
    """Per-latent firing counts and |activation| mass by sign over ``n_tokens`` tokens."""

    n_pos: torch.Tensor  # [d_sae] int64
    n_neg: torch.Tensor  # [d_sae] int64
    mass_pos: torch.Tensor  # [d_sae] float64
    mass_neg: torch.Tensor  # [d_sae] float64
    n_tokens: int
    hook_name: str | None = None
    top_pos: TopExamples | None = None
    top_neg: TopExamples | None = None

    @property
    def d_sae(self) -> int:
        return self.n_pos.shape[0]

    @property
    def n_fired(self) -> torch.Tensor:
        """n+ + n-: tokens on which each latent was non-zero."""
        return self.n_pos + self.n_neg

    @property
    def alive(self) -> torch.Tensor:
        return self.n_fired > 0

    @property
    def dead_fraction(self) -> float:
        return 1.0 - self.alive.double().mean().item()

    @property
    def l0(self) -> float:
        """Mean number of non-zero latents (either sign) per token."""
        return self.n_fired.sum().item() / max(self.n_tokens, 1)

    @property
    def balance(self) -> torch.Tensor:
        """min(n+, n-) / (n+ + n-); 0 where the latent never fired."""
        return balance(self.n_pos.double(), self.n_neg.double())

    @property
    def minority_mass(self) -> torch.Tensor:
        """min(mass+, mass-): the |activation| mass of each latent's rarer-in-mass sign."""
        return torch.minimum(self.mass_pos, self.mass_neg)

    def mass_weighted_bipolarity(self) -> float:
        """sum_i min(mass+_i, mass-_i) / sum_i (mass+_i + mass-_i): the share of all activation
        mass on each latent's minority side, so a latent counts by its mass, not with a cut-off
        (0 for a non-negative SAE, at most 1/2; NaN with no mass)."""
        total = (self.mass_pos + self.mass_neg).sum().item()
        return self.minority_mass.sum().item() / total if total > 0 else float("nan")

    def bipolar_fraction(self, threshold: float = BIPOLAR_BALANCE, among: Among = "alive") -> float:
        """Share of latents with balance >= threshold, among alive latents (NaN if none) or all."""
        return _share(self.balance >= threshold, self._among(among))

    def balance_curve(self, thresholds: Sequence[float] | None = None) -> list[float]:
        """Share of alive latents with balance >= t for each t (default 0, 0.05, ..., 0.5)."""
        ts = [i / 20 for i in range(11)] if thresholds is None else thresholds
        return [self.bipolar_fraction(t) for t in ts]

    def expected_null_balance(self) -> torch.Tensor:
        """Expected balance if each firing's sign were a fair coin: E[min(K, n-K)] / n with
        K ~ Binomial(n, 1/2), n = n+ + n- (0 where n = 0). Exact (de Moivre's mean absolute
        deviation: E|K - n/2| = (m + 1) C(n, m + 1) / 2^n, m = floor(n / 2))."""
        n = self.n_fired.double()
        m = torch.floor(n / 2)
        log_mad = (
            torch.log(m + 1)
            + torch.lgamma(n + 1)
            - torch.lgamma(m + 2)
            - torch.lgamma((n - m).clamp(min=1))
            - n * math.log(2)
        )
        return torch.where(n > 0, (n / 2 - log_mad.exp()) / n.clamp(min=1), 0.0)

    def sign_flip_null(self, seed: int = 0) -> "PolarityCensus":
        """One draw of the sign-flip null: the same firing counts n, with n+ ~ Binomial(n, 1/2)
        and the latent's total mass split in proportion to the counts. Every census method
        (``bipolar_fraction``, ``balance_curve``) applies to it, so observed bipolarity can be
        read against chance."""
        gen = torch.Generator().manual_seed(seed)
        n = self.n_fired.double()
        n_pos = torch.binomial(n, torch.full_like(n, 0.5), generator=gen)
        share = torch.where(n > 0, n_pos / n.clamp(min=1), 0.0)
        total = self.mass_pos + self.mass_neg
        return PolarityCensus(
            n_pos=n_pos.long(),
            n_neg=(n - n_pos).long(),
            mass_pos=total * share,
            mass_neg=total * (1 - share),
            n_tokens=self.n_tokens,
            hook_name=self.hook_name,
        )

    def examples(self, latent: int, sign: Literal["+", "-"] = "+") -> list[tuple[int, int, float]]:
        """Top (sequence index, position, value) of one sign; needs ``top_examples > 0``."""
        top = self.top_pos if sign == "+" else self.top_neg
        if top is None:
            raise SignSAEError("This census kept no examples; rerun it with top_examples=k.")
        return top.of(latent)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per latent: counts, masses, balance, minority mass, null balance."""
        return pd.DataFrame(
            {
                "n_pos": self.n_pos.numpy(),
                "n_neg": self.n_neg.numpy(),
                "mass_pos": self.mass_pos.numpy(),
                "mass_neg": self.mass_neg.numpy(),
                "balance": self.balance.numpy(),
                "minority_mass": self.minority_mass.numpy(),
                "null_balance": self.expected_null_balance().numpy(),
            },
            index=pd.RangeIndex(self.d_sae, name="latent"),
        )

    def _among(self, among: Among) -> torch.Tensor:
        if among == "alive":
            return self.alive
        if among == "all":
            return torch.ones_like(self.alive)
        raise SignSAEError(f"among must be 'alive' or 'all', got {among!r}.")


def census(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    batch_size: int = 16,
    hook: str | None = None,
    exclude_bos: bool = True,
    top_examples: int = 0,
) -> PolarityCensus:
    """Run ``model`` on ``tokens`` ``[n_seq, seq_len]`` batch by batch and count each latent's
    firings and mass by sign at the SAE's hook (or ``hook``). ``exclude_bos`` drops position 0
    of every row; ``top_examples`` keeps the k strongest activations of each sign per latent."""
    name = sae_hook(sae, hook)
    return census_from_activations(
        sae,
        hook_activations(model, tokens, name, batch_size),
        exclude_bos=exclude_bos,
        top_examples=top_examples,
        hook_name=name,
    )


def census_from_activations(
    sae: Any,
    batches: Iterable[torch.Tensor],
    exclude_bos: bool = False,
    top_examples: int = 0,
    hook_name: str | None = None,
) -> PolarityCensus:
    """The census over precomputed activation batches (``[batch, seq, d_in]`` or
    ``[tokens, d_in]``; for the latter each token is its own sequence at position 0)."""
    if not 0 <= top_examples <= MAX_TOP_EXAMPLES:
        raise SignSAEError(f"top_examples must be in [0, {MAX_TOP_EXAMPLES}], got {top_examples}.")
    d_sae = sae.cfg.d_sae
    stats = LatentStats(d_sae)
    tops = [_Top(d_sae, top_examples) for _ in range(2)] if top_examples else []
    for batch in latent_batches(sae, batches, exclude_bos):
        b, s, _ = batch.acts.shape
        flat = batch.acts.reshape(b * s, d_sae)
        for chunk in flat.split(_ROWS_PER_UPDATE):
            stats.update(chunk)
        if tops:
            rows = torch.arange(b * s)
            seq, pos = batch.seq_offset + rows // s, batch.pos_offset + rows % s
            tops[0].update(flat, seq, pos)
            tops[1].update(-flat, seq, pos)
    return PolarityCensus(
        n_pos=stats.n_pos.long(),
        n_neg=stats.n_neg.long(),
        mass_pos=stats.mass_pos,
        mass_neg=stats.mass_neg,
        n_tokens=stats.n_tokens,
        hook_name=hook_name if hook_name is not None else sae.cfg.metadata.hook_name,
        top_pos=tops[0].result(1.0) if tops else None,
        top_neg=tops[1].result(-1.0) if tops else None,
    )


def gaussian_surrogate(acts: torch.Tensor, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """``n`` rows (default as many as ``acts``) from the Gaussian with the activations' mean and
    covariance: every second-order fact kept, no sparse signed structure. Train the same recipe
    on it to read how much bipolarity any data of that shape would give."""
    x = acts.double()
    mu = x.mean(0)
    cov = torch.cov(x.T)
    jitter = 1e-9 * cov.diagonal().mean()
    chol = torch.linalg.cholesky(cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n or x.shape[0], x.shape[1], generator=gen, dtype=torch.float64)
    return (mu + z @ chol.T).to(acts.dtype)


def sign_surrogate(acts: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The activations reflected through their mean on a random half of the rows,
    x' = mu + s (x - mu) with s = +-1 a fair coin per row: the same mean, covariance and
    sparsity, but every direction made sign-symmetric. An SAE's bipolarity on the real data can
    only differ from its bipolarity here if the data's signs carry structure."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (acts.shape[0], 1), generator=gen).to(acts.dtype) * 2 - 1
    mu = acts.mean(0)
    return mu + s * (acts - mu)


class _Top:
    """Running top-k per latent of positive values, merged batch by batch with ``torch.topk``."""

    def __init__(self, d_sae: int, k: int) -> None:
        self.k = k
        self.mag = torch.zeros(d_sae, k, dtype=torch.float64)
        self.seq = torch.full((d_sae, k), -1, dtype=torch.long)
        self.pos = torch.full((d_sae, k), -1, dtype=torch.long)

    def update(self, values: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
        """``values [rows, d_sae]``: only entries > 0 can enter."""
        top, idx = values.T.clamp(min=0).topk(min(self.k, values.shape[0]), dim=1)
        idx = idx.cpu()
        mag = torch.cat([self.mag, top.double().cpu()], dim=1)
        best, keep = mag.topk(self.k, dim=1)
        self.mag = best
        self.seq = torch.cat([self.seq, seq[idx]], dim=1).gather(1, keep)
        self.pos = torch.cat([self.pos, pos[idx]], dim=1).gather(1, keep)

    def result(self, sign: float) -> TopExamples:
        empty = self.mag == 0
        return TopExamples(
            value=sign * self.mag + 0.0,  # + 0.0 turns -0.0 into 0.0
            seq=self.seq.masked_fill(empty, -1),
            pos=self.pos.masked_fill(empty, -1),
        )


def _share(mask: torch.Tensor, among: torch.Tensor) -> float:
    """Share of ``among`` where ``mask`` holds; NaN when ``among`` is empty."""
    n = int(among.sum())
    return float("nan") if n == 0 else int((mask & among).sum()) / n
