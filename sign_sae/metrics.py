"""Sign-aware SAE metrics. Every count uses ``!= 0``: a latent that fires only negative is alive.

Definitions (also in docs/metrics.md):
- L0: mean over tokens of the number of latents with f != 0.
- dead fraction: share of latents with f == 0 on every token of the window seen.
- explained variance (R^2): 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean taken over
  the same tokens (not over the batch axis of each step, and not around zero).
- per latent: n+ / n- = tokens with f > 0 / f < 0; mass+ / mass- = sum of |f| over them;
  balance = min(n+, n-) / (n+ + n-) (0 for a latent that never fires).
- bipolar fraction: share of alive latents with balance >= ``BIPOLAR_BALANCE`` (0.1).
"""

from dataclasses import dataclass, field
from typing import Any

import torch

BIPOLAR_BALANCE = 0.1  # a latent is bipolar when its balance is at least this


def l0(feature_acts: torch.Tensor) -> float:
    """Mean number of non-zero latents (either sign) per token."""
    return (feature_acts != 0).reshape(-1, feature_acts.shape[-1]).sum(-1).float().mean().item()


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """R^2 around the mean of x over all tokens given."""
    stats = ReconstructionStats()
    stats.update(x, x_hat)
    return stats.explained_variance


def balance(n_pos: torch.Tensor, n_neg: torch.Tensor) -> torch.Tensor:
    """min(n+, n-) / (n+ + n-) per latent; 0 where the latent never fired."""
    total = n_pos + n_neg
    return torch.where(total > 0, torch.minimum(n_pos, n_neg) / total.clamp(min=1), 0.0)


def bipolar_fraction(stats: Any, threshold: float = BIPOLAR_BALANCE) -> float:
    """Share of alive latents with balance >= ``threshold`` (0 when none is alive); ``stats``
    is anything with per-latent ``alive`` and ``balance`` (``LatentStats``, a polarity census)."""
    alive = stats.alive
    return (stats.balance[alive] >= threshold).double().mean().item() if alive.any() else 0.0


@dataclass
class LatentStats:
    """Streaming per-latent firing counts and |activation| mass by sign (float64 sums)."""

    d_sae: int
    n_tokens: int = 0
    n_pos: torch.Tensor = field(init=False)
    n_neg: torch.Tensor = field(init=False)
    mass_pos: torch.Tensor = field(init=False)
    mass_neg: torch.Tensor = field(init=False)
    active_sum: int = 0  # total number of (token, latent) firings, for L0

    def __post_init__(self) -> None:
        zeros = lambda: torch.zeros(self.d_sae, dtype=torch.float64)  # noqa: E731
        self.n_pos, self.n_neg, self.mass_pos, self.mass_neg = zeros(), zeros(), zeros(), zeros()

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor) -> None:
        f = feature_acts.detach().reshape(-1, self.d_sae).to(torch.float64).cpu()
        pos, neg = f > 0, f < 0
        self.n_tokens += f.shape[0]
        self.n_pos += pos.sum(0)
        self.n_neg += neg.sum(0)
        self.mass_pos += (f * pos).sum(0)
        self.mass_neg -= (f * neg).sum(0)
        self.active_sum += int((f != 0).sum())

    @property
    def l0(self) -> float:
        return self.active_sum / max(self.n_tokens, 1)

    @property
    def alive(self) -> torch.Tensor:
        return (self.n_pos + self.n_neg) != 0

    @property
    def dead_fraction(self) -> float:
        return 1.0 - self.alive.double().mean().item()

    @property
    def balance(self) -> torch.Tensor:
        return balance(self.n_pos, self.n_neg)


