"""SA-GSAE (``sign_sae.sa_gsae``): Bi-Jump-ReLU gradients, equivalences, folds, save/load,
constraints and resets, bad input."""

import json

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.gated_sae import GatedSAE, GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

import sign_sae
from sign_sae import SAGSAE, SAGSAEConfig, SAGSAETrainingSAE, SAGSAETrainingSAEConfig, bi_jump_relu
from sign_sae.errors import SignSAEError
from sign_sae.sa_gsae import THRESHOLDS

D_IN, D_SAE = 16, 48
VARIANTS = [
    dict(tied=True, two_sided=True),
    dict(tied=False, two_sided=True),
    dict(tied=True, two_sided=False),
    dict(tied=False, two_sided=True, aux_coefficient=0.0),
]


def make_sae(seed: int = 0, **kwargs) -> SAGSAETrainingSAE:
    """A training SAE with random (not initial) parameters so every path is exercised."""
    torch.manual_seed(seed)
    sae = SAGSAETrainingSAE(SAGSAETrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kwargs))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            if name.startswith("raw_threshold"):
                p.abs_().div_(sae.cfg.threshold_lr_scale)  # thresholds of about 0.3
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
    sae.save_model(tmp_path)
    back = TrainingSAE.load_from_disk(tmp_path)
    assert type(back) is SAGSAETrainingSAE and back.cfg == sae.cfg
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
            "threshold_pos": torch.zeros(D_SAE),
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


def test_a_training_step_clamps_thresholds_and_constrain_resets_dead_latents(x):
    sae = make_sae(dead_reset_tokens=1000, threshold_init=1e-3)
    with torch.no_grad():
        sae.raw_threshold_pos[:5] = 50.0  # these latents can never fire
        sae.raw_threshold_neg[:5] = 50.0
        sae.raw_threshold_pos[5] = -1.0  # out of range (an optimiser step went below 0)
        sae.raw_threshold_neg[6] = -2.0
    clock = torch.zeros(D_SAE, dtype=torch.long)
    clock[:5] = 1000
    clock[7] = 999  # one token short of the window: kept
    reset = sae.constrain(clock)
    assert reset.tolist() == [True] * 5 + [False] * (D_SAE - 5)
    assert sae.threshold_pos[:5].tolist() == pytest.approx([1e-3] * 5)
    assert sae.threshold_neg[:5].tolist() == pytest.approx([1e-3] * 5)
    assert sae.threshold_pos[5].item() == 0.0 and sae.threshold_neg[6].item() == 0.0
    assert sae.raw_threshold_pos[5].item() == -1.0  # constrain resets only; the step projects
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.training_forward_pass(step_input(x))
    assert sae.raw_threshold_pos[5].item() == 0.0 and sae.raw_threshold_neg[6].item() == 0.0
    before["raw_threshold_pos"][5], before["raw_threshold_neg"][6] = 0.0, 0.0
    for k, v in sae.state_dict().items():  # and the step changes nothing else
        assert torch.equal(v, before[k]), k


def test_resets_off_with_a_zero_window():
    sae = make_sae(dead_reset_tokens=0)
    reset = sae.constrain(torch.full((D_SAE,), 10**9, dtype=torch.long))
    assert not reset.any()


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_thresholds_learn_at_their_own_rate_under_plain_adam(x, scale):
    """threshold_lr_scale lives in the parametrisation: a plain Adam over sae.parameters()
    (what SAELens's trainer builds) moves every threshold ``scale`` times as far as the base
    rate in its first step (Adam's first step is lr x sign(gradient)), b_gate 1 times; and the
    raw parameter's gradient is the threshold's own, so clipping sees what it saw before."""
    sae = make_sae(threshold_lr_scale=scale)
    values = lambda: {n: getattr(sae, n).detach().clone() for n in THRESHOLDS + ("b_gate",)}  # noqa: E731
    before = values()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_forward_pass(step_input(3 * x)).loss.backward()
    threshold = sae.threshold_pos.detach().requires_grad_()
    with torch.no_grad():
        plain = make_sae(threshold_lr_scale=1.0)
        plain.raw_threshold_pos.copy_(threshold)
    plain.training_forward_pass(step_input(3 * x)).loss.backward()
    torch.testing.assert_close(sae.raw_threshold_pos.grad, plain.raw_threshold_pos.grad)
    opt.step()
    for name, rate in ((THRESHOLDS[0], scale), (THRESHOLDS[1], scale), ("b_gate", 1.0)):
        moved = (values()[name] - before[name]).abs()
        assert (moved != 0).sum() > D_SAE // 4, name
        step = moved[moved != 0]
        torch.testing.assert_close(step, torch.full_like(step, rate * 1e-3), rtol=1e-3, atol=0)


