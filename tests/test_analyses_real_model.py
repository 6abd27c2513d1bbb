"""REAL MODEL: the analyses on SmolLM2-135M (the ``model`` fixture) with a small SA-GSAE trained
for a few hundred steps on mid-layer MLP-out activations of held-in Shakespeare.

These tests check plumbing and sanity (finite numbers in range, KL growing with |alpha|), not
the paper's findings; the figures for docs/analyses.md come from full-size runs.
"""

import math

import pytest
import torch
from sae_lens import SAE

from analyses import concentration, logit_lens, pairs, polarity, steering
from analyses.steering import DialSpec
from analyses.stream import hook_activations
from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig
from sign_sae.corpus import load_texts, tokenize
from sign_sae.models import hook_name, mid_layer
from sign_sae.trainer import TensorBatches, TrainConfig, train


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """(hook, SA-GSAE with 512 latents) after 300 Adam steps on ~3k training tokens."""
    hook = hook_name("mlp_out", mid_layer(model))
    tokens = tokenize(model, load_texts(split="train", max_docs=2), 64, max_tokens=48 * 64)
    x = torch.cat(
        [a[:, 1:].reshape(-1, a.shape[-1]) for a in hook_activations(model, tokens, hook)]
    )
    cfg = SAGSAETrainingSAEConfig(d_in=model.cfg.d_model, d_sae=512, sparsity_coefficient=10.0)
    cfg.metadata.hook_name = hook
    torch.manual_seed(0)
    sae = SAGSAETrainingSAE(cfg)
    train(sae, TensorBatches(x, 256), TrainConfig(total_steps=300, batch_size=256), progress=False)
    path = tmp_path_factory.mktemp("sae")
    sae.save_inference_model(path)
    return hook, SAE.load_from_disk(path)


@pytest.fixture(scope="module")
def census(model, eval_tokens, trained):
    _, sae = trained
    return polarity.census(sae, model, eval_tokens, batch_size=8, top_examples=3)


def test_real_model_census_is_sane(census, eval_tokens, trained) -> None:
    hook, sae = trained
    n_seq, seq_len = eval_tokens.shape
    assert census.n_tokens == n_seq * (seq_len - 1) and census.hook_name == hook
    assert 0 < census.l0 < sae.cfg.d_sae
    assert census.dead_fraction < 0.5
    assert int(census.n_neg.sum()) > 0 and int(census.n_pos.sum()) > 0  # signed latents
    b = census.balance[census.alive]
    assert (b >= 0).all() and (b <= 0.5).all()
    for t in (0.1, 0.3):
        assert 0.0 <= census.bipolar_fraction(t) <= 1.0
        assert 0.0 <= census.sign_flip_null(0).bipolar_fraction(t) <= 1.0
    curve = census.balance_curve()
    assert curve[0] == 1.0 and all(a >= b for a, b in zip(curve, curve[1:], strict=False))
    top = census.examples(int(census.n_fired.argmax()), "+")
    assert all(0 <= s < n_seq and 1 <= p < seq_len and v > 0 for s, p, v in top)


def test_real_model_concentration_is_sane(census) -> None:
    conc = concentration.top_latents(census)
    assert all(0.0 <= s <= 1.0 + 1e-9 for s in conc.share)
    assert conc.share == sorted(conc.share)
    assert 0.0 <= conc.gini <= 1.0 and 0.0 < conc.minority_fraction <= 0.5
    df = concentration.compare({"mlp_out": census})
    assert df.notna().all(axis=None)


def test_real_model_dial_kl_grows_with_alpha(model, eval_tokens, census, trained) -> None:
    _, sae = trained
    latent = int(concentration.top_latents(census, k=[1]).top_latents[0])
    lens = logit_lens.logit_lens(model, sae.W_dec[latent], k=5)
    assert all(isinstance(t, str) for t in lens.pos_tokens + lens.neg_tokens)
    assert all(math.isfinite(v) for v in lens.pos_logits + lens.neg_logits)
    scale = steering.typical_scale(census, sae, latent)
    prompts = eval_tokens[:2, :16]  # equal lengths: one forward per alpha
    result = steering.dial(model, sae, latent, DialSpec([-8, -4, 0, 4, 8], prompts, scale=scale))
    kl = {p.alpha: p.kl for p in result.points}
    assert kl[0] == pytest.approx(0.0, abs=1e-5)
    assert 0 < kl[4] < kl[8] and 0 < kl[-4] < kl[-8]
    assert all(math.isfinite(p.effect) for p in result.points)
    assert -1.0 <= result.monotonicity <= 1.0
    spec = DialSpec([-4, 4], ["To be, or not to be"], "clamp", scale, max_new_tokens=2)
    clamp = steering.dial(model, sae, latent, spec)
    assert all(math.isfinite(p.kl) and p.kl >= 0 for p in clamp.points)
    assert all(len(p.continuations) == 1 and p.continuations[0] for p in clamp.points)


def test_real_model_pairs_run_on_cached_activations(model, eval_tokens, trained) -> None:
    hook, sae = trained
    acts = [a[:, 1:] for a in hook_activations(model, eval_tokens, hook, batch_size=8)]
    found = pairs.antipodal_pairs(sae, activations=acts, cos_threshold=-0.5)
    assert found.n_tokens == eval_tokens.shape[0] * (eval_tokens.shape[1] - 1)
    assert 0.0 <= found.dictionary_share <= 1.0
    assert all(p.cos <= -0.5 and p.cofire <= 0.05 for p in found.pairs)
