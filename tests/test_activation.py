"""Gradients of Bi-Jump-ReLU and the step: exact in the input, straight-through in thresholds."""

import pytest
import torch

from sign_sae.activation import bi_jump_relu, step


@pytest.fixture(autouse=True)
def float64():
    """Gradient checks need float64; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_forward_values_and_signs():
    z = torch.tensor([-2.0, -0.5, -0.05, 0.0, 0.05, 0.5, 2.0])
    t_pos, t_neg = torch.tensor(0.1), torch.tensor(1.0)
    out = bi_jump_relu(z, t_pos, t_neg)
    assert out.tolist() == [-2.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0]


def test_gradcheck_in_z_away_from_jumps():
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
def test_straight_through_positive_threshold_matches_expected_derivative(t):
    zero = torch.tensor(0.5)
    fd, ste = _expected_and_ste(
        lambda z, tp, e: bi_jump_relu(z, tp, zero, e), torch.tensor(t), 0.05
    )
    assert ste == pytest.approx(-t / 4, rel=0.02)  # density of U(-2, 2) is 1/4
    assert ste == pytest.approx(fd, rel=0.02)


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_straight_through_negative_threshold_matches_expected_derivative(t):
    zero = torch.tensor(0.5)
    fd, ste = _expected_and_ste(
        lambda z, tn, e: bi_jump_relu(z, zero, tn, e), torch.tensor(t), 0.05
    )
    assert ste == pytest.approx(t / 4, rel=0.02)
    assert ste == pytest.approx(fd, rel=0.02)


def test_step_straight_through_matches_expected_derivative():
    fd, ste = _expected_and_ste(lambda z, th, e: step(z, th, e), torch.tensor(0.7), 0.05)
    assert ste == pytest.approx(-0.25, rel=0.02)
    assert ste == pytest.approx(fd, rel=0.02)


def test_threshold_gradient_is_summed_per_latent():
    z = torch.randn(32, 4)
    t = torch.full((4,), 0.2, requires_grad=True)
    bi_jump_relu(z, t, torch.full((4,), 0.2), 1.0).sum().backward()
    assert t.grad.shape == (4,)
    assert (t.grad <= 0).all() and (t.grad != 0).any()
