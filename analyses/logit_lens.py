"""Logit lens of a direction: which tokens does adding +d, or -d, to the residual stream promote?

Choice: the direction is made unit-norm and passed through the linear part of the final norm
(mean-centring for LayerNorm, then the gain ``ln_final.w``), then ``W_U``. The per-token 1/RMS
(or 1/std) factor is left out (a positive scalar that does not change the ranking) and so is
``b_U`` (the same offset for every direction). SmolLM2 ties its embeddings, so there ``W_U`` is
``W_E`` transposed and the lens also reads which input tokens the direction resembles.
Token strings are the raw decoded text of each token (escaping is a report's job).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from analyses.results import Result
from sign_sae.errors import SignSAEError


@dataclass(eq=False)
class LogitLens(Result):
    """Top-k tokens for +d and for -d, with their logits (the logit of -d is minus that of d)."""

    pos_ids: list[int]
    pos_tokens: list[str]
    pos_logits: list[float]
    neg_ids: list[int]
    neg_tokens: list[str]
    neg_logits: list[float]

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "pos_token": self.pos_tokens,
                "pos_logit": self.pos_logits,
                "neg_token": self.neg_tokens,
                "neg_logit": self.neg_logits,
            },
            index=pd.RangeIndex(1, len(self.pos_ids) + 1, name="rank"),
        )


def direction_logits(model: Any, direction: torch.Tensor) -> torch.Tensor:
    """Logits ``[d_vocab]`` that the unit direction adds through the final norm's linear part."""
    W_U = model.W_U
    d = direction.detach().to(W_U)
    if d.shape != (W_U.shape[0],):
        raise SignSAEError(
            f"The direction has shape {tuple(d.shape)}; the logit lens needs a residual-stream "
            f"vector of size d_model={W_U.shape[0]}."
        )
    d = d / d.norm().clamp(min=1e-12)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        d = d - d.mean()
    gain = getattr(getattr(model, "ln_final", None), "w", None)
    if gain is not None:
        d = d * gain.detach()
    return d @ W_U.detach()


def logit_lens(model: Any, direction: torch.Tensor, k: int = 10) -> LogitLens:
    """Top ``k`` tokens promoted by +direction and by -direction, with logit values."""
    logits = direction_logits(model, direction)
    pos, neg = logits.topk(k), (-logits).topk(k)
    return LogitLens(
        pos_ids=pos.indices.tolist(),
        pos_tokens=token_strings(model, pos.indices.tolist()),
        pos_logits=pos.values.tolist(),
        neg_ids=neg.indices.tolist(),
        neg_tokens=token_strings(model, neg.indices.tolist()),
        neg_logits=neg.values.tolist(),
    )


def token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    """Decoded text of each token id (the id as text when the model has no tokenizer); what is
    not valid Unicode (a lone surrogate from a partial byte sequence) becomes U+FFFD."""
    tok = getattr(model, "tokenizer", None)
    texts = [tok.decode([i]) if tok is not None else str(i) for i in ids]
    return [t.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for t in texts]
