"""Shared fixtures: the real offline model (converted once, cached) and held-out tokens."""

import pytest
import torch

from sign_sae.corpus import load_texts, tokenize
from sign_sae.harvest import harvest
from sign_sae.models import hook_name, load_model, mid_layer


@pytest.fixture(scope="session")
def model():
    """SmolLM2-135M-Instruct as a HookedSAETransformer; the first run converts the GGUF file."""
    return load_model()


@pytest.fixture(scope="session")
def eval_tokens(model) -> torch.Tensor:
    """8 rows x 64 tokens of held-out Shakespeare, each row starting with BOS."""
    return tokenize(model, load_texts(split="validation"), context_size=64, max_tokens=8 * 64)


@pytest.fixture(scope="session")
def mlp_out_activations(model, tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) SmolLM2 MLP-out activations at the middle layer, [tokens, d_model]:
    32k tokens of the training plays and 4k of the held-out plays, 128-token rows."""
    hook = hook_name("mlp_out", mid_layer(model))
    folder = tmp_path_factory.mktemp("mlp_out")
    out = []
    for split, n in (("train", 32 * 1024), ("validation", 4096)):
        tokens = tokenize(model, load_texts(split=split), 128, n)
        out.append(harvest(model, tokens, [hook], folder / split)[hook].load())
    return out[0], out[1].float()
