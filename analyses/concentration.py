"""Concentration of minority-sign mass: is bipolarity spread over the dictionary or held by a
few latents?

Per latent the minority mass is m_i = min(mass+_i, mass-_i). Ranking latents by m_i, the top-k
share is the sum of the k largest m_i over the sum of all m_i. The paper reports that on
attention hooks the bipolar structure concentrates in a few top latents, on MLP-out it does not.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from analyses.polarity import PolarityCensus
from analyses.results import Result
from sign_sae.errors import SignSAEError
from sign_sae.metrics import BIPOLAR_BALANCE

DEFAULT_K = (1, 5, 10, 50)


@dataclass(eq=False)
class Concentration(Result):
    """Top-k shares, the whole cumulative curve and the Gini coefficient of minority mass.

    ``curve[r - 1]`` is the share held by the r latents of largest minority mass, over the alive
    latents; ``top_latents`` are the latent ids in that order (up to ``max(k)``).
    Shares are NaN when no latent has minority mass (e.g. any non-negative SAE).
    """

    k: list[int]
    share: list[float]
    curve: torch.Tensor  # [n_alive] float64
    gini: float
    total_minority_mass: float
    minority_fraction: float  # total minority mass / total mass
    top_latents: torch.Tensor  # [min(max(k), n_alive)] int64
    n_alive: int

    def share_at(self, k: int) -> float:
        """Share of minority mass held by the top-k latents."""
        return _top_share(self.curve, k, self.total_minority_mass)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame({"k": self.k, "share": self.share}).set_index("k")


def top_latents(census: PolarityCensus, k: Sequence[int] = DEFAULT_K) -> Concentration:
    """Share of all minority-sign mass held by the top-k latents ranked by minority mass."""
    if any(int(x) < 1 for x in k):
        raise SignSAEError(f"k must be positive integers, got {list(k)}.")
    m = census.minority_mass[census.alive]
    ids = census.alive.nonzero().squeeze(1)
    order = m.argsort(descending=True, stable=True)
    total = m.sum().item()
    curve = m[order].cumsum(0) / total if total > 0 else torch.full_like(m, float("nan"))
    ks = [int(x) for x in k]
    return Concentration(
        k=ks,
        share=[_top_share(curve, x, total) for x in ks],
        curve=curve,
        gini=gini(m),
        total_minority_mass=total,
        minority_fraction=census.mass_weighted_bipolarity(),
        top_latents=ids[order[: max(ks, default=0)]],
        n_alive=int(m.numel()),
    )


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: sum_ij |v_i - v_j| / (2 n^2 mean(v)).

    0 when all are equal, (n - 1) / n when one holds everything; NaN for an empty or zero set.
    """
    v = values.double().flatten().sort().values
    n, total = v.numel(), v.sum().item()
    if n == 0 or total <= 0:
        return float("nan")
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return (2 * (rank * v).sum().item() / (n * total)) - (n + 1) / n


def compare(
    censuses: dict[str, PolarityCensus],
    k: Sequence[int] = DEFAULT_K,
    threshold: float = BIPOLAR_BALANCE,
) -> pd.DataFrame:
    """One row per census (e.g. per hookpoint): L0, dead fraction, bipolar fraction and its
    sign-flip-null value at ``threshold``, minority fraction, Gini and top-k shares, and the Gini
    and top-k shares of the sign-flip null (``null_*``): minority mass spread as the latents'
    total mass is, the control a concentration claim must beat."""
    rows = {}
    for name, c in censuses.items():
        conc = top_latents(c, k)
        null = top_latents(c.sign_flip_null(), k)
        rows[name] = {
            "d_sae": c.d_sae,
            "n_tokens": c.n_tokens,
            "l0": c.l0,
            "dead_fraction": c.dead_fraction,
            "bipolar_fraction": c.bipolar_fraction(threshold),
            "null_bipolar_fraction": c.sign_flip_null().bipolar_fraction(threshold),
            "minority_fraction": conc.minority_fraction,
            "gini": conc.gini,
            **{f"top{x}_share": s for x, s in zip(conc.k, conc.share, strict=True)},
            "null_gini": null.gini,
            **{f"null_top{x}_share": s for x, s in zip(null.k, null.share, strict=True)},
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _top_share(curve: torch.Tensor, k: int, total: float) -> float:
    if total <= 0:
        return float("nan")
    return curve[min(k, curve.numel()) - 1].item()
