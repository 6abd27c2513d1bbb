"""SA-GSAE as an SAELens architecture: equivalences, folds, save/load, resets, bad input."""

import json

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.gated_sae import GatedSAE, GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

import sign_sae
from sign_sae import SAGSAE, SAGSAEConfig, SAGSAETrainingSAE, SAGSAETrainingSAEConfig

D_IN, D_SAE = 16, 48
VARIANTS = [
    dict(tied=True, two_sided=True),
    dict(tied=False, two_sided=True),
    dict(tied=True, two_sided=False),
    dict(tied=True, two_sided=True, sparsity="l0_ste"),
    dict(tied=True, two_sided=True, aux_decoder="frozen"),
    dict(tied=True, two_sided=True, threshold_param="log"),
    dict(tied=False, two_sided=True, threshold_param="abs", decoder_norm="unit"),
]


def make_sae(seed: int = 0, **kwargs) -> SAGSAETrainingSAE:
    """A training SAE with random (not initial) parameters so every path is exercised."""
    torch.manual_seed(seed)
    sae = SAGSAETrainingSAE(SAGSAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kwargs))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            if name.startswith("threshold"):
                p.copy_(sae._stored(p.abs()))  # thresholds of about 0.3, however stored
            if name == "W_dec":
                p.mul_(1 + torch.rand(D_SAE, 1))  # non-unit norms for the fold tests
    return sae


def step_input(x: torch.Tensor, coef: float = 0.7) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"sparsity": coef, "l1": coef},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(5))


def test_registered_and_registration_is_idempotent():
    sign_sae.register()
    sign_sae.register()
    from sae_lens.registry import get_sae_class, get_sae_training_class

    assert get_sae_class("sa_gsae") == (SAGSAE, SAGSAEConfig)
    assert get_sae_training_class("sa_gsae")[0] is SAGSAETrainingSAE


