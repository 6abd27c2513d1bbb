"""Bi-Jump-ReLU and the Heaviside step, with rectangle-kernel straight-through gradients.

The forward passes are exact step functions. Their derivatives with respect to the
thresholds are zero almost everywhere, so, as in JumpReLU SAEs (arXiv 2407.14435), the
backward passes use a pseudo-derivative built from the rectangle kernel
K(u) = 1[|u| < 1/2] with bandwidth eps. For a smooth input density these pseudo-derivatives
are unbiased (as eps -> 0) estimates of the derivative of the *expected* output, which is what
the tests check.
"""

from typing import Any

import torch


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reduce a broadcast gradient to the shape of a per-latent parameter."""
    return grad.sum_to_size(like.shape)


class Step(torch.autograd.Function):
    """H(x - threshold); gradient flows to the threshold only (not to x)."""

    @staticmethod
    def forward(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (x > threshold).to(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, threshold, bandwidth = inputs
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        x, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((x - threshold) / eps) * grad_out
        return None, _sum_to(grad_threshold, threshold), None


class BiJumpReLU(torch.autograd.Function):
    """z * [H(z - t_pos) + H(-z - t_neg)] with t_pos, t_neg >= 0.

    One latent passes its signed pre-activation when it clears the positive threshold
    upwards or the negative threshold downwards, and is exactly zero in between.
    """

    @staticmethod
    def forward(
        z: torch.Tensor, t_pos: torch.Tensor, t_neg: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        return z * ((z > t_pos) | (-z > t_neg)).to(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        z, t_pos, t_neg, bandwidth = inputs
        ctx.save_for_backward(z, t_pos, t_neg)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        z, t_pos, t_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = ((z > t_pos) | (-z > t_neg)).to(z) * grad_out
        # Raising t_pos removes mass at z = t_pos (value t_pos): d/dt_pos E[f] = -t_pos p(t_pos).
        grad_pos = -(t_pos / eps) * rectangle((z - t_pos) / eps) * grad_out
        # Raising t_neg removes mass at z = -t_neg (value -t_neg): d/dt_neg E[f] = t_neg p(-t_neg).
        grad_neg = (t_neg / eps) * rectangle((-z - t_neg) / eps) * grad_out
        return grad_z, _sum_to(grad_pos, t_pos), _sum_to(grad_neg, t_neg), None


def step(x: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
    """Heaviside step H(x - threshold) with a straight-through gradient to the threshold."""
    return Step.apply(x, threshold, bandwidth)


def bi_jump_relu(
    z: torch.Tensor, t_pos: torch.Tensor, t_neg: torch.Tensor, bandwidth: float = 1e-3
) -> torch.Tensor:
    """Bi-Jump-ReLU: keep z where z > t_pos or z < -t_neg, else 0 (thresholds >= 0).

    Gradients: exact in z; rectangle-kernel straight-through estimates in t_pos and t_neg.
    """
    return BiJumpReLU.apply(z, t_pos, t_neg, bandwidth)
