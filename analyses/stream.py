"""Streaming hook activations and SAE latents over token batches.

Every analysis reads the SAE's hook through ``run_with_cache(names_filter=[hook],
stop_at_layer=layer + 1)`` under ``torch.inference_mode``, one batch of sequences at a time, or
takes precomputed activation batches of shape ``[batch, seq, d_in]`` or ``[tokens, d_in]``.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sign_sae.errors import SignSAEError
from sign_sae.models import stop_at_layer


def sae_hook(sae: Any, hook: str | None = None) -> str:
    """The hook to read: ``hook`` if given, else the SAE's ``cfg.metadata.hook_name``."""
    name = hook or sae.cfg.metadata.hook_name
    if not name:
        raise SignSAEError(
            "The SAE's cfg.metadata.hook_name is empty; pass hook= with the model hook it reads."
        )
    return name


def hook_activations(
    model: Any, tokens: torch.Tensor, hook: str, batch_size: int = 16
) -> Iterator[torch.Tensor]:
    """Yield the ``hook`` activations ``[batch, seq, d]`` for consecutive rows of ``tokens``."""
    if tokens.ndim != 2:
        raise SignSAEError(f"tokens must be [n_seq, seq_len], got shape {tuple(tokens.shape)}.")
    if batch_size <= 0:
        raise SignSAEError(f"batch_size must be positive, got {batch_size}.")
    if hook not in model.hook_dict:
        raise SignSAEError(f"The model has no hook {hook!r}.")
    for start in range(0, tokens.shape[0], batch_size):
        with torch.inference_mode():
            _, cache = model.run_with_cache(
                tokens[start : start + batch_size],
                names_filter=[hook],
                stop_at_layer=stop_at_layer([hook]),
            )
        yield cache[hook]


@dataclass
class LatentBatch:
    """Latents ``acts [batch, seq, d_sae]`` of sequences ``seq_offset...`` from position
    ``pos_offset`` on (1 when the BOS position was dropped)."""

    acts: torch.Tensor
    seq_offset: int
    pos_offset: int


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, d]`` as is; ``[tokens, d]`` as ``[tokens, 1, d]`` (one token per row)."""
    if x.ndim == 2:
        return x.unsqueeze(1)
    if x.ndim != 3:
        raise SignSAEError(
            f"Activation batches must be [batch, seq, d] or [tokens, d], got {x.ndim}D."
        )
    return x


def latent_batches(
    sae: Any, batches: Iterable[torch.Tensor], exclude_bos: bool = False
) -> Iterator[LatentBatch]:
    """Encode activation batches with ``sae.encode``; dense, detached, on the SAE's device.

    ``exclude_bos`` drops position 0 of every sequence (where ``corpus.tokenize`` puts BOS,
    whose outlier norm would otherwise dominate the statistics); it needs 3D batches.
    """
    seq_offset = 0
    for batch in batches:
        if exclude_bos and batch.ndim != 3:
            raise SignSAEError("exclude_bos needs [batch, seq, d] activations; got [tokens, d].")
        x = as_sequences(batch)
        n_seq = x.shape[0]
        if exclude_bos:
            x = x[:, 1:]
        with torch.inference_mode():
            f = sae.encode(x.reshape(-1, x.shape[-1]).to(sae.device))
            if f.is_sparse:
                f = f.to_dense()
        yield LatentBatch(f.reshape(*x.shape[:2], -1), seq_offset, int(exclude_bos))
        seq_offset += n_seq
