"""Every control of the analysis API on synthetic ground truth: where the effect is planted the
statistic beats its control, where it is absent (a symmetric Gaussian) it does not."""

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from test_analyses_polarity import identity_sagsae

from analyses import concentration, pairs, polarity, steering
from sign_sae.architectures import make_training_sae
from sign_sae.errors import SignSAEError
from sign_sae.synthetic import SyntheticData, SyntheticSpec
from sign_sae.trainer import TensorBatches, TrainConfig, train

HOOK = "blocks.0.hook_resid_post"


def sparse_coefficients(n: int, n_bipolar: int, n_one_signed: int, seed: int) -> torch.Tensor:
    """Sparse coefficients (5% active, magnitude in [0.5, 1.5]): the first ``n_bipolar``
    coordinates take either sign, the next ``n_one_signed`` only +."""
    g = torch.Generator().manual_seed(seed)
    d = n_bipolar + n_one_signed
    active = torch.rand(n, d, generator=g) < 0.05
    mag = 0.5 + torch.rand(n, d, generator=g)
    sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)
    sign[:, n_bipolar:] = 1.0
    return active * mag * sign


# ---- polarity: surrogates ------------------------------------------------------------------
def test_surrogates_keep_mean_and_covariance() -> None:
    x = SyntheticData(SyntheticSpec(d=16, n_bipolar=4, n_unipolar=12, p_active=0.1)).sample(
        40_000, torch.Generator().manual_seed(0)
    )[0]
    x = x + 0.3  # a mean the sign surrogate must keep
    for s in (polarity.gaussian_surrogate(x, seed=1), polarity.sign_surrogate(x, seed=1)):
        assert s.shape == x.shape
        assert torch.allclose(s.mean(0), x.mean(0), atol=0.01)
        assert torch.allclose(torch.cov(s.T), torch.cov(x.T), atol=0.01)
    # The sign surrogate keeps the sparsity (kurtosis) the Gaussian throws away, and makes
    # every direction symmetric: the third moment about the mean vanishes.
    flip, gauss = polarity.sign_surrogate(x, seed=1), polarity.gaussian_surrogate(x, seed=1)
    kurt = [((v - v.mean(0)) ** 4).mean(0) / v.var(0) ** 2 for v in (x, flip, gauss)]
    assert torch.allclose(kurt[0], kurt[1], rtol=1e-2) and (kurt[2] < 3.3).all()
    skew = [((v - v.mean(0)) ** 3).mean(0).abs().max() for v in (x, flip)]
    assert skew[0] > 0.005 and skew[1] < skew[0] / 5


def _trained_bipolar_share(x: torch.Tensor, seed: int = 0) -> float:
    """The SA-GSAE recipe on ``x``: bipolar share of its alive latents on fresh rows of ``x``."""
    torch.manual_seed(seed)
    sae = make_training_sae("sa_gsae", x.shape[1], x.shape[1], 1.0, warm_up_steps=30)
    cfg = TrainConfig(total_steps=300, batch_size=512, lr=3e-3, normalize=False, seed=seed)
    train(sae, TensorBatches(x[:-4096], 512, seed=seed), cfg, progress=False)
    return polarity.census_from_activations(sae, [x[-4096:]]).bipolar_fraction()


def test_sign_surrogate_separates_planted_signs_from_a_symmetric_gaussian() -> None:
    """One-signed planted directions: the real data's bipolar share sits far below the same
    recipe's on the sign surrogate. A symmetric Gaussian: the two agree. A surrogate that
    forgot to flip signs would make the first gap vanish."""
    spec = SyntheticSpec(d=24, n_bipolar=4, n_unipolar=20, p_active=0.06)
    planted = SyntheticData(spec).sample(20_000, torch.Generator().manual_seed(3))[0]
    gauss = torch.randn(20_000, 24, generator=torch.Generator().manual_seed(4))
    real, control = (_trained_bipolar_share(v) for v in (planted, polarity.sign_surrogate(planted)))
    assert control - real > 0.5, (real, control)
    g_real, g_control = (_trained_bipolar_share(v) for v in (gauss, polarity.sign_surrogate(gauss)))
    assert abs(g_real - g_control) < 0.15, (g_real, g_control)