@dataclass
class ReconstructionStats:
    """Streaming sums for MSE and explained variance around the mean (float64)."""

    n_tokens: int = 0
    sq_error: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_sq_x: float = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        x_hat = x_hat.detach().reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        self.n_tokens += x.shape[0]
        self.sq_error += (x - x_hat).pow(2).sum().item()
        self.sum_sq_x += x.pow(2).sum().item()
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s

    @property
    def mse(self) -> float:
        """Mean over tokens of ||x - x_hat||^2 (summed over the feature axis)."""
        return self.sq_error / max(self.n_tokens, 1)

    @property
    def explained_variance(self) -> float:
        if self.sum_x is None:
            return float("nan")
        return _explained(self.sq_error, self.sum_sq_x, self.sum_x, self.n_tokens)


def _explained(sq_error: float, sum_sq_x: float, sum_x: torch.Tensor, n: float) -> float:
    """R^2 around the mean from sums: 1 - SSE / (sum ||x||^2 - ||sum x||^2 / n)."""
    total = sum_sq_x - sum_x.pow(2).sum().item() / n
    return 1.0 - sq_error / total if total > 0 else float("nan")


@dataclass
class SequenceStats:
    """Per held-out sequence sums of one SAE's reconstruction and firing (float64), so that R^2
    and L0 can be recomputed for any reweighting of the sequences: a paired bootstrap draws one
    weight vector (counts) and applies it to every SAE evaluated on the same sequences."""

    sq_error: torch.Tensor  # [n_seq] sum over tokens of ||x - x_hat||^2
    sum_sq_x: torch.Tensor  # [n_seq] sum over tokens of ||x||^2
    sum_x: torch.Tensor  # [n_seq, d_in] sum over tokens of x
    active: torch.Tensor  # [n_seq] number of (token, latent) pairs with f != 0
    n_tokens: torch.Tensor  # [n_seq]

    @classmethod
    @torch.no_grad()
    def of(
        cls, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, rows_per_seq: int
    ) -> "SequenceStats":
        """From whole sequences of rows ``x``, ``x_hat`` ``[n_seq * rows_per_seq, d]`` and
        latents ``f``."""
        x, x_hat = (t.detach().to(torch.float64).cpu() for t in (x, x_hat))
        n_seq = x.shape[0] // rows_per_seq
        if n_seq * rows_per_seq != x.shape[0]:
            raise ValueError(f"{x.shape[0]} rows are not whole sequences of {rows_per_seq}.")
        seq = lambda t: t.reshape(n_seq, rows_per_seq, *t.shape[1:])  # noqa: E731
        return cls(
            sq_error=seq((x - x_hat).pow(2).sum(-1)).sum(1),
            sum_sq_x=seq(x.pow(2).sum(-1)).sum(1),
            sum_x=seq(x).sum(1),
            active=seq((f != 0).sum(-1).cpu().to(torch.float64)).sum(1),
            n_tokens=torch.full((n_seq,), float(rows_per_seq), dtype=torch.float64),
        )

    @classmethod
    def cat(cls, parts: list["SequenceStats"]) -> "SequenceStats":
        """The sequences of every part, in order."""
        return cls(*(torch.cat([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__))

    def r2(self, weights: torch.Tensor | None = None) -> float:
        """R^2 around the mean over the sequences, each counted ``weights[i]`` times."""
        w = self._weights(weights)
        return _explained(
            float(w @ self.sq_error),
            float(w @ self.sum_sq_x),
            w @ self.sum_x,
            float(w @ self.n_tokens),
        )

    def mse(self, weights: torch.Tensor | None = None) -> float:
        """Mean over tokens of ||x - x_hat||^2, sequences weighted as in ``r2``."""
        w = self._weights(weights)
        return float(w @ self.sq_error) / float(w @ self.n_tokens)

    def l0(self, weights: torch.Tensor | None = None) -> float:
        """Mean number of latents with f != 0 per token, sequences weighted as in ``r2``."""
        w = self._weights(weights)
        return float(w @ self.active) / float(w @ self.n_tokens)

    def _weights(self, weights: torch.Tensor | None) -> torch.Tensor:
        n = self.n_tokens.shape[0]
        return torch.ones(n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