@pytest.mark.parametrize("variant", VARIANTS)
def test_features_are_signed_and_sparse(variant, x):
    f = make_sae(**variant).encode(x)
    assert (f == 0).any()
    assert (f > 0).any()
    assert (f < 0).any() == variant.get("two_sided", True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_export_equals_training_forward(variant, x, tmp_path):
    sae = make_sae(**variant)
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    assert type(inf) is SAGSAE
    torch.testing.assert_close(inf.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf(x), sae.decode(sae.encode(x)), atol=1e-5, rtol=1e-5)
    # inactive latents are exactly zero in both
    assert torch.equal(inf.encode(x) == 0, sae.encode(x) == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_checkpoint_roundtrip(variant, x, tmp_path):
    sae = make_sae(**variant)
    sae.tokens_since_fired.fill_(7)
    sae.save_model(tmp_path)
    back = TrainingSAE.load_from_disk(tmp_path)
    assert type(back) is SAGSAETrainingSAE and back.cfg == sae.cfg
    assert back.tokens_since_fired.tolist() == [7] * D_SAE
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    a = sae.training_forward_pass(step_input(x)).losses
    b = back.training_forward_pass(step_input(x)).losses
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("variant", VARIANTS)
def test_fold_decoder_norm_keeps_outputs(variant, x, tmp_path):
    sae = make_sae(**variant)
    before_f, before_out = sae.encode(x), sae.decode(sae.encode(x))
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.decode(sae.encode(x)), before_out, atol=1e-5, rtol=1e-5)
    # latents rescale by the old norms but keep their support and sign
    assert torch.equal(sae.encode(x) == 0, before_f == 0)
    # the inference class folds the same way
    sae2 = make_sae(**variant)
    sae2.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    inf.fold_W_dec_norm()
    torch.testing.assert_close(inf(x), before_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fold_activation_scaling_keeps_outputs(variant, x):
    sae = make_sae(**variant)
    s = 3.7
    expected = sae.decode(sae.encode(x * s)) / s
    sae.fold_activation_norm_scaling_factor(s)
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_fold_whitening_keeps_outputs(variant, apply_b_dec, x, tmp_path):
    sae = make_sae(apply_b_dec_to_input=apply_b_dec, **variant)
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(D_IN, generator=g)
    M = torch.eye(D_IN) + 0.1 * torch.randn(D_IN, D_IN, generator=g)
    M_inv = torch.linalg.inv(M)
    expected = sae.decode(sae.encode((x - mean) @ M)) @ M_inv + mean
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    sae.fold_activation_whitening(mean, M, M_inv)
    inf.fold_activation_whitening(mean, M, M_inv)
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inf(x), expected, atol=1e-4, rtol=1e-4)


def test_one_sided_untied_equals_saelens_gated(x):
    """The one-sided ablation with theta+ = 0 is SAELens's Gated SAE on the same weights."""
    torch.manual_seed(1)
    gated = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for p in (gated.b_gate, gated.b_mag, gated.r_mag, gated.b_dec):
            p.copy_(0.3 * torch.randn_like(p))
    ours = SAGSAETrainingSAE(
        SAGSAETrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, two_sided=False, tied=False, threshold_init=0.0
        )
    )
    ours.load_state_dict(
        {
            **gated.state_dict(),
            **{"threshold_pos": torch.zeros(D_SAE), "tokens_since_fired": ours.tokens_since_fired},
        }
    )
    torch.testing.assert_close(ours.encode(x), gated.encode(x), atol=1e-5, rtol=1e-5)
    a = gated.training_forward_pass(step_input(x)).losses
    b = ours.training_forward_pass(step_input(x)).losses
    torch.testing.assert_close(b["mse_loss"], a["mse_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["sparsity_loss"], a["l1_loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        b["auxiliary_reconstruction_loss"], a["auxiliary_reconstruction_loss"], atol=1e-5, rtol=1e-5
    )
    # same gradients too
    gated.training_forward_pass(step_input(x)).loss.backward()
    ours.training_forward_pass(step_input(x)).loss.backward()
    for name in ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"):
        torch.testing.assert_close(
            getattr(ours, name).grad, getattr(gated, name).grad, atol=1e-5, rtol=1e-4
        )
    # and the exported inference SAE equals SAELens's inference GatedSAE
    inf_gated = GatedSAE(gated.cfg.get_inference_config_class()(d_in=D_IN, d_sae=D_SAE))
    inf_gated.load_state_dict({k: v for k, v in gated.state_dict().items()}, strict=True)
    torch.testing.assert_close(inf_gated.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)


def test_shared_product_forward_equals_saelens_style_aux_path(x):
    """training_forward_pass (one encoder product) gives the losses calculate_aux_loss gives."""
    sae = make_sae()
    out = sae.training_forward_pass(step_input(x))
    again = sae.calculate_aux_loss(step_input(x), out.feature_acts, out.hidden_pre, out.sae_out)
    for k, v in again.items():
        torch.testing.assert_close(out.losses[k], v)


def test_aux_coefficient_zero_drops_the_aux_term(x):
    sae = make_sae(aux_coefficient=0.0)
    assert "auxiliary_reconstruction_loss" not in sae.training_forward_pass(step_input(x)).losses


def test_frozen_decoder_gets_no_gradient_from_gate_losses(x):
    sae = make_sae(aux_decoder="frozen")
    pi = sae.process_sae_in(x) @ sae.W_enc + sae.b_gate
    sum(sae._gate_losses(pi, x, 1.0).values()).backward()
    assert sae.W_dec.grad is None  # b_dec still learns through the input centering x - b_dec
    live = make_sae(aux_decoder="live")
    pi = live.process_sae_in(x) @ live.W_enc + live.b_gate
    sum(live._gate_losses(pi, x, 1.0).values()).backward()
    assert live.W_dec.grad.abs().sum() > 0


def test_dead_latents_get_thresholds_reset(x):
    sae = make_sae(dead_reset_tokens=1000, threshold_init=1e-3)
    with torch.no_grad():
        sae.threshold_pos[:5] = 50.0  # these latents can never fire
        sae.threshold_neg[:5] = 50.0
        sae.threshold_pos[5] = -1.0  # out of range: must be clamped
    sae.tokens_since_fired[:5] = 1000
    out = sae.training_forward_pass(step_input(x))
    assert out.metrics["threshold_resets"] == 5
    assert sae.threshold_pos[:5].tolist() == pytest.approx([1e-3] * 5)
    assert sae.threshold_pos[5].item() == 0.0
    # the dead clock counts tokens and restarts for latents that fired
    fired = (out.feature_acts != 0).any(0)
    assert (sae.tokens_since_fired[fired] == 0).all()
    assert (sae.tokens_since_fired[~fired] >= x.shape[0]).all()


def test_l0_ste_trains_thresholds_through_the_gates(x):
    sae = make_sae(sparsity="l0_ste", bandwidth=0.5)
    sae.training_forward_pass(step_input(x)).loss.backward()
    assert sae.threshold_pos.grad.abs().sum() > 0 and sae.threshold_neg.grad.abs().sum() > 0


@pytest.mark.parametrize("param", ["abs", "log"])
def test_threshold_parametrisations_are_the_same_function(param, x):
    raw = make_sae()
    other = make_sae(threshold_param=param)
    with torch.no_grad():
        for name, p in raw.named_parameters():
            if name.startswith("threshold"):  # theta = |t| with t < 0, or exp(t)
                p = -p if param == "abs" else p.log()
            other.get_parameter(name).copy_(p)
    torch.testing.assert_close(other.encode(x), raw.encode(x))
    a = raw.training_forward_pass(step_input(x))
    b = other.training_forward_pass(step_input(x))
    torch.testing.assert_close(b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    # the chain rule through theta = |t| or exp(t)
    factor = -1.0 if param == "abs" else raw.threshold_pos.detach()
    torch.testing.assert_close(other.threshold_pos.grad, raw.threshold_pos.grad * factor)


def test_calibrated_threshold_init_sets_the_starting_l0(x):
    torch.manual_seed(0)
    sae = SAGSAETrainingSAE(
        SAGSAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, threshold_init_l0=6, threshold_param="log")
    )
    assert (sae.encode(x) != 0).sum(-1).float().mean() > 0.9 * D_SAE  # small init: all fire
    sae.initialize_from_activations(x)
    fired = sae.encode(x) != 0
    # each latent fires on round(256 * 6 / 48) = 32 of the 256 rows, with either sign
    assert fired.sum(0).tolist() == [32] * D_SAE
    assert (sae.encode(x) < 0).any() and (sae.encode(x) > 0).any()
    assert fired.sum(-1).float().mean().item() == pytest.approx(6.0)
    # resets go back to the small threshold_init, not to the calibrated values
    sae.tokens_since_fired[:3] = sae.cfg.dead_reset_tokens
    sae.training_forward_pass(step_input(x))
    assert sae.thresholds()[0][:3].tolist() == pytest.approx([sae.cfg.threshold_init] * 3)


def test_unit_decoder_keeps_rows_at_unit_norm_and_drops_norm_weights(x):
    sae = make_sae(decoder_norm="unit")
    sae.training_forward_pass(step_input(x)).loss.backward()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    pi = sae.process_sae_in(x) @ sae.W_enc + sae.b_gate
    u = torch.relu(pi - sae.threshold_pos) + torch.relu(-pi - sae.threshold_neg)
    sparsity = sae._gate_losses(pi, x, 1.0)["sparsity_loss"]
    torch.testing.assert_close(sparsity, u.sum(-1).mean())


# ---- bad input --------------------------------------------------------------------------
def test_wrong_width_is_a_clear_error():
    sae = make_sae()
    with pytest.raises(ValueError, match="d_in=16"):
        sae.encode(torch.randn(4, D_IN + 1))


def test_nonfinite_activations_are_a_clear_error():
    x = torch.randn(4, D_IN)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        make_sae().encode(x)


def test_unknown_config_field_is_a_clear_error(tmp_path):
    make_sae().save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    with pytest.raises(ValueError, match="Unknown config field"):
        SAGSAEConfig.from_dict({**cfg, "thershold": 1.0})
    with pytest.raises(TypeError, match="'d_sae' should be int"):
        SAGSAEConfig.from_dict({**cfg, "d_sae": "48"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_sae=0), "d_sae must be a positive integer"),
        (dict(sparsity="l2"), "sparsity must be one of"),
        (dict(aux_decoder="half"), "aux_decoder must be one of"),
        (dict(threshold_init=-1.0), "threshold_init must be >= 0"),
        (dict(threshold_param="exp"), "threshold_param must be one of"),
        (dict(threshold_lr_scale=0.0), "threshold_lr_scale must be > 0"),
        (dict(decoder_norm="free"), "decoder_norm must be one of"),
        (dict(threshold_param="log", threshold_init=0.0), "needs threshold_init > 0"),
        (dict(threshold_init_l0=0), "threshold_init_l0 must be in"),
        (dict(threshold_init_l0=D_SAE + 1), "threshold_init_l0 must be in"),
    ],
)
def test_bad_training_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAGSAETrainingSAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, **kwargs})
