"""One SA-GSAE training step as a single autograd Function over one shared encoder product.

Built from PyTorch ops (the reference in ``sa_gsae.py``), autograd keeps about a dozen
F-wide temporaries per step and its backward forms ``dp @ W_enc.T`` (B x d) only to sum it
over the batch for b_dec. ``SAGSAEStep`` returns the same losses and gradients with

- 8 matmuls of 2 B d F FLOPs, 16 d F per token: p = x' W_enc, x_hat, the aux reconstruction,
  grad f, grad u, grad W_dec (f and u parts) and grad W_enc; b_dec's share through x' is
  (sum_b dp) W_enc^T, a vector-matrix product;
- F-wide tensors: p (saved), f and m+ (returned, f saved), u (forward only); every mask, u
  and every gradient term is recomputed from p in the backward;
- the element-wise work in two kernels (``forward_kernel``, ``backward_kernel``) of in-place,
  mask-free arithmetic (boolean masks are several times slower on CPU), fused into one loop
  each by ``torch.compile`` with ``compile``;
- under ``torch.autocast`` the matmuls run in the autocast dtype (p and u are kept in it) while
  weights, the element-wise work and every gradient stay fp32; TF32 follows
  ``torch.set_float32_matmul_precision``.

Only the variant is static (``StepSpec``); the coefficients enter as tensors in the backward,
so a sparsity warm-up never recompiles.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepSpec:
    """Everything that changes the code path of a step."""

    two_sided: bool
    tied: bool
    aux: bool  # aux_coefficient > 0
    centre: bool  # apply_b_dec_to_input
    compile: bool = False
    # one shard of a latent-sharded SAE: completes a sum over latents in place over the
    # shards (sign_sae.sharding); None unsharded
    total: Callable[[torch.Tensor], torch.Tensor] | None = None

    def over_latents(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over this shard's latents completed over every shard's."""
        return partial if self.total is None else self.total(partial)


@dataclass
class Latents:
    """The per-latent vectors the kernels read, detached; exp(r) computed once."""

    b_gate: torch.Tensor
    threshold_pos: torch.Tensor
    threshold_neg: torch.Tensor | None  # None when one-sided
    exp_r: torch.Tensor  # exp(r_mag)
    b_mag: torch.Tensor
    exp_r_neg: torch.Tensor | None = None  # exp(r_mag_neg), untied only
    b_mag_neg: torch.Tensor | None = None  # untied only

    @classmethod
    def of(cls, *params: torch.Tensor | None) -> "Latents":
        """From the SAE's b_gate, threshold_pos, threshold_neg, r_mag, b_mag, r_mag_neg and
        b_mag_neg (None where the variant has none)."""
        b_gate, t_pos, t_neg, r, b_mag, r_neg, b_mag_neg = (
            None if v is None else v.detach() for v in params
        )
        exp_r_neg = None if r_neg is None else r_neg.exp()
        return cls(b_gate, t_pos, t_neg, r.exp(), b_mag, exp_r_neg, b_mag_neg)

    @property
    def untied(self) -> bool:
        return self.exp_r_neg is not None

    def open_side(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, side) from p: u = pi - clamp(pi, -threshold_neg, threshold_pos), which is
        ReLU(pi - t+) - ReLU(-pi - t-) as the gates are exclusive; side = sign(u), the open
        gate's sign (0 where both are shut). Both are fresh F-wide buffers."""
        u = p + self.b_gate
        lower = None if self.threshold_neg is None else -self.threshold_neg
        side = torch.clamp(u, min=lower, max=self.threshold_pos)
        return u.sub_(side), side


@dataclass
class LatentGrads:
    """Column sums of the backward per latent parameter (``r`` before the exp(r) factor)."""

    b_mag: torch.Tensor
    r: torch.Tensor
    b_gate: torch.Tensor | None = None
    threshold_pos: torch.Tensor | None = None
    threshold_neg: torch.Tensor | None = None
    b_mag_neg: torch.Tensor | None = None
    r_neg: torch.Tensor | None = None


def colsum(x: torch.Tensor) -> torch.Tensor:
    """Sum over rows: a matrix-vector product in eager mode (much faster on CPU than
    ``sum(0)``), a plain reduction that ``torch.compile`` can fuse when compiling."""
    if torch.compiler.is_compiling():
        return x.sum(0)
    return torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device).mm(x)[0]