def test_mirrored_census_separates_one_signed_latents_from_symmetric_ones() -> None:
    """The same SAE on the sign surrogate of its inputs (no retraining): latents that are one-
    signed because the data is become bipolar, so the real bipolar share sits far below the
    mirrored one; on a symmetric Gaussian the two agree. (Mirroring moves the silent rows of a
    one-signed coordinate to 2 * mean ~ 0.1; the thresholds, 0.2, sit above that, as a trained
    SAE's do above its inputs' noise.)"""
    planted = sparse_coefficients(20_000, 3, 9, seed=3)
    gauss = torch.randn(20_000, 12, generator=torch.Generator().manual_seed(4))
    sae = identity_sagsae(12, threshold=0.2)
    shares = []
    for x in (planted, gauss):
        real = polarity.census_from_activations(sae, [x])
        mirrored = polarity.census_from_activations(sae, [polarity.sign_surrogate(x, seed=5)])
        shares.append((real.bipolar_fraction(), mirrored.bipolar_fraction()))
    assert shares[0] == (pytest.approx(3 / 12), 1.0)
    assert shares[1] == (1.0, 1.0)


def test_mass_weighted_bipolarity_is_the_minority_mass_share() -> None:
    f = sparse_coefficients(20_000, 3, 9, seed=0)
    c = polarity.census_from_activations(identity_sagsae(12, 0.05), [f])
    on = f.abs() >= 0.05
    minority = torch.minimum((f * (f > 0) * on).sum(0), (-f * (f < 0) * on).sum(0))
    assert c.mass_weighted_bipolarity() == pytest.approx(
        (minority.sum() / (f.abs() * on).sum()).item(), rel=1e-5
    )
    # planted: only 3 of 12 coordinates carry a minority side; symmetric Gaussian: all do.
    gauss = polarity.census_from_activations(identity_sagsae(12, 0.05), [torch.randn(20_000, 12)])
    assert c.mass_weighted_bipolarity() < 0.2 < 0.45 < gauss.mass_weighted_bipolarity()


# ---- concentration: against its sign-flip null ---------------------------------------------
def test_concentration_beats_its_null_only_where_bipolarity_is_planted() -> None:
    """3 bipolar among 30 coordinates of equal mass: they hold all minority mass (top-3 share
    1), while the sign-flip null spreads it as the total mass is (~3/30). All 30 bipolar: real
    and null agree. Comparing with the real census instead of its null would fail here."""
    planted = polarity.census_from_activations(
        identity_sagsae(30, 0.05), [sparse_coefficients(20_000, 3, 27, seed=1)]
    )
    real, null = (concentration.top_latents(c, [3]) for c in (planted, planted.sign_flip_null()))
    assert real.share[0] > 0.99 and null.share[0] < 0.2
    assert real.gini > null.gini + 0.5
    symmetric = polarity.census_from_activations(
        identity_sagsae(30, 0.05), [sparse_coefficients(20_000, 30, 0, seed=2)]
    )
    real, null = (
        concentration.top_latents(c, [3]) for c in (symmetric, symmetric.sign_flip_null())
    )
    assert abs(real.share[0] - null.share[0]) < 0.05 and abs(real.gini - null.gini) < 0.05
    row = concentration.compare({"planted": planted})
    assert row.loc["planted", "top5_share"] > row.loc["planted", "null_top5_share"] + 0.5


# ---- correspondence: signed latents vs antipodal pairs of a non-negative SAE ----------------
def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return pairs.random_directions(n, d, seed).float()


def _non_negative_sae(rows: torch.Tensor) -> StandardSAE:
    """A ReLU SAE that reads and writes the given unit rows (a hand-built non-negative SAE)."""
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=rows.shape[1], d_sae=rows.shape[0], metadata=SAEMetadata(hook_name=HOOK)
        )
    )
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
        sae.b_enc.fill_(-0.2)
        sae.b_dec.zero_()
    return sae


def test_correspondence_finds_planted_pairs_and_not_random_directions() -> None:
    d = 48
    u = _unit_rows(12, d, seed=0)  # 6 signed directions, 6 one-signed ones
    signed, one_signed = u[:6], u[6:]
    paired = _non_negative_sae(torch.cat([signed, -signed, one_signed]))
    g = torch.Generator().manual_seed(1)
    coef = (torch.rand(20_000, 12, generator=g) < 0.05) * (
        0.5 + torch.rand(20_000, 12, generator=g)
    )
    coef[:, :6] *= torch.where(torch.rand(20_000, 6, generator=g) < 0.5, -1.0, 1.0)
    x = coef @ u
    found = pairs.correspondence(signed, paired, [x])
    assert found.share == 1.0
    assert torch.equal(found.a, torch.arange(6)) and torch.equal(found.b, torch.arange(6, 12))
    assert (found.cofire < 0.05).all()
    # controls: one-signed directions have no antipode, random directions match nothing
    assert pairs.correspondence(one_signed, paired, [x]).share == 0.0
    assert pairs.correspondence(pairs.random_directions(6, d, seed=9), paired, [x]).share == 0.0
    # null: a non-negative SAE without antipodes gives the signed directions no pair either
    plain = _non_negative_sae(torch.cat([signed, one_signed]))
    assert pairs.correspondence(signed, plain, [x]).share == 0.0


