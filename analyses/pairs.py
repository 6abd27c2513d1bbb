"""Antipodal pairs: latents of a (non-negative) SAE whose decoder directions are near-opposite
and that rarely fire together, i.e. one signed direction spent on two latents.

Candidates: cos(d_i, d_j) <= cos_threshold, found block by block (never an F x F matrix).
With activations: co-firing rate P(f_i != 0 and f_j != 0) / min(P(f_i != 0), P(f_j != 0))
<= max_cofire, and Pearson correlation of (f_i, f_j) over all tokens. Pairs are disjoint:
candidates are taken most-opposite first, each latent at most once.
``sign_sae.export.to_signed_init(sae, found.as_tuples())`` merges each pair into one signed SA-GSAE
latent.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from analyses.results import Result
from analyses.stream import hook_activations, latent_batches, sae_hook
from sign_sae.errors import SignSAEError

MAX_CANDIDATES = 1_000_000
_CELLS_PER_CHUNK = 1 << 24  # bounds [tokens, candidates] temporaries
_ROWS_PER_CHUNK = 512  # bounds the float64 [tokens, d_sae] copies


@dataclass(eq=False)
class Pair(Result):
    """One antipodal pair; the co-firing fields are None when no activations were given."""

    i: int
    j: int
    cos: float
    n_i: int | None = None
    n_j: int | None = None
    n_both: int | None = None
    cofire: float | None = None
    correlation: float | None = None


@dataclass(eq=False)
class AntipodalPairs(Result):
    """Disjoint antipodal pairs, most opposite first."""

    pairs: list[Pair]
    d_sae: int
    n_candidates: int  # latent pairs passing the cosine test (before co-firing and matching)
    n_tokens: int  # tokens the co-firing statistics used (0: decoder geometry only)
    cos_threshold: float
    max_cofire: float

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def dictionary_share(self) -> float:
        """2 * n_pairs / d_sae: the share of the dictionary spent on paired latents."""
        return 2 * self.n_pairs / self.d_sae

    def as_tuples(self) -> list[tuple[int, int]]:
        return [(p.i, p.j) for p in self.pairs]

    def to_dataframe(self) -> pd.DataFrame:
        columns = [f.name for f in Pair.__dataclass_fields__.values()]
        return pd.DataFrame([p.to_dict() for p in self.pairs], columns=columns)


def antipodal_pairs(
    sae: Any,
    model: Any = None,
    tokens: torch.Tensor | None = None,
    activations: Iterable[torch.Tensor] | None = None,
    cos_threshold: float = -0.7,
    max_cofire: float = 0.05,
    batch_size: int = 16,
    hook: str | None = None,
    exclude_bos: bool = True,
    block_size: int = 1024,
) -> AntipodalPairs:
    """Find disjoint pairs with near-opposite decoder directions that rarely co-fire.

    Give ``model`` and ``tokens`` (run batch by batch at the SAE's hook; ``exclude_bos`` drops
    position 0), or ``activations`` (precomputed ``[batch, seq, d_in]`` or ``[tokens, d_in]``
    batches, used as given), or neither (decoder geometry only, no co-firing filter).
    """
    if not -1.0 <= cos_threshold < 0.0:
        raise SignSAEError(
            f"cos_threshold must be in [-1, 0) for opposite directions, got {cos_threshold}."
        )
    if (model is None) != (tokens is None) or (model is not None and activations is not None):
        raise SignSAEError("Pass model and tokens, or activations, or neither.")
    ii, jj, cos = opposite_candidates(sae.W_dec, cos_threshold, block_size)
    n_candidates = int(ii.numel())
    if model is not None:
        activations = hook_activations(model, tokens, sae_hook(sae, hook), batch_size)
    stats: dict[str, torch.Tensor] = {}
    n_tokens = 0
    if activations is not None:
        stats, n_tokens = _cofiring(sae, activations, exclude_bos and model is not None, ii, jj)
        keep = stats["cofire"] <= max_cofire
        ii, jj, cos = ii[keep], jj[keep], cos[keep]
        stats = {k: v[keep] for k, v in stats.items()}
    chosen = _disjoint(ii, jj, cos)
    pairs = [
        Pair(
            i=int(ii[c]),
            j=int(jj[c]),
            cos=float(cos[c]),
            **{k: (int(v[c]) if v.dtype == torch.long else float(v[c])) for k, v in stats.items()},
        )
        for c in chosen
    ]
    return AntipodalPairs(pairs, sae.cfg.d_sae, n_candidates, n_tokens, cos_threshold, max_cofire)


@dataclass(eq=False)
class Correspondence(Result):
    """For each of n directions d (e.g. the bipolar latents of a signed SAE), the latents a and b
    of a non-negative SAE closest to +d and to -d, and whether they form an antipodal pair.

    ``cos_pos[k]`` = cos(d_k, W_dec[a_k]), ``cos_neg[k]`` = cos(-d_k, W_dec[b_k]) (a != b);
    ``cofire[k]`` = #{f_a != 0 and f_b != 0} / min(#{f_a != 0}, #{f_b != 0}) over the tokens
    given (NaN without activations). A direction *has a pair* when both cosines are
    >= ``min_cos`` and (with activations) cofire <= ``max_cofire``: one signed latent doing the
    job of two non-negative ones.
    """

    a: torch.Tensor  # [n] int64
    b: torch.Tensor  # [n] int64
    cos_pos: torch.Tensor  # [n] float64
    cos_neg: torch.Tensor  # [n] float64
    cofire: torch.Tensor  # [n] float64
    min_cos: float
    max_cofire: float

    @property
    def has_pair(self) -> torch.Tensor:
        ok = (self.cos_pos >= self.min_cos) & (self.cos_neg >= self.min_cos)
        return ok & ~(self.cofire > self.max_cofire)  # NaN (no activations) does not veto

    @property
    def share(self) -> float:
        """Share of the directions that have an antipodal pair (NaN for none)."""
        n = self.a.numel()
        return float("nan") if n == 0 else int(self.has_pair.sum()) / n

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "a": self.a.numpy(),
                "b": self.b.numpy(),
                "cos_pos": self.cos_pos.numpy(),
                "cos_neg": self.cos_neg.numpy(),
                "cofire": self.cofire.numpy(),
                "has_pair": self.has_pair.numpy(),
            }
        )


def correspondence(
    directions: torch.Tensor,
    sae: Any,
    activations: Iterable[torch.Tensor] | None = None,
    min_cos: float = 0.7,
    max_cofire: float = 0.05,
) -> Correspondence:
    """Match each direction ``[n, d_in]`` (signed latents: ``signed_sae.W_dec[ids]``; the
    control: ``random_directions``) to its best +d and -d latents of ``sae`` and, with
    ``activations`` (batches as in ``antipodal_pairs``, used as given), their co-firing."""
    if directions.ndim != 2 or directions.shape[1] != sae.W_dec.shape[1]:
        raise SignSAEError(
            f"directions must be [n, {sae.W_dec.shape[1]}] (the SAE's d_in), "
            f"got {tuple(directions.shape)}."
        )
    D = sae.W_dec.detach().double().cpu()
    D = D / D.norm(dim=1, keepdim=True).clamp(min=1e-12)
    u = directions.detach().double().cpu()
    cos = (u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)) @ D.T  # [n, d_sae]
    cos_pos, a = cos.max(1)
    neg = (-cos).scatter(1, a[:, None], float("-inf"))
    cos_neg, b = neg.max(1)
    cofire = torch.full_like(cos_pos, float("nan"))
    if activations is not None and a.numel() > 0:
        cofire = _cofiring(sae, activations, False, a, b)[0]["cofire"]
    return Correspondence(a, b, cos_pos, cos_neg, cofire, min_cos, max_cofire)


def random_directions(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` unit directions uniform on the sphere in R^d: the control for ``correspondence``
    (a direction with no structure finds no antipodal pair)."""
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g / g.norm(dim=1, keepdim=True)


