"""The sweep with its polarity columns.

``sign_sae.runs`` trains and evaluates the grid; this module adds what needs the analyses: per
run, the polarity census over the held-out activations (``polarity_columns``). The frontier
figures of a sweep are ``analyses.frontier_plots``.
"""

from collections.abc import Iterable
from typing import Any

import torch

from analyses.concentration import top_latents
from analyses.polarity import census_from_activations
from sign_sae.runs import Inputs, Row, SweepConfig, run_sweep

_ROWS = 4096


def polarity_columns(sae: Any, acts: Iterable[torch.Tensor]) -> dict[str, float]:
    """Census columns of one SAE on held-out activations (pieces ``[rows, d_in]``, as the run
    system streams them, or one tensor): bipolar fraction of alive latents at balance >=
    ``sign_sae.metrics.BIPOLAR_BALANCE``, the same under the sign-flip null (seed 0), the top-1
    and top-10 shares of minority-sign mass and the minority fraction of all mass. For a
    non-negative SAE the bipolar fraction is 0 and the shares are NaN (no minority mass)."""
    pieces = acts.split(_ROWS) if isinstance(acts, torch.Tensor) else acts
    census = census_from_activations(sae, pieces)
    conc = top_latents(census, (1, 10))
    return {
        "census_bipolar_fraction": census.bipolar_fraction(),
        "null_bipolar_fraction": census.sign_flip_null().bipolar_fraction(),
        "top1_share": conc.share[0],
        "top10_share": conc.share[1],
        "minority_fraction": conc.minority_fraction,
    }


def run(cfg: SweepConfig, inputs: Inputs | None = None, progress: bool = True) -> list[Row]:
    """``sign_sae.runs.run_sweep`` with the polarity columns."""
    return run_sweep(cfg, columns=polarity_columns, inputs=inputs, progress=progress)
