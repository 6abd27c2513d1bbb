"""Synthetic activations with known signed ground truth, and recovery metrics.

x = sum_j a_j u_j with unit directions u_j and sparse coefficients a_j of three kinds:
- bipolar: one direction used with both signs (a_j = +-m, sign a fair coin);
- one-sign: a_j = +m only;
- antipodal pairs: two *separate* features on u and -u, each non-negative, whose firing is
  correlated with rho in [-1, 0] through a Gaussian copula (rho = -1: they never co-fire).
Each feature is active with probability ``p_active`` and magnitude m ~ U(lo, hi).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticSpec:
    d: int = 96
    n_bipolar: int = 48
    n_unipolar: int = 24
    n_pairs: int = 0
    pair_rho: float = -1.0
    p_active: float = 0.03
    magnitude: tuple[float, float] = (0.5, 1.5)
    seed: int = 0

    def __post_init__(self) -> None:
        if not -1.0 <= self.pair_rho <= 0.0:
            raise ValueError(f"pair_rho must be in [-1, 0], got {self.pair_rho}.")
        if not 0.0 < self.p_active <= 1.0:
            raise ValueError(f"p_active must be in (0, 1], got {self.p_active}.")


class SyntheticData:
    """Sampler for a ``SyntheticSpec``; directions are fixed by the spec's seed."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        n_dirs = spec.n_bipolar + spec.n_unipolar + spec.n_pairs
        u = torch.randn(n_dirs, spec.d, generator=g)
        self.directions = u / u.norm(dim=1, keepdim=True)

    @property
    def signed_directions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (direction, sign) the data uses: bipolar twice, one-sign and pairs' halves."""
        s = self.spec
        nb, nu = s.n_bipolar, s.n_unipolar
        bip = self.directions[:nb]
        rest = self.directions[nb:]
        dirs = torch.cat([bip, bip, rest, self.directions[nb + nu :]])
        signs = torch.cat(
            [torch.ones(nb), -torch.ones(nb), torch.ones(rest.shape[0]), -torch.ones(s.n_pairs)]
        )
        return dirs, signs

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples: (x [n, d], signed coefficients [n, n_directions])."""
        s = self.spec
        lo, hi = s.magnitude
        n_dirs = self.directions.shape[0]
        mags = lo + (hi - lo) * torch.rand(n, n_dirs, generator=generator)
        coef = mags * (torch.rand(n, n_dirs, generator=generator) < s.p_active)
        sign = torch.ones(n, n_dirs)
        sign[:, : s.n_bipolar] = torch.where(
            torch.rand(n, s.n_bipolar, generator=generator) < 0.5, 1.0, -1.0
        )
        coef = coef * sign
        if s.n_pairs:
            start = s.n_bipolar + s.n_unipolar
            pos, neg = self._pair_firing(n, generator)
            mags_neg = lo + (hi - lo) * torch.rand(n, s.n_pairs, generator=generator)
            # net coefficient on u: the +u half minus the -u half (both may fire if rho > -1)
            coef[:, start:] = mags[:, start:] * pos - mags_neg * neg
        return coef @ self.directions, coef

    def _pair_firing(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Firing of the +u and -u halves of each pair, correlated with rho via a copula."""
        s = self.spec
        normal = torch.distributions.Normal(0.0, 1.0)
        cut = normal.icdf(torch.tensor(1.0 - s.p_active))
        z1 = torch.randn(n, s.n_pairs, generator=generator)
        e = torch.randn(n, s.n_pairs, generator=generator)
        z2 = s.pair_rho * z1 + (1 - s.pair_rho**2) ** 0.5 * e
        return z1 > cut, z2 > cut


def _cosines(W_dec: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    d = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return directions @ d.T  # [n_true, d_sae]


def fraction_recovered(W_dec: torch.Tensor, directions: torch.Tensor, bar: float = 0.9) -> float:
    """Share of true directions matched by some decoder row with |cos| > bar."""
    return (_cosines(W_dec, directions).abs().max(dim=1).values > bar).float().mean().item()


def signed_coverage(
    W_dec: torch.Tensor,
    n_pos: torch.Tensor,
    n_neg: torch.Tensor,
    directions: torch.Tensor,
    signs: torch.Tensor,
    bar: float = 0.9,
) -> float:
    """Share of signed true directions s*u matched (cos > bar) by a latent firing with that sign.

    A latent i with decoder d_i contributes +d_i if it ever fires positive (n+ > 0) and -d_i if
    it ever fires negative (n- > 0).
    """
    cos = _cosines(W_dec, directions) * signs[:, None]  # cos(s u, d_i)
    pos_ok = (cos > bar) & (n_pos[None, :] > 0)
    neg_ok = (-cos > bar) & (n_neg[None, :] > 0)
    return (pos_ok | neg_ok).any(dim=1).float().mean().item()