def test_correspondence_cofiring_vetoes_pairs_that_fire_together() -> None:
    d = 16
    u = _unit_rows(2, d, seed=2)
    sae = _non_negative_sae(torch.cat([u, -u]))
    x = torch.cat([0.6 * u[:1], -0.6 * u[:1]]).repeat(50, 1)  # +u0 and -u0 take turns
    geometric = pairs.correspondence(u[:1], sae)
    assert geometric.share == 1.0 and geometric.cofire.isnan().all()
    alternating = pairs.correspondence(u[:1], sae, [x])
    assert alternating.cofire[0] == 0.0 and alternating.share == 1.0
    with torch.no_grad():
        sae.b_enc[2] = 1.0  # the -u0 latent now fires on every token, with +u0 too
    together = pairs.correspondence(u[:1], sae, [x])
    assert together.cofire[0] == 1.0 and together.share == 0.0
    with pytest.raises(SignSAEError, match="directions must be"):
        pairs.correspondence(u[:, :5], sae)


# ---- steering: fixed targets against norm-matched random directions --------------------------
def test_context_targets_come_from_the_tokens_after_each_side() -> None:
    sae = identity_sagsae(2, 0.05)
    acts = torch.zeros(2, 5, 2)
    acts[0, 1, 0], acts[1, 3, 0], acts[0, 2, 0] = 1.0, 2.0, -1.5  # latent 0: +, +, -
    tokens = torch.tensor([[9, 9, 11, 12, 9], [9, 9, 9, 9, 11]])
    c = polarity.census_from_activations(sae, [acts], top_examples=3)
    assert steering.context_targets(c, tokens, 0) == ([11], [12])
    with pytest.raises(SignSAEError, match="no context targets"):
        steering.context_targets(c, tokens, 1)


def test_ratio_interval_brackets_the_ratio_of_means() -> None:
    value, lo, hi = steering.ratio_interval([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0])
    assert value == 1.25 and lo < 1.25 < hi and lo >= 0.5 and hi <= 2.0
    assert steering.ratio_interval([2.0, 2.0], [4.0, 4.0], power=0.5) == (1.0, 1.0, 1.0)


def test_a_planted_dial_beats_random_directions_and_a_random_one_does_not(
    model, eval_tokens
) -> None:
    """On the real model's last residual stream, the direction that raises token t1's logit
    over t2's moves those fixed targets per unit of distribution change far more than
    norm-matched random directions; a random "latent" scored on the same targets does not."""
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    t1, t2 = (model.to_single_token(s) for s in (" king", " queen"))
    planted = (model.ln_final.w * (model.W_U[:, t1] - model.W_U[:, t2])).detach()
    rows = torch.stack([planted / planted.norm(), _unit_rows(1, model.cfg.d_model, 5)[0]])
    sae = StandardSAE(
        StandardSAEConfig(d_in=model.cfg.d_model, d_sae=2, metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_dec.copy_(rows)
    prompts = eval_tokens[:4, :16]
    _, cache = model.run_with_cache(prompts, names_filter=[hook])
    scale = cache[hook][:, 1:].norm(dim=-1).mean().item() / 4
    spec = steering.DialSpec([-1.0, 1.0], prompts, scale=scale, targets=([t1], [t2]))
    controls = steering.random_dials(model, sae, spec, n=3)
    ceiling = max(abs(d.at(a).specificity()[0]) for d in controls for a in (-1.0, 1.0))
    for latent, beats in ((0, True), (1, False)):
        dial = steering.dial(model, sae, latent, spec)
        for a in (-1.0, 1.0):
            value, lo, hi = dial.at(a).specificity()
            assert lo <= value <= hi
            if beats:
                assert lo > 3 * ceiling, (a, value, ceiling)
            else:
                assert abs(value) < 3 * ceiling, (a, value, ceiling)
    assert len(dial.at(1.0).effect_prompts) == 4 and len(dial.at(1.0).kl_prompts) == 4
