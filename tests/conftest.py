"""Shared fixtures: the real offline model (converted once, cached) and held-out tokens."""

import pytest
import torch

from sign_sae.corpus import load_texts, tokenize
from sign_sae.models import load_model


@pytest.fixture(scope="session")
def model():
    """SmolLM2-135M-Instruct as a HookedSAETransformer; the first run converts the GGUF file."""
    return load_model()


@pytest.fixture(scope="session")
def eval_tokens(model) -> torch.Tensor:
    """8 rows x 64 tokens of held-out Shakespeare, each row starting with BOS."""
    return tokenize(model, load_texts(split="eval"), context_size=64, max_tokens=8 * 64)