def forward_kernel(
    spec: StepSpec, p: torch.Tensor, lat: Latents, mm_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(f, m+, u in ``mm_dtype`` or None without the aux term, per-latent sum of |u|).

    Values follow the reference's operations exactly: pi = p + b_gate, m = p exp(r) + b_mag;
    a gate is open where u != 0, on the side sign(u).
    """
    p = p.to(lat.b_gate.dtype)
    u, side = lat.open_side(p)
    mass = colsum(torch.abs(u, out=side))
    torch.sign(u, out=side)
    m = torch.mul(p, lat.exp_r).add_(lat.b_mag)
    if lat.untied:
        f = torch.where(side > 0, m, p * lat.exp_r_neg + lat.b_mag_neg).mul_(side)
    else:
        f = m * side
    # f = side * ReLU(side * m): m where the open side has m's sign, else 0 (exact).
    f.clamp_(min=0).mul_(side)
    return f, m, (u.to(mm_dtype) if spec.aux else None), mass


def backward_kernel(
    p: torch.Tensor,
    f: torch.Tensor,
    grad_f: torch.Tensor,
    grad_u: torch.Tensor | None,
    grad_m: torch.Tensor | None,
    lat: Latents,
    penalty: torch.Tensor,
) -> tuple[LatentGrads, torch.Tensor | None]:
    """Overwrite ``grad_f`` with grad p (and use ``grad_u`` as scratch); return the per-latent
    column sums, and u when there is an aux gradient (for the decoder's share of it). ``penalty`` = c ||d_i||, the gated-L1 penalty's gradient per open gate, with c
    the sparsity coefficient times the sparsity loss's incoming gradient over B."""
    p = p.to(lat.b_gate.dtype)
    u, side = lat.open_side(p)
    torch.sign(u, out=side)
    # f != 0 exactly where a magnitude passes its open gate: grad m = grad f there.
    work = torch.sign(f).abs_()
    grad_f.mul_(work)
    grads_neg = {}
    if lat.untied:
        gm_neg = torch.where(side < 0, grad_f, 0.0)
        grad_f.sub_(gm_neg)
        grads_neg = {"b_mag_neg": colsum(gm_neg), "r_neg": colsum(gm_neg * p)}
    if grad_m is not None:
        grad_f.add_(grad_m)
    grads = LatentGrads(colsum(grad_f), colsum(torch.mul(grad_f, p, out=work)), **grads_neg)
    grad_f.mul_(lat.exp_r)
    if lat.untied:
        grad_f.add_(gm_neg.mul_(lat.exp_r_neg))
    # grad pi = side * (side * grad_u + penalty) on open gates.
    dpi = side * penalty if grad_u is None else grad_u.mul_(side).add_(penalty).mul_(side)
    total, signed = colsum(dpi), colsum(torch.mul(dpi, side, out=work))
    grads.b_gate = total
    # threshold_pos enters as -t+ on the positive side, threshold_neg as +t- on the negative.
    grads.threshold_pos = -(total + signed) / 2
    if lat.threshold_neg is not None:
        grads.threshold_neg = (total - signed) / 2
    grad_f.add_(dpi)
    return grads, (u if grad_u is not None else None)


_compiled: dict[str, Any] = {}


def _kernel(name: str, spec: StepSpec) -> Any:
    kernel = forward_kernel if name == "forward" else backward_kernel
    if not spec.compile:
        return kernel
    if name not in _compiled:
        _compiled[name] = torch.compile(kernel, dynamic=False)
    return _compiled[name]


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b with both operands in ``dtype``; the result in b's dtype, which is the weights'
    (master) dtype at every call."""
    return (a.to(dtype) @ b.to(dtype)).to(b.dtype)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SAGSAEStep(torch.autograd.Function):
    """Outputs (x_hat, f, m+, mse, sparsity, aux) of one step, all differentiable.

    Inputs: the spec, x [B, d] (no gradient), the sparsity and aux coefficients (floats),
    b_dec, W_enc, W_dec, the decoder norms, and the per-latent parameters b_gate,
    threshold_pos, threshold_neg, r_mag, b_mag, r_mag_neg, b_mag_neg (None where the variant
    has none).
    """

    @staticmethod
    def forward(
        ctx: Any,
        spec: StepSpec,
        x: torch.Tensor,
        sparsity_coefficient: float,
        aux_coefficient: float,
        b_dec: torch.Tensor,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        norms: torch.Tensor,
        *latent_params: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        mm_dtype = _matmul_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            lat = Latents.of(*latent_params)
            x_c = x - b_dec if spec.centre else x
            p = x_c.to(mm_dtype) @ W_enc.to(mm_dtype)
            f, m, u, mass = _kernel("forward", spec)(spec, p, lat, mm_dtype)
            sae_out = spec.over_latents(_mm(f, W_dec, mm_dtype)) + b_dec
            resid = sae_out - x
            mse = resid.pow(2).sum(-1).mean()
            rows = p.shape[0]
            sparsity = sparsity_coefficient * spec.over_latents(mass @ norms) / rows
            if u is not None:
                resid_aux = spec.over_latents(_mm(u, W_dec, mm_dtype)) + b_dec - x
                aux = aux_coefficient * resid_aux.pow(2).sum(-1).mean()
            else:
                resid_aux, aux = None, torch.zeros((), dtype=x.dtype, device=x.device)
        ctx.spec, ctx.mm_dtype = spec, mm_dtype
        ctx.coefficients = (sparsity_coefficient, aux_coefficient)
        ctx.save_for_backward(
            x_c, p, f, W_enc, W_dec, resid, resid_aux, mass, norms, *latent_params
        )
        ctx.set_materialize_grads(False)
        return sae_out, f, m, mse, sparsity, aux

    @staticmethod
    def backward(
        ctx: Any,
        d_out: torch.Tensor | None,
        d_f: torch.Tensor | None,
        d_m: torch.Tensor | None,
        d_mse: torch.Tensor | None,
        d_sparsity: torch.Tensor | None,
        d_aux: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        spec, mm_dtype = ctx.spec, ctx.mm_dtype
        sparsity_coefficient, aux_coefficient = ctx.coefficients
        x_c, p, f, W_enc, W_dec, resid, resid_aux, mass, norms, *latent_params = ctx.saved_tensors
        rows = p.shape[0]
        with torch.autocast(f.device.type, enabled=False):
            lat = Latents.of(*latent_params)
            c = torch.zeros((), dtype=f.dtype, device=f.device)
            if d_sparsity is not None:
                c = d_sparsity * (sparsity_coefficient / rows)
            g_out = resid * (2 * d_mse / rows) if d_mse is not None else torch.zeros_like(resid)
            if d_out is not None:
                g_out = g_out + d_out
            grad_f = _mm(g_out, W_dec.T, mm_dtype)  # becomes grad p
            if d_f is not None:
                grad_f += d_f
            g_aux = grad_u = None  # grad_u becomes u
            if resid_aux is not None and d_aux is not None:
                g_aux = resid_aux * (2 * aux_coefficient * d_aux / rows)
                grad_u = _mm(g_aux, W_dec.T, mm_dtype)
            grads, u = _kernel("backward", spec)(p, f, grad_f, grad_u, d_m, lat, c * norms)
            grad_W_enc = _mm(x_c.T, grad_f, mm_dtype)
            grad_W_dec = _mm(f.T, g_out, mm_dtype)
            grad_b_dec = g_out.sum(0)
            if u is not None:
                grad_W_dec += _mm(u.T, g_aux, mm_dtype)
                grad_b_dec += g_aux.sum(0)
            if spec.centre:
                # sum_b grad p, from the column sums without another pass over grad p
                dp_sum = lat.exp_r * grads.b_mag + grads.b_gate
                if lat.untied:
                    dp_sum = dp_sum + lat.exp_r_neg * grads.b_mag_neg
                grad_b_dec -= spec.over_latents(_mm(dp_sum[None], W_enc.T, mm_dtype)[0])
            grad_norms = c * mass if ctx.needs_input_grad[7] else None
        return (
            None, None, None, None,
            grad_b_dec, grad_W_enc, grad_W_dec, grad_norms,
            grads.b_gate, grads.threshold_pos, grads.threshold_neg,
            lat.exp_r * grads.r, grads.b_mag,
            None if grads.r_neg is None else lat.exp_r_neg * grads.r_neg, grads.b_mag_neg,
        )  # fmt: skip
