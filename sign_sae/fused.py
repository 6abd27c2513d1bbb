"""One SA-GSAE training step as a single autograd Function over one shared encoder product.

Built from PyTorch ops (the reference in ``training_sae.py``), autograd keeps about a dozen
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

from dataclasses import dataclass
from typing import Any

import torch

Vectors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepSpec:
    """Everything that changes the code path of a step."""

    two_sided: bool
    tied: bool
    l0_ste: bool
    aux: bool  # aux_coefficient > 0
    frozen: bool  # aux_decoder == "frozen": no decoder gradient from the aux term or the norms
    centre: bool  # apply_b_dec_to_input
    bandwidth: float
    compile: bool = False


def colsum(x: torch.Tensor) -> torch.Tensor:
    """Sum over rows: a matrix-vector product in eager mode (much faster on CPU than
    ``sum(0)``), a plain reduction that ``torch.compile`` can fuse when compiling."""
    if torch.compiler.is_compiling():
        return x.sum(0)
    return torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device).mm(x)[0]


def forward_kernel(
    spec: StepSpec, p: torch.Tensor, vec: Vectors, mm_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(f, m+, u in ``mm_dtype`` or None without the aux term, per-latent sparsity mass).

    The mass is the sum of |u| over rows (``gated_l1``) or the number of open gates
    (``l0_ste``). Values follow the reference's operations exactly: pi = p + b_gate,
    m = p exp(r) + b_mag, u = pi - clamp(pi, -t-, t+), which is ReLU(pi - t+) - ReLU(-pi - t-)
    as the gates are exclusive; a gate is open where u != 0, on the side sign(u).
    """
    p = p.to(vec["b_gate"].dtype)
    u = p + vec["b_gate"]
    side = torch.clamp(u, min=vec.get("neg_t_neg"), max=vec["t_pos"])
    u.sub_(side)
    mass = None if spec.l0_ste else colsum(torch.abs(u, out=side))
    torch.sign(u, out=side)
    if spec.l0_ste:
        mass = colsum(side.abs())
    m = torch.mul(p, vec["scale"]).add_(vec["b_mag"])
    if spec.two_sided and not spec.tied:
        f = torch.where(side > 0, m, p * vec["scale_neg"] + vec["b_mag_neg"]).mul_(side)
    else:
        f = m * side
    # f = side * ReLU(side * m): m where the open side has m's sign, else 0 (exact).
    f.clamp_(min=0).mul_(side)
    return f, m, (u.to(mm_dtype) if spec.aux else None), mass


def backward_kernel(
    spec: StepSpec,
    p: torch.Tensor,
    f: torch.Tensor,
    grad_f: torch.Tensor,
    grad_u: torch.Tensor | None,
    grad_m: torch.Tensor | None,
    vec: Vectors,
) -> tuple[Vectors, torch.Tensor | None]:
    """Overwrite ``grad_f`` with grad p (and use ``grad_u`` as scratch); return the per-latent
    column sums b_mag, r (of grad m and of grad m * p), their ``_neg`` twins when untied,
    b_gate, t_pos and t_neg, and u when the decoder learns from the aux term.

    ``vec["c"]`` is the sparsity coefficient times the sparsity loss's incoming gradient over B
    and ``vec["pen"]`` = c ||d_i||, the ``gated_l1`` penalty's gradient per open gate.
    """
    p = p.to(vec["b_gate"].dtype)
    sums = _ste_sums(spec, p, grad_f, vec) if spec.l0_ste else {}
    u = p + vec["b_gate"]
    side = torch.clamp(u, min=vec.get("neg_t_neg"), max=vec["t_pos"])
    u.sub_(side)
    torch.sign(u, out=side)
    # f != 0 exactly where a magnitude passes its open gate: grad m = grad f there.
    work = torch.sign(f).abs_()
    grad_f.mul_(work)
    if spec.two_sided and not spec.tied:
        gm_neg = torch.where(side < 0, grad_f, 0.0)
        grad_f.sub_(gm_neg)
        sums["b_mag_neg"], sums["r_neg"] = colsum(gm_neg), colsum(gm_neg * p)
    if grad_m is not None:
        grad_f.add_(grad_m)
    sums["b_mag"], sums["r"] = colsum(grad_f), colsum(torch.mul(grad_f, p, out=work))
    grad_f.mul_(vec["scale"])
    if spec.two_sided and not spec.tied:
        grad_f.add_(gm_neg.mul_(vec["scale_neg"]))
    # grad pi = side * (side * grad_u + pen) on open gates (no pen for l0_ste).
    if grad_u is not None:
        dpi = grad_u.mul_(side)
        if not spec.l0_ste:
            dpi.add_(vec["pen"])
        dpi.mul_(side)
    else:
        dpi = None if spec.l0_ste else side * vec["pen"]
    if dpi is not None:
        total, signed = colsum(dpi), colsum(torch.mul(dpi, side, out=work))
        sums["b_gate"] = total
        # theta+ enters as -theta+ on the positive side, theta- as +theta- on the negative side.
        sums["t_pos"] = sums.get("t_pos", 0.0) - (total + signed) / 2
        if spec.two_sided:
            sums["t_neg"] = sums.get("t_neg", 0.0) + (total - signed) / 2
        grad_f.add_(dpi)
    return sums, (u if grad_u is not None and not spec.frozen else None)