def test_the_state_dict_holds_raw_thresholds_and_their_scale(tmp_path):
    """Exact round trips (resume depends on it), and a state saved at one scale loads into an
    SAE learning at another with the same thresholds."""
    sae = make_sae(threshold_lr_scale=4.0)
    state = sae.state_dict()
    assert state["threshold_lr_scale"].item() == 4.0
    assert torch.equal(state["raw_threshold_neg"], sae.raw_threshold_neg.detach())
    sae.save_model(tmp_path)
    back = SAGSAETrainingSAE.load_from_disk(tmp_path)
    assert torch.equal(back.raw_threshold_pos, sae.raw_threshold_pos)
    other = make_sae(threshold_lr_scale=2.0, seed=1)  # another parametrisation, same function
    other.load_state_dict(state)
    torch.testing.assert_close(other.threshold_pos, sae.threshold_pos)


# ---- Bi-Jump-ReLU -----------------------------------------------------------------------
@pytest.fixture
def float64():
    """Gradient checks need float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_forward_values_and_signs(float64):
    z = torch.tensor([-2.0, -0.5, -0.05, 0.0, 0.05, 0.5, 2.0])
    t_pos, t_neg = torch.tensor(0.1), torch.tensor(1.0)
    out = bi_jump_relu(z, t_pos, t_neg)
    assert out.tolist() == [-2.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0]


def test_gradcheck_in_z_away_from_jumps(float64):
    g = torch.Generator().manual_seed(0)
    t_pos = torch.rand(8, generator=g) * 0.5
    t_neg = torch.rand(8, generator=g) * 0.5
    z = torch.randn(16, 8, generator=g)
    # keep every point away from the discontinuities so finite differences are exact
    near = ((z - t_pos).abs() < 1e-3) | ((-z - t_neg).abs() < 1e-3)
    z = torch.where(near, z + 0.01, z).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: bi_jump_relu(z, t_pos, t_neg), (z,))


def _expected_and_ste(fn, t: torch.Tensor, eps: float, h: float = 1e-3):
    """Finite-difference derivative of E_z[fn] (z uniform on [-2, 2]) vs the mean STE gradient."""
    z = torch.linspace(-2.0, 2.0, 400_001)
    t = t.clone().requires_grad_(True)
    fn(z, t, eps).mean().backward()
    with torch.no_grad():
        fd = (fn(z, t + h, eps).mean() - fn(z, t - h, eps).mean()) / (2 * h)
    return fd.item(), t.grad.item()


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_straight_through_positive_threshold_matches_expected_derivative(t, float64):
    zero = torch.tensor(0.5)
    fd, ste = _expected_and_ste(
        lambda z, tp, e: bi_jump_relu(z, tp, zero, e), torch.tensor(t), 0.05
    )
    assert ste == pytest.approx(-t / 4, rel=0.02)  # density of U(-2, 2) is 1/4
    assert ste == pytest.approx(fd, rel=0.02)


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_straight_through_negative_threshold_matches_expected_derivative(t, float64):
    zero = torch.tensor(0.5)
    fd, ste = _expected_and_ste(
        lambda z, tn, e: bi_jump_relu(z, zero, tn, e), torch.tensor(t), 0.05
    )
    assert ste == pytest.approx(t / 4, rel=0.02)
    assert ste == pytest.approx(fd, rel=0.02)


def test_threshold_gradient_is_summed_per_latent(float64):
    z = torch.randn(32, 4)
    t = torch.full((4,), 0.2, requires_grad=True)
    bi_jump_relu(z, t, torch.full((4,), 0.2), 1.0).sum().backward()
    assert t.grad.shape == (4,)
    assert (t.grad <= 0).all() and (t.grad != 0).any()


def _pre_activation(sae: SAGSAE, x: torch.Tensor) -> torch.Tensor:
    """z as the SAE's own encode computes it (read at its hook point)."""
    with torch.inference_mode():
        return sae.run_with_cache(x, names_filter="hook_sae_acts_pre")[1]["hook_sae_acts_pre"]


