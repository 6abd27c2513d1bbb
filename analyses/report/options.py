"""What a report shows and how much it reads: one options object for every way to build one.

``render``, ``collect`` (a run folder) and ``render_release`` / ``collect_release`` (a
registered release) take the same ``ReportOptions``; its values are checked when it is made.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analyses.polarity import MAX_TOP_EXAMPLES
from sign_sae.errors import SignSAEError

DEFAULT_ALPHAS = (-4.0, -2.0, 0.0, 2.0, 4.0)

# Latent ids shown for every SAE, or {SAE name: ids}.
LatentSelection = Sequence[int] | Mapping[str, Sequence[int]]


@dataclass(frozen=True, eq=False)
class ReportOptions:
    """The options of a report.

    ``model``: the SAEs' model (loaded by the name the SAEs record when None). ``saes``: which
    SAEs (a run's names, ``sign_sae.runs.short_names``, or a release's SAE ids; None: all).
    ``latents``: ids shown for every SAE, or ``{SAE name: ids}``; by default the ``n_latents``
    latents of largest minority-sign mass, and for a non-negative SAE beside a signed one the
    latents matching the signed ones' +d and -d. ``n_tokens`` held-out tokens feed the census
    and the examples (``n_examples`` per sign per latent), read ``batch_size`` rows at a time;
    the steering dial runs ``alphas`` (in typical firings of the latent) on the first
    ``n_prompts`` eval rows cut to ``prompt_len`` tokens (empty ``alphas``: no dials)."""

    model: Any | None = None
    saes: Sequence[str] | None = None
    latents: LatentSelection | None = None
    n_latents: int = 4
    n_tokens: int = 8192
    n_examples: int = 8
    alphas: Sequence[float] = DEFAULT_ALPHAS
    n_prompts: int = 4
    prompt_len: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.n_examples <= MAX_TOP_EXAMPLES:
            raise SignSAEError(
                f"n_examples must be in [1, {MAX_TOP_EXAMPLES}], got {self.n_examples}."
            )
        if self.n_latents < 0:
            raise SignSAEError(f"n_latents must be >= 0, got {self.n_latents}.")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if self.saes is not None:
            object.__setattr__(self, "saes", tuple(self.saes))