def _ste_sums(spec: StepSpec, p: torch.Tensor, grad_f: torch.Tensor, vec: Vectors) -> Vectors:
    """Threshold gradients of ``l0_ste``'s rectangle-kernel STE for H(pi - t+), H(-pi - t-).

    Each Step's output feeds f (times ReLU(m+), resp. -ReLU(-m-)) and the L0 count (times c).
    """
    eps, c = spec.bandwidth, vec["c"]
    pi = p + vec["b_gate"]
    m = p * vec["scale"] + vec["b_mag"]
    near = ((pi - vec["t_pos"]) / eps).abs() < 0.5
    sums = {"t_pos": -colsum(torch.where(near, m.clamp(min=0) * grad_f + c, 0.0)) / eps}
    if spec.two_sided:
        m_neg = m if spec.tied else p * vec["scale_neg"] + vec["b_mag_neg"]
        near = ((-pi - vec["t_neg"]) / eps).abs() < 0.5
        out = torch.where(near, c - (-m_neg).clamp(min=0) * grad_f, 0.0)
        sums["t_neg"] = -colsum(out) / eps
    return sums


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
    b_dec, W_enc, W_dec, the decoder norms (None for ``l0_ste``, detached when frozen) and the
    per-latent vectors b_gate, t_pos, t_neg, r, b_mag, r_neg, b_mag_neg (None where the variant
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
        norms: torch.Tensor | None,
        b_gate: torch.Tensor,
        t_pos: torch.Tensor,
        t_neg: torch.Tensor | None,
        r: torch.Tensor,
        b_mag: torch.Tensor,
        r_neg: torch.Tensor | None,
        b_mag_neg: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        mm_dtype = _matmul_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            vec = _vectors(b_gate, t_pos, t_neg, r, b_mag, r_neg, b_mag_neg)
            x_c = x - b_dec if spec.centre else x
            p = x_c.to(mm_dtype) @ W_enc.to(mm_dtype)
            f, m, u, mass = _kernel("forward", spec)(spec, p, vec, mm_dtype)
            sae_out = _mm(f, W_dec, mm_dtype) + b_dec
            resid = sae_out - x
            mse = resid.pow(2).sum(-1).mean()
            rows = p.shape[0]
            if spec.l0_ste:
                sparsity = sparsity_coefficient * mass.sum() / rows
            else:
                sparsity = sparsity_coefficient * (mass @ norms) / rows
            if u is not None:
                resid_aux = _mm(u, W_dec, mm_dtype) + b_dec - x
                aux = aux_coefficient * resid_aux.pow(2).sum(-1).mean()
            else:
                resid_aux, aux = None, torch.zeros((), dtype=x.dtype, device=x.device)
        ctx.spec, ctx.mm_dtype = spec, mm_dtype
        ctx.coefficients = (sparsity_coefficient, aux_coefficient)
        ctx.save_for_backward(
            x_c, p, f, W_enc, W_dec, resid, resid_aux, mass, norms,
            b_gate, t_pos, t_neg, r, b_mag, r_neg, b_mag_neg,
        )  # fmt: skip
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
        (x_c, p, f, W_enc, W_dec, resid, resid_aux, mass, norms,
         b_gate, t_pos, t_neg, r, b_mag, r_neg, b_mag_neg) = ctx.saved_tensors  # fmt: skip
        rows = p.shape[0]
        with torch.autocast(f.device.type, enabled=False):
            vec = _vectors(b_gate, t_pos, t_neg, r, b_mag, r_neg, b_mag_neg)
            c = torch.zeros((), dtype=f.dtype, device=f.device)
            if d_sparsity is not None:
                c = d_sparsity * (sparsity_coefficient / rows)
            vec["c"] = c
            if norms is not None:
                vec["pen"] = c * norms
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
            sums, u = _kernel("backward", spec)(spec, p, f, grad_f, grad_u, d_m, vec)
            grad_W_enc = _mm(x_c.T, grad_f, mm_dtype)
            grad_W_dec = _mm(f.T, g_out, mm_dtype)
            grad_b_dec = g_out.sum(0)
            if u is not None:
                grad_W_dec += _mm(u.T, g_aux, mm_dtype)
                grad_b_dec += g_aux.sum(0)
            if spec.centre:
                # sum_b grad p, from the column sums without another pass over grad p
                dp_sum = vec["scale"] * sums["b_mag"] + sums.get("b_gate", 0.0)
                if "b_mag_neg" in sums:
                    dp_sum = dp_sum + vec["scale_neg"] * sums["b_mag_neg"]
                grad_b_dec -= _mm(dp_sum[None], W_enc.T, mm_dtype)[0]
            grad_norms = c * mass if ctx.needs_input_grad[7] else None
        untied = "r_neg" in sums
        return (
            None, None, None, None,
            grad_b_dec, grad_W_enc, grad_W_dec, grad_norms,
            sums.get("b_gate"), sums["t_pos"], sums.get("t_neg"),
            vec["scale"] * sums["r"], sums["b_mag"],
            vec["scale_neg"] * sums["r_neg"] if untied else None, sums.get("b_mag_neg"),
        )  # fmt: skip


def _vectors(
    b_gate: torch.Tensor,
    t_pos: torch.Tensor,
    t_neg: torch.Tensor | None,
    r: torch.Tensor,
    b_mag: torch.Tensor,
    r_neg: torch.Tensor | None,
    b_mag_neg: torch.Tensor | None,
) -> Vectors:
    """The per-latent vectors the kernels read, with exp(r) and -t- computed once."""
    named = {
        "b_gate": b_gate,
        "t_pos": t_pos,
        "t_neg": t_neg,
        "neg_t_neg": None if t_neg is None else -t_neg,
        "scale": r.exp(),
        "b_mag": b_mag,
        "scale_neg": None if r_neg is None else r_neg.exp(),
        "b_mag_neg": b_mag_neg,
    }
    return {k: v.detach() for k, v in named.items() if v is not None}