def _boolean_mask_encode(sae: SAGSAE, x: torch.Tensor) -> torch.Tensor:
    """The inference encode written with boolean masks: the reference for the mask-free form."""
    z = _pre_activation(sae, x)
    if not sae.cfg.two_sided:
        return z * (z > sae.threshold_pos).to(z)
    if sae.cfg.tied:
        return z * ((z > sae.threshold_pos) | (-z > sae.threshold_neg)).to(z)
    z_neg = sae.scale_neg * (z - sae.b_enc) + sae.b_enc_neg
    return z * (z > sae.threshold_pos).to(z) + z_neg * (-z_neg > sae.threshold_neg).to(z)


@pytest.mark.parametrize("variant", VARIANTS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_free_encode_equals_boolean_masks_bit_for_bit(variant, dtype, tmp_path):
    """The mask-free gate |sign(clamp(z, -t-, t+) - z)| opens exactly where the boolean masks
    do, ties (z equal to a threshold) and the sign of zero included."""
    make_sae(**variant).save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path).to(dtype)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    z = _pre_activation(sae, x)
    with torch.no_grad():  # put some pre-activations exactly on a threshold
        sae.threshold_pos[:8] = z[0, :8].abs()
        if sae.cfg.two_sided:
            sae.threshold_neg[8:16] = z[1, 8:16].abs()
    with torch.inference_mode():
        got, want = sae.encode(x), _boolean_mask_encode(sae, x)
    assert got.dtype == want.dtype == dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))
    assert (got != 0).any() and (got == 0).any()


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
    with pytest.raises(SignSAEError, match="'d_sae' should be int"):
        SAGSAEConfig.from_dict({**cfg, "d_sae": "48"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_sae=0), "d_sae must be a positive integer"),
        (dict(threshold_init=-1.0), "threshold_init must be >= 0"),
        (dict(aux_coefficient=-1.0), "aux_coefficient must be >= 0"),
        (dict(threshold_lr_scale=0.0), "threshold_lr_scale must be > 0"),
    ],
)
def test_bad_training_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAGSAETrainingSAEConfig(**{"d_in": D_IN, "d_sae": D_SAE, **kwargs})


@pytest.mark.parametrize("variant", VARIANTS)
def test_either_saved_form_loads_with_either_class(variant, x, tmp_path):
    sae = make_sae(**variant)
    out = sae.decode(sae.encode(x))
    sae.save_model(tmp_path / "training")
    sae.save_inference_model(tmp_path / "inference")
    inf = SAE.load_from_disk(tmp_path / "training")
    back = TrainingSAE.load_from_disk(tmp_path / "inference")
    assert type(inf) is SAGSAE and type(back) is SAGSAETrainingSAE
    assert back.cfg.tied == sae.cfg.tied and back.cfg.two_sided == sae.cfg.two_sided
    for other in (inf, back):
        torch.testing.assert_close(other.decode(other.encode(x)), out, atol=1e-5, rtol=1e-5)
        assert torch.equal(other.encode(x) == 0, sae.encode(x) == 0)
    # the converted training form keeps the method's constraint: thresholds >= 0
    assert (back.threshold_pos >= 0).all()
    if sae.cfg.two_sided:
        assert (back.threshold_neg >= 0).all()


def test_an_inference_sae_whose_gates_overlap_is_refused(tmp_path):
    cfg = SAGSAEConfig(d_in=D_IN, d_sae=D_SAE, tied=False)
    sae = SAGSAE(cfg)
    with torch.no_grad():
        sae.scale_neg.fill_(1.0)
        sae.b_enc_neg.fill_(-5.0)  # z_neg < 0 up to p = 5: the two sides overlap on (0, 5)
    sae.save_model(tmp_path)
    with pytest.raises(SignSAEError, match="open both gates"):
        TrainingSAE.load_from_disk(tmp_path)


@pytest.mark.parametrize("save", ["save_model", "save_inference_model"])
def test_saving_into_a_folder_leaves_files_it_does_not_write(save, x, tmp_path):
    """SAELens's trainer saves into its checkpoint folder, which holds other files already."""
    (tmp_path / "final_1").mkdir()
    (tmp_path / "final_1" / "keep.txt").write_text("kept")
    (tmp_path / "sparsity.safetensors").write_bytes(b"not ours")
    sae = make_sae()
    getattr(sae, save)(tmp_path)
    getattr(sae, save)(tmp_path)  # and again over the first save
    assert (tmp_path / "final_1" / "keep.txt").read_text() == "kept"
    assert (tmp_path / "sparsity.safetensors").read_bytes() == b"not ours"
    loaded = (SAE if save == "save_inference_model" else TrainingSAE).load_from_disk(tmp_path)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