def opposite_candidates(
    W_dec: torch.Tensor, cos_threshold: float, block_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, cos) with i < j and cos(W_dec[i], W_dec[j]) <= cos_threshold, computed in row
    blocks so memory stays at block_size x d_sae."""
    D = W_dec.detach().float()
    D = D / D.norm(dim=1, keepdim=True).clamp(min=1e-12)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    total = 0
    for start in range(0, D.shape[0], block_size):
        sim = D[start : start + block_size] @ D.T
        rows, cols = (sim <= cos_threshold).nonzero(as_tuple=True)
        upper = cols > rows + start
        rows, cols = rows[upper], cols[upper]
        found.append((rows + start, cols, sim[rows, cols]))
        total += rows.numel()
        if total > MAX_CANDIDATES:
            raise SignSAEError(
                f"More than {MAX_CANDIDATES} latent pairs have cos <= {cos_threshold}; "
                "use a more negative cos_threshold."
            )
    ii, jj, c = (torch.cat(parts).cpu() for parts in zip(*found, strict=True))
    return ii.long(), jj.long(), c.double()


def _cofiring(
    sae: Any,
    activations: Iterable[torch.Tensor],
    exclude_bos: bool,
    ii: torch.Tensor,
    jj: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per candidate pair: firing counts, co-firing rate and Pearson correlation (float64)."""
    d_sae, n_cand = sae.cfg.d_sae, ii.numel()
    count = torch.zeros(d_sae, dtype=torch.float64)
    s1 = torch.zeros(d_sae, dtype=torch.float64)
    s2 = torch.zeros(d_sae, dtype=torch.float64)
    both = torch.zeros(n_cand, dtype=torch.float64)
    cross = torch.zeros(n_cand, dtype=torch.float64)
    n = 0
    for batch in latent_batches(sae, activations, exclude_bos):
        for rows in batch.acts.reshape(-1, d_sae).split(_ROWS_PER_CHUNK):
            f = rows.double().cpu()
            n += f.shape[0]
            count += (f != 0).sum(0)
            s1 += f.sum(0)
            s2 += f.pow(2).sum(0)
            step = max(1, _CELLS_PER_CHUNK // f.shape[0])
            for a in range(0, n_cand, step):
                fi, fj = f[:, ii[a : a + step]], f[:, jj[a : a + step]]
                both[a : a + step] += ((fi != 0) & (fj != 0)).sum(0)
                cross[a : a + step] += (fi * fj).sum(0)
    n_i, n_j = count[ii], count[jj]
    smaller = torch.minimum(n_i, n_j)
    cofire = torch.where(smaller > 0, both / smaller.clamp(min=1), 0.0)
    cov = n * cross - s1[ii] * s1[jj]
    var = (n * s2[ii] - s1[ii] ** 2) * (n * s2[jj] - s1[jj] ** 2)
    corr = torch.where(var > 0, cov / var.clamp(min=1e-300).sqrt(), float("nan"))
    stats = {
        "n_i": n_i.long(),
        "n_j": n_j.long(),
        "n_both": both.long(),
        "cofire": cofire,
        "correlation": corr,
    }
    return stats, n


def _disjoint(ii: torch.Tensor, jj: torch.Tensor, cos: torch.Tensor) -> list[int]:
    """Greedy matching, most opposite first: candidate indices with no latent used twice."""
    used: set[int] = set()
    chosen = []
    for c in cos.argsort(stable=True).tolist():
        i, j = int(ii[c]), int(jj[c])
        if i not in used and j not in used:
            used.update((i, j))
            chosen.append(c)
    return chosen


def matching_pair(signed_sae: Any, latent: int, sae: Any) -> tuple[int, int]:
    """The latents (a, b) of ``sae`` whose decoder directions best match +d and -d of
    ``signed_sae``'s ``latent`` (largest cosine each, a != b)."""
    d = signed_sae.W_dec[latent].detach().float()
    D = sae.W_dec.detach().float()
    cos = (D / D.norm(dim=1, keepdim=True).clamp(min=1e-12)) @ (d / d.norm().clamp(min=1e-12))
    a = int(cos.argmax())
    neg = -cos
    neg[a] = float("-inf")
    return a, int(neg.argmax())
