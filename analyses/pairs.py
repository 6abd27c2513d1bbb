"""Antipodal pairs: latents of a (non-negative) SAE whose decoder directions are near-opposite
and that rarely fire together, i.e. one signed direction spent on two latents.

Candidates: cos(d_i, d_j) <= cos_threshold, found block by block (never an F x F matrix).
With activations: co-firing rate P(f_i != 0 and f_j != 0) / min(P(f_i != 0), P(f_j != 0))
<= max_cofire, and Pearson correlation of (f_i, f_j) over all tokens. Pairs are disjoint:
candidates are taken most-opposite first, each latent at most once.
``to_signed_init`` merges each pair into one signed SA-GSAE latent.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from sae_lens.saes.sae import SAEMetadata

from analyses.results import Result
from analyses.stream import hook_activations, latent_batches, sae_hook
from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig

MAX_CANDIDATES = 1_000_000
# theta- of latents kept one-sided in to_signed_init: the negative gate never opens.
CLOSED_THRESHOLD = 1e9
_CELLS_PER_CHUNK = 1 << 24  # bounds [tokens, candidates] temporaries
_ROWS_PER_CHUNK = 512  # bounds the float64 [tokens, d_sae] copies
# Encoders to_signed_init can read, as "gate p + b_gate > theta, magnitude exp(r) p + b_mag".
_NON_NEGATIVE = ("standard", "jumprelu", "topk", "gated")


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
        raise ValueError(
            f"cos_threshold must be in [-1, 0) for opposite directions, got {cos_threshold}."
        )
    if (model is None) != (tokens is None) or (model is not None and activations is not None):
        raise ValueError("Pass model and tokens, or activations, or neither.")
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
            raise ValueError(
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


def to_signed_init(
    sae: Any,
    pairs: AntipodalPairs | Sequence[tuple[int, int]],
    tied: bool = False,
    threshold_init: float = 1e-3,
) -> SAGSAETrainingSAE:
    """An SA-GSAE initialisation that merges each pair (i, j) into one signed latent and keeps
    every other latent, so that training from it measures what the merge gains.

    Latent order: the merged pairs first (in the given order; +side = i, -side = j), then the
    unpaired latents in ascending original order. Every source latent l is read as
    "gate p + b_gate > theta, magnitude exp(r) p + b_mag" with p = (x - b_dec) W_enc[:, l]
    (standard / TopK: b_gate = b_mag = b_enc, theta = 0, r = 0; JumpReLU: theta = threshold;
    Gated: its own b_gate, r_mag, b_mag, theta = 0) and its decoder norm c_l folded in (W_enc,
    b_gate, theta, b_mag times c_l; decoder row unit-norm). Then, with m = (b_gate_i + b_gate_j)/2:

    - merged: W_dec = (d_i - d_j) / ||d_i - d_j|| (unit rows), W_enc = (w_i - w_j) / 2,
      b_gate = (b_gate_i - b_gate_j) / 2, theta+ = max(0, theta_i - m),
      theta- = max(0, theta_j - m); untied: r+ = r_i, b_mag+ = b_mag_i, r- = r_j,
      b_mag- = -b_mag_j; tied: r = (r_i + r_j) / 2, b_mag = (b_mag_i - b_mag_j) / 2.
    - unpaired: the source latent as is, with theta- = CLOSED_THRESHOLD (it stays one-sided;
      a dead-latent reset during training reopens it).
    - b_dec, apply_b_dec_to_input, normalize_activations and the hook name are copied.

    Untied, the merged latent reproduces both source latents exactly when w_j = -w_i,
    d_j ~ -d_i and theta_i + theta_j >= b_gate_i + b_gate_j (the two gates never overlap);
    otherwise it is their symmetric average. TopK's global top-k selection is not carried over.
    The result takes raw activations: a trainer that rescales inputs must rescale it too.
    """
    arch = sae.cfg.architecture()
    if arch not in _NON_NEGATIVE:
        raise ValueError(f"to_signed_init reads {_NON_NEGATIVE} SAEs, got architecture {arch!r}.")
    pair_list = (
        pairs.as_tuples() if isinstance(pairs, AntipodalPairs) else [tuple(p) for p in pairs]
    )
    flat = [x for p in pair_list for x in p]
    if len(set(flat)) != len(flat) or any(not 0 <= x < sae.cfg.d_sae for x in flat):
        raise ValueError("Pairs must use distinct latent indices within [0, d_sae).")
    src = _gate_form(sae)
    P = torch.tensor([p[0] for p in pair_list], dtype=torch.long)
    N = torch.tensor([p[1] for p in pair_list], dtype=torch.long)
    paired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    paired[flat] = True
    U = (~paired).nonzero().squeeze(1)

    mid = (src["b_gate"][P] + src["b_gate"][N]) / 2
    d_merged = src["W_dec"][P] - src["W_dec"][N]
    new = {
        "W_enc": torch.cat([(src["W_enc"][:, P] - src["W_enc"][:, N]) / 2, src["W_enc"][:, U]], 1),
        "W_dec": torch.cat([d_merged / d_merged.norm(dim=1, keepdim=True), src["W_dec"][U]]),
        "b_gate": torch.cat([(src["b_gate"][P] - src["b_gate"][N]) / 2, src["b_gate"][U]]),
        "threshold_pos": torch.cat([(src["theta"][P] - mid).clamp(min=0), src["theta"][U]]),
        "threshold_neg": torch.cat(
            [
                (src["theta"][N] - mid).clamp(min=0),
                torch.full_like(src["theta"][U], CLOSED_THRESHOLD),
            ]
        ),
        "b_dec": src["b_dec"],
    }
    if tied:
        new["r_mag"] = torch.cat([(src["r"][P] + src["r"][N]) / 2, src["r"][U]])
        new["b_mag"] = torch.cat([(src["b_mag"][P] - src["b_mag"][N]) / 2, src["b_mag"][U]])
    else:
        new["r_mag"] = torch.cat([src["r"][P], src["r"][U]])
        new["b_mag"] = torch.cat([src["b_mag"][P], src["b_mag"][U]])
        new["r_mag_neg"] = torch.cat([src["r"][N], src["r"][U]])
        new["b_mag_neg"] = torch.cat([-src["b_mag"][N], src["b_mag"][U]])

    meta = sae.cfg.metadata
    cfg = SAGSAETrainingSAEConfig(
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae - len(pair_list),
        dtype=sae.cfg.dtype,
        device=sae.cfg.device,
        apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
        normalize_activations=sae.cfg.normalize_activations,
        tied=tied,
        threshold_init=threshold_init,
        metadata=SAEMetadata(hook_name=meta.hook_name, model_name=meta.model_name),
    )
    signed = SAGSAETrainingSAE(cfg)
    with torch.no_grad():
        for name, value in new.items():
            getattr(signed, name).copy_(value)
    return signed


def _gate_form(sae: Any) -> dict[str, torch.Tensor]:
    """The source SAE's per-latent (W_enc, b_gate, theta, r, b_mag) with decoder norms folded."""
    W_dec = sae.W_dec.detach()
    c = W_dec.norm(dim=1).clamp(min=1e-12)
    zeros = torch.zeros_like(c)
    if sae.cfg.architecture() == "gated":
        b_gate, r, b_mag, theta = sae.b_gate.detach(), sae.r_mag.detach(), sae.b_mag.detach(), zeros
    else:
        b_gate = b_mag = sae.b_enc.detach()
        r = zeros
        threshold = getattr(sae, "threshold", None)
        theta = threshold.detach() if isinstance(threshold, torch.Tensor) else zeros
    return {
        "W_enc": sae.W_enc.detach() * c,
        "W_dec": W_dec / c[:, None],
        "b_gate": b_gate * c,
        "theta": theta * c,
        "r": r,
        "b_mag": b_mag * c,
        "b_dec": sae.b_dec.detach(),
    }
