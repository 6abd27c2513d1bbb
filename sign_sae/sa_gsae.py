"""SA-GSAE: the Bi-Jump-ReLU function, both configs, the inference SAE and the training SAE.

Training learns a two-sided gate and a signed magnitude on one shared encoder product. With
x' = x - b_dec and p = x' W_enc (computed once per step):

    pi  = p + b_gate                                    gate pre-activation
    g+  = H(pi - threshold_pos),  g- = H(-pi - threshold_neg)   thresholds >= 0: one side open
    m+  = exp(r_mag) p + b_mag,   m- = exp(r_mag_neg) p + b_mag_neg   (tied: m- = m+)
    f   = g+ ReLU(m+) - g- ReLU(-m-)
    u   = ReLU(pi - threshold_pos) - ReLU(-pi - threshold_neg)
    loss = ||x - x_hat||^2 + lambda sum_i ||d_i|| |u_i| + aux_coefficient ||x - (W_dec u + b_dec)||^2

The sparsity penalty is on the gate only; the aux term (the live decoder, as in SAELens's
Gated SAE) keeps gates from collapsing. Each threshold is learned as ``raw_threshold_*``
= threshold / ``threshold_lr_scale`` with the threshold's own gradient (``scaled_threshold``),
so any optimiser, under any trainer, moves it ``threshold_lr_scale`` times as fast as a plain
parameter; the state dict holds the raw parameters exactly, with their scale. Thresholds are
>= 0: the raw
parameters are clamped when read and projected back at the start of every training step,
inside the SAE, so SAELens's trainer keeps them in range too. After every optimiser step
sign-sae's trainer calls ``constrain``: latents that have not fired for ``dead_reset_tokens``
tokens get their thresholds reset to ``threshold_init`` (SAELens's trainer has no such hook,
so there they are not reset).

At inference the gate and the magnitude fold into one pre-activation z = x' W_enc' + b_enc and
two thresholds, so encoding is one matmul and a Bi-Jump-ReLU:

    f = z [H(z - threshold_pos) + H(-z - threshold_neg)]      (tied, the default)
    f = z H(z - threshold_pos) + z_neg H(-z_neg - threshold_neg),
        z_neg = scale_neg (z - b_enc) + b_enc_neg               (untied)
    f = z H(z - threshold_pos)                                  (one-sided: a Gated SAE)

``SAGSAETrainingSAE.save_inference_model`` writes exactly these parameters. docs/method.md says
why each choice was made; the training step runs fused (``sign_sae.fused``) where it can.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from sign_sae.errors import SignSAEError
from sign_sae.fused import SAGSAEStep, StepSpec
from sign_sae.storage import check_cfg_fields, write_folder

ARCHITECTURE = "sa_gsae"
THRESHOLDS = ("threshold_pos", "threshold_neg")
RAW = "raw_"  # the training SAE learns raw_<threshold> = threshold / threshold_lr_scale
LR_SCALE = "threshold_lr_scale"  # the state-dict entry that records that scale


# ---- Bi-Jump-ReLU --------------------------------------------------------------------------
def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (u.abs() < 0.5).to(u)


def open_gate(
    z: torch.Tensor, threshold_pos: torch.Tensor, threshold_neg: torch.Tensor | None = None
) -> torch.Tensor:
    """1 where z > threshold_pos (or, given threshold_neg, z < -threshold_neg), else 0, in z's
    dtype; thresholds >= 0. Computed as |sign(clamp(z, -t-, t+) - z)| in place: exact
    arithmetic, since boolean masks cost several times more on CPU (docs/performance.md)."""
    with torch.no_grad():  # piecewise constant: no gradient flows through the gate
        low = None if threshold_neg is None else -threshold_neg
        gate = torch.clamp(z, low, threshold_pos)
        return gate.sub_(z).sign_().abs_().to(z.dtype)


class BiJumpReLU(torch.autograd.Function):
    """z [H(z - t+) + H(-z - t-)] with t+, t- >= 0: exact in z, and rectangle-kernel
    straight-through estimates (bandwidth eps, as JumpReLU SAEs, arXiv 2407.14435) in the
    thresholds, which are unbiased estimates of the derivative of the expected output."""

    @staticmethod
    def forward(
        z: torch.Tensor, threshold_pos: torch.Tensor, threshold_neg: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        return open_gate(z, threshold_pos, threshold_neg).mul_(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        z, threshold_pos, threshold_neg, bandwidth = inputs
        ctx.save_for_backward(z, threshold_pos, threshold_neg)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        z, t_pos, t_neg = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = ((z > t_pos) | (-z > t_neg)).to(z) * grad_out
        # Raising t+ removes mass at z = t+ (value t+): d/dt+ E[f] = -t+ p(t+).
        grad_pos = -(t_pos / eps) * rectangle((z - t_pos) / eps) * grad_out
        # Raising t- removes mass at z = -t- (value -t-): d/dt- E[f] = t- p(-t-).
        grad_neg = (t_neg / eps) * rectangle((-z - t_neg) / eps) * grad_out
        return grad_z, grad_pos.sum_to_size(t_pos.shape), grad_neg.sum_to_size(t_neg.shape), None


def bi_jump_relu(
    z: torch.Tensor,
    threshold_pos: torch.Tensor,
    threshold_neg: torch.Tensor,
    bandwidth: float = 1e-3,
) -> torch.Tensor:
    """Bi-Jump-ReLU: z where z > threshold_pos or z < -threshold_neg, else 0."""
    return BiJumpReLU.apply(z, threshold_pos, threshold_neg, bandwidth)


def active_product(acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """acts @ W_dec from the non-zero entries of acts only (``embedding_bag``: each row sums
    the decoder rows of its active latents, weighted by their values). Forward and backward
    touch only those rows of W_dec and those entries of acts: k d work per row at L0 k, where
    the dense product costs F d."""
    flat = acts.reshape(-1, acts.shape[-1])
    rows, cols = flat.nonzero(as_tuple=True)  # row-major: each row's latents together
    counts = torch.bincount(rows, minlength=flat.shape[0])
    offsets = counts.cumsum(0) - counts
    out = F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=flat[rows, cols])
    return out.reshape(*acts.shape[:-1], W_dec.shape[1])


# ---- configs -------------------------------------------------------------------------------
class StrictSAGSAEConfig:
    """What both configs share: the architecture name, and strict parsing (unknown or wrongly
    typed fields are an error, not silently dropped as in SAELens)."""

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        if cls is SAGSAEConfig:  # a training checkpoint's cfg.json: keep the inference fields
            training_only = _field_names(SAGSAETrainingSAEConfig) - _field_names(SAGSAEConfig)
            config_dict = {k: v for k, v in config_dict.items() if k not in training_only}
        check_cfg_fields(config_dict, cls)
        return super().from_dict(config_dict)  # type: ignore[misc]


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def validate_dims(d_in: Any, d_sae: Any) -> None:
    """d_in and d_sae must be positive integers."""
    for name, v in (("d_in", d_in), ("d_sae", d_sae)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SignSAEError(f"{name} must be a positive integer, got {v!r}.")


@dataclass
class SAGSAEConfig(StrictSAGSAEConfig, SAEConfig):
    """Inference config. ``tied``: one magnitude scale for both signs; ``two_sided``: the gate
    opens on either sign (False is the one-sided ablation, a Gated SAE)."""

    tied: bool = True
    two_sided: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_dims(self.d_in, self.d_sae)


@dataclass(kw_only=True)
class SAGSAETrainingSAEConfig(StrictSAGSAEConfig, TrainingSAEConfig):
    """Training config; the defaults are the recommended recipe (docs/method.md).

    - ``tied``, ``two_sided``: as ``SAGSAEConfig`` (the paper's ablations).
    - ``sparsity_coefficient``: lambda of the gated-L1 penalty, after a linear warm-up over
      ``sparsity_warm_up_steps`` steps.
    - ``aux_coefficient``: weight of the auxiliary reconstruction from the gate path (0 = the
      paper's "no aux" ablation).
    - ``threshold_init``: the thresholds at the start and after a dead-latent reset.
    - ``threshold_lr_scale``: the thresholds' learning rate as a multiple of the base rate,
      built into the parametrisation (so every trainer honours it).
    - ``dead_reset_tokens``: reset a latent's thresholds after this many tokens without firing
      (0 = never).
    """

    tied: bool = True
    two_sided: bool = True
    sparsity_coefficient: float = 1.0
    sparsity_warm_up_steps: int = 0
    aux_coefficient: float = 1.0
    threshold_init: float = 1e-3
    threshold_lr_scale: float = 10.0
    dead_reset_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        validate_dims(self.d_in, self.d_sae)
        for name in ("sparsity_coefficient", "aux_coefficient", "threshold_init"):
            if getattr(self, name) < 0:
                raise SignSAEError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.threshold_lr_scale <= 0:
            raise SignSAEError(f"threshold_lr_scale must be > 0, got {self.threshold_lr_scale}.")
        super().__post_init__()


def check_input(x: torch.Tensor, d_in: int, hook_name: str | None) -> None:
    """Clear errors for activations of the wrong width or with NaN/Inf entries."""
    if x.shape[-1] != d_in:
        where = f" (trained on {hook_name})" if hook_name else ""
        raise SignSAEError(
            f"Activations have last dimension {x.shape[-1]} but this SAE expects d_in={d_in}"
            f"{where}. Feed activations from the hook the SAE was trained on."
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise SignSAEError(
            f"Activations contain {bad} NaN/Inf value(s). Check the model forward (dtype "
            "overflow, a broken hook) or drop those rows before encoding."
        )


class SAGSAEForms:
    """What both SAEs share: clear errors for activations of the wrong width or with NaN/Inf
    entries before anything is computed from them, and loading either saved form (a folder of
    the other form is converted by ``from_other_form``, the same function either way)."""

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        check_input(self.reshape_fn_in(sae_in), self.cfg.d_in, self.cfg.metadata.hook_name)
        return super().process_sae_in(sae_in)  # type: ignore[misc]

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        converted = self.from_other_form(state_dict)
        if converted is not None:
            state_dict.clear()
            state_dict.update(converted)

    def from_other_form(self, state: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError


def latent_vector(sae: SAE, value: float) -> nn.Parameter:
    """A per-latent parameter of ``sae`` filled with ``value``, on its device and dtype."""
    return nn.Parameter(torch.full((sae.cfg.d_sae,), value, dtype=sae.dtype, device=sae.device))


def save_sae_folder(
    path: str | Path, state_dict: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> tuple[Path, Path]:
    """Write an SAE folder in SAELens's layout atomically; returns (weights, cfg) paths."""
    path = Path(path)
    write_folder(path, {SAE_WEIGHTS_FILENAME: state_dict, SAE_CFG_FILENAME: cfg})
    return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME


# ---- inference -----------------------------------------------------------------------------
class SAGSAE(SAGSAEForms, SAE[SAGSAEConfig]):
    """Sign-aware gated SAE at inference: signed latents, exactly zero when inactive."""

    b_enc: nn.Parameter
    threshold_pos: nn.Parameter
    threshold_neg: nn.Parameter
    scale_neg: nn.Parameter  # exp(r_mag_neg) / exp(r_mag), untied only
    b_enc_neg: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg = self.cfg
        vec = lambda v: latent_vector(self, v)  # noqa: E731
        self.b_enc, self.threshold_pos = vec(0.0), vec(0.0)
        if cfg.two_sided:
            self.threshold_neg = vec(0.0)
            if not cfg.tied:
                self.scale_neg, self.b_enc_neg = vec(1.0), vec(0.0)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # one fused matmul-and-bias (addmm) rather than a matmul and a separate F-wide add
        z = self.hook_sae_acts_pre(F.linear(self.process_sae_in(x), self.W_enc.T, self.b_enc))
        if not self.cfg.two_sided:
            feats = open_gate(z, self.threshold_pos).mul_(z)
        elif self.cfg.tied:
            feats = bi_jump_relu(z, self.threshold_pos, self.threshold_neg)
        else:
            z_neg = self.scale_neg * (z - self.b_enc) + self.b_enc_neg
            feats = open_gate(z, self.threshold_pos).mul_(z)
            feats += open_gate(-z_neg, self.threshold_neg).mul_(z_neg)
        return self.hook_sae_acts_post(feats)

    def from_other_form(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """A training checkpoint's parameters, folded (None for this form's own)."""
        if "b_gate" not in state:
            return None
        return to_inference_state(state, self.cfg.tied, self.cfg.two_sided)

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.fold_and_get_W_dec_norm()  # scales W_enc, W_dec and b_enc
        self.threshold_pos.mul_(norms)
        if self.cfg.two_sided:
            self.threshold_neg.mul_(norms)
            if not self.cfg.tied:
                self.b_enc_neg.mul_(norms)

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        if not self.cfg.apply_b_dec_to_input and self.cfg.two_sided and not self.cfg.tied:
            self.b_enc_neg.sub_(self.scale_neg * (mean.to(self.W_enc) @ self.W_enc))

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save in SAELens's format, atomically."""
        return save_sae_folder(path, self.state_dict(), self.cfg.to_dict())


# ---- training ------------------------------------------------------------------------------
class SAGSAETrainingSAE(SAGSAEForms, TrainingSAE[SAGSAETrainingSAEConfig]):
    """Trainable SA-GSAE; ``save_inference_model`` folds it into ``SAGSAE``.

    Speed switches (attributes, not config: they never change a result beyond rounding):
    ``fused`` runs the step as ``sign_sae.fused.SAGSAEStep`` where it applies;
    ``compile_step`` fuses its element-wise passes with ``torch.compile``. Under
    ``torch.autocast`` the fused step's matmuls run in the autocast dtype. ``sparse_decode``
    decodes from the active latents only (``active_product``; the reference path runs).

    ``latent_sums`` (set by ``sign_sae.sharding.shard``, None otherwise) makes this SAE one
    shard of a wider one: its partial reconstructions and per-row sums over latents are
    completed over the other shards, and the centred input's gradient summed over them.
    """

    fused: bool = True
    compile_step: bool = False
    sparse_decode: bool = False
    latent_sums: Any = None  # sign_sae.sharding.LatentSums

    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    r_mag_neg: nn.Parameter
    b_mag_neg: nn.Parameter
    raw_threshold_pos: nn.Parameter  # threshold_pos / threshold_lr_scale
    raw_threshold_neg: nn.Parameter

    def __init__(self, cfg: SAGSAETrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        # state dicts (files, checkpoints) hold the raw thresholds exactly, and their scale
        self.register_state_dict_post_hook(_thresholds_out)
        self.register_load_state_dict_pre_hook(_thresholds_in)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg = self.cfg
        vec = lambda v: latent_vector(self, v)  # noqa: E731
        self.b_gate, self.r_mag, self.b_mag = vec(0.0), vec(0.0), vec(0.0)
        for name in self.threshold_names():
            setattr(self, RAW + name, vec(cfg.threshold_init / cfg.threshold_lr_scale))
        if self.untied:
            self.r_mag_neg, self.b_mag_neg = vec(0.0), vec(0.0)

    @property
    def threshold_pos(self) -> torch.Tensor:
        """The positive gate's threshold, from its raw parameter (``scaled_threshold``)."""
        return scaled_threshold(self.raw_threshold_pos, self.cfg.threshold_lr_scale)

    @property
    def threshold_neg(self) -> torch.Tensor:
        """The negative gate's threshold (two-sided only)."""
        return scaled_threshold(self.raw_threshold_neg, self.cfg.threshold_lr_scale)

    def raw_thresholds(self) -> list[nn.Parameter]:
        """The learned parameters behind this variant's thresholds."""
        return [getattr(self, RAW + name) for name in self.threshold_names()]

    @property
    def untied(self) -> bool:
        """Separate magnitude parameters for the negative side."""
        return self.cfg.two_sided and not self.cfg.tied

    def threshold_names(self) -> tuple[str, ...]:
        """The threshold parameters this variant has."""
        return THRESHOLDS if self.cfg.two_sided else THRESHOLDS[:1]

    # ---- forward ---------------------------------------------------------------------------
    def _features(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed features f, positive magnitude pre-activation m+) from p = x' W_enc."""
        pi = p + self.b_gate
        m_pos = self.hook_sae_acts_pre(p * self.r_mag.exp() + self.b_mag)
        f = (pi > self.threshold_pos).to(pi) * F.relu(m_pos)
        if self.cfg.two_sided:
            m_neg = p * self.r_mag_neg.exp() + self.b_mag_neg if self.untied else m_pos
            f = f - (-pi > self.threshold_neg).to(pi) * F.relu(-m_neg)
        return self.hook_sae_acts_post(f), m_pos

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._features(self.process_sae_in(x) @ self.W_enc)

    # ---- losses ----------------------------------------------------------------------------
    def _gate_losses(
        self, pi: torch.Tensor, target: torch.Tensor, coefficient: float
    ) -> dict[str, torch.Tensor]:
        """Sparsity on the gate and the auxiliary reconstruction from the gate path alone."""
        u = F.relu(pi - self.threshold_pos)
        if self.cfg.two_sided:
            u = u - F.relu(-pi - self.threshold_neg)
        sparsity = self._over_latents((u.abs() * self.W_dec.norm(dim=1)).sum(-1)).mean()
        losses = {"sparsity_loss": coefficient * sparsity}
        if self.cfg.aux_coefficient > 0:
            aux = (self._decoded(u) - target).pow(2).sum(-1).mean()
            losses["auxiliary_reconstruction_loss"] = self.cfg.aux_coefficient * aux
        return losses

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        pi = self.process_sae_in(step_input.sae_in) @ self.W_enc + self.b_gate
        return self._gate_losses(pi, step_input.sae_in, step_input.coefficients["sparsity"])

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One shared encoder product feeds the gate, both magnitudes and the aux path."""
        sae_in = step_input.sae_in
        coefficient = step_input.coefficients["sparsity"]
        self.clamp_thresholds()
        if self._can_fuse(sae_in):
            sae_out, f, m_pos, losses = self._fused_step(sae_in, coefficient)
        else:
            x_c = self.process_sae_in(sae_in)
            if self.latent_sums is not None:
                x_c = self.latent_sums.shared(x_c)
            p = x_c @ self.W_enc
            f, m_pos = self._features(p)
            sae_out = self.decode(f)
            losses = {"mse_loss": (sae_out - sae_in).pow(2).sum(-1).mean()}
            losses.update(self._gate_losses(p + self.b_gate, sae_in, coefficient))
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=f,
            hidden_pre=m_pos,
            loss=sum(losses.values()),
            losses=losses,
        )

    def _can_fuse(self, sae_in: torch.Tensor) -> bool:
        """The fused step covers plain inputs without hooks (the reference path covers all)."""
        hooks = (
            self.hook_sae_input,
            self.hook_sae_acts_pre,
            self.hook_sae_acts_post,
            self.hook_sae_recons,
        )
        return (
            self.fused
            and not self.sparse_decode
            and not sae_in.requires_grad
            and self.cfg.normalize_activations == "none"
            and not self.hook_z_reshaping_mode
            and not any(h._forward_hooks or h._forward_pre_hooks for h in hooks)
        )

    def _fused_step(
        self, sae_in: torch.Tensor, coefficient: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_hat, f, m+, losses) from ``SAGSAEStep``; the same values as the reference path."""
        cfg = self.cfg
        check_input(sae_in, cfg.d_in, cfg.metadata.hook_name)
        x = sae_in.to(self.dtype)
        spec = StepSpec(
            two_sided=cfg.two_sided,
            tied=cfg.tied,
            aux=cfg.aux_coefficient > 0,
            centre=cfg.apply_b_dec_to_input,
            compile=self.compile_step,
            total=None if self.latent_sums is None else self.latent_sums.total_,
        )
        sae_out, f, m_pos, mse, sparsity, aux = SAGSAEStep.apply(
            spec,
            x.reshape(-1, cfg.d_in),
            float(coefficient),
            float(cfg.aux_coefficient),
            self.b_dec,
            self.W_enc,
            self.W_dec,
            self.W_dec.norm(dim=1),
            *self._latent_params(),
        )
        lead = x.shape[:-1]
        losses = {"mse_loss": mse, "sparsity_loss": sparsity}
        if spec.aux:
            losses["auxiliary_reconstruction_loss"] = aux
        return (
            sae_out.reshape(*lead, cfg.d_in),
            f.reshape(*lead, cfg.d_sae),
            m_pos.reshape(*lead, cfg.d_sae),
            losses,
        )

    def _latent_params(self) -> list[torch.Tensor | None]:
        """The per-latent parameters in ``Latents``'s order (None where the variant has none)."""
        names = ("b_gate", *THRESHOLDS, "r_mag", "b_mag", "r_mag_neg", "b_mag_neg")
        have = lambda n: n in self._parameters or RAW + n in self._parameters  # noqa: E731
        return [getattr(self, n) if have(n) else None for n in names]

    # ---- decoding ----------------------------------------------------------------------------
    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(self._decoded(feature_acts))
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def _decoded(self, acts: torch.Tensor) -> torch.Tensor:
        """acts W_dec + b_dec over every shard's latents; from the active ones only with
        ``sparse_decode``."""
        partial = active_product(acts, self.W_dec) if self.sparse_decode else acts @ self.W_dec
        return self._over_latents(partial) + self.b_dec

    def _over_latents(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over this SAE's latents completed over every shard's (itself unsharded)."""
        return partial if self.latent_sums is None else self.latent_sums.total(partial)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "sparsity": TrainCoefficientConfig(
                value=self.cfg.sparsity_coefficient,
                warm_up_steps=self.cfg.sparsity_warm_up_steps,
            )
        }

    # ---- constraints ------------------------------------------------------------------------
    @torch.no_grad()
    def clamp_thresholds(self) -> None:
        """Project the raw thresholds back onto >= 0, where they have a gradient again. Each
        training step starts with it, so any trainer does it."""
        for raw in self.raw_thresholds():
            raw.clamp_(min=0.0)

    @torch.no_grad()
    def constrain(self, tokens_since_fired: torch.Tensor) -> torch.Tensor:
        """After an optimiser step (``sign_sae.trainer.Constrained``): reset the thresholds of
        latents that have not fired for ``dead_reset_tokens`` tokens to ``threshold_init``;
        returns the mask of reset latents."""
        window = self.cfg.dead_reset_tokens
        if window <= 0:
            return torch.zeros_like(tokens_since_fired, dtype=torch.bool)
        dead = tokens_since_fired.to(self.device) >= window
        for raw in self.raw_thresholds():
            raw[dead] = self.cfg.threshold_init / self.cfg.threshold_lr_scale
        return dead

    # ---- folding and export ----------------------------------------------------------------
    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.fold_and_get_W_dec_norm()
        # the biases and thresholds on the scale of p scale with W_enc's columns
        for name in ("b_gate", "b_mag", "b_mag_neg", *(RAW + t for t in THRESHOLDS)):
            if name in self._parameters:
                getattr(self, name).mul_(norms)

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        if not self.cfg.apply_b_dec_to_input:
            shift = mean.to(self.W_enc) @ self.W_enc  # p picks up -shift; bias terms absorb it
            self.b_gate.sub_(shift)
            self.b_mag.sub_(shift * self.r_mag.exp())
            if self.untied:
                self.b_mag_neg.sub_(shift * self.r_mag_neg.exp())

    @torch.no_grad()
    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The folded Bi-Jump-ReLU parameters of ``SAGSAE`` (the same function)."""
        return to_inference_state(self.state_dict(), self.cfg.tied, self.cfg.two_sided)

    def from_other_form(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """An inference folder's parameters, unfolded, to continue training from a released
        SAE (None for this form's own)."""
        if "b_enc" not in state:
            return None
        return to_training_state(state, self.cfg.tied, self.cfg.two_sided)

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save a training checkpoint (every parameter), atomically."""
        return save_sae_folder(path, self.state_dict(), self.cfg.to_dict())

    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save the folded inference SAE (``SAGSAE``) in SAELens's format, atomically."""
        return save_sae_folder(
            path, self.inference_state_dict(), self.cfg.get_inference_sae_cfg_dict()
        )


def scaled_threshold(raw: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x max(raw, 0), whose gradient reaches ``raw`` unscaled: any optimiser that moves
    ``raw`` by some step moves the threshold ``scale`` times as far (a learning-rate multiplier
    for SGD and Adam alike), and gradient clipping sees the threshold's own gradient. Never
    below 0, though an optimiser step may leave ``raw`` there until the next step."""
    t = raw.clamp(min=0)
    return t + (scale - 1) * t.detach()


def _thresholds_out(
    sae: SAGSAETrainingSAE, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """State-dict hook: record the scale of the raw thresholds, so that a saved state converts
    to the inference form exactly (``to_inference_state``) without its config."""
    state[prefix + LR_SCALE] = torch.tensor(sae.cfg.threshold_lr_scale)


def _thresholds_in(sae: SAGSAETrainingSAE, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict hook: raw thresholds saved at another scale, or thresholds themselves
    (an unfolded inference folder, or a checkpoint from before the parametrisation), become
    this SAE's raw thresholds."""
    scale = sae.cfg.threshold_lr_scale
    saved = state.pop(prefix + LR_SCALE, None)
    for name in sae.threshold_names():
        raw = prefix + RAW + name
        if prefix + name in state:
            state[raw] = state.pop(prefix + name) / scale
        elif saved is not None and raw in state and not math.isclose(float(saved), scale):
            state[raw] = state[raw] * (float(saved) / scale)


def _threshold(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """A training state's threshold, >= 0, computed as the training forward computes it."""
    if RAW + name in state:
        return scaled_threshold(state[RAW + name], float(state[LR_SCALE]))
    return state[name].clamp(min=0)


# ---- the two saved forms ---------------------------------------------------------------------
def to_inference_state(
    state: Mapping[str, torch.Tensor], tied: bool, two_sided: bool
) -> dict[str, torch.Tensor]:
    """``SAGSAE``'s folded parameters from ``SAGSAETrainingSAE``'s (the same function)."""
    scale = state["r_mag"].exp()
    theta_pos = _threshold(state, "threshold_pos")
    out = {
        "W_enc": state["W_enc"] * scale,
        "b_enc": state["b_mag"].clone(),
        "W_dec": state["W_dec"].clone(),
        "b_dec": state["b_dec"].clone(),
        # pi > theta+  <=>  m+ > exp(r)(theta+ - b_gate) + b_mag; ReLU adds m+ > 0.
        "threshold_pos": (scale * (theta_pos - state["b_gate"]) + state["b_mag"]).clamp(min=0),
    }
    if two_sided:
        untied = not tied
        theta_neg = _threshold(state, "threshold_neg")
        scale_neg = state["r_mag_neg"].exp() if untied else scale
        b_neg = state["b_mag_neg"] if untied else state["b_mag"]
        # -pi > theta-  <=>  -m- > exp(r-)(theta- + b_gate) - b_mag-; ReLU adds m- < 0.
        out["threshold_neg"] = (scale_neg * (theta_neg + state["b_gate"]) - b_neg).clamp(min=0)
        if untied:
            out["scale_neg"] = scale_neg / scale
            out["b_enc_neg"] = b_neg.clone()
    return out


def to_training_state(
    state: Mapping[str, torch.Tensor], tied: bool, two_sided: bool
) -> dict[str, torch.Tensor]:
    """``SAGSAETrainingSAE`` parameters computing ``SAGSAE``'s function: r = 0 (so W_enc and
    b_mag = b_enc carry over), and the gate bias halfway between where the two gates open, in
    p = x' W_enc: the positive gate at p > t+ - b_enc, the negative one at
    p < -(t- + b_enc_neg) / scale_neg. Exact when the two do not overlap, which holds for any
    folder this class wrote; overlapping gates (hand-made weights) are refused."""
    b_enc, t_pos = state["b_enc"], state["threshold_pos"]
    opens_pos = t_pos - b_enc
    out = {k: state[k].clone() for k in ("W_enc", "W_dec", "b_dec")}
    out.update(r_mag=torch.zeros_like(b_enc), b_mag=b_enc.clone())
    if not two_sided:
        out.update(b_gate=b_enc.clone(), threshold_pos=t_pos.clone())
        return out
    scale_neg = state["scale_neg"] if not tied else torch.ones_like(b_enc)
    b_enc_neg = state["b_enc_neg"] if not tied else b_enc
    opens_neg = -(state["threshold_neg"] + b_enc_neg) / scale_neg
    if bool((opens_neg > opens_pos).any()):
        raise SignSAEError(
            f"{int((opens_neg > opens_pos).sum())} latent(s) of this SA-GSAE open both gates on "
            "the same inputs, which the training form cannot represent; train from the training "
            "checkpoint instead."
        )
    b_gate = -(opens_pos + opens_neg) / 2
    out.update(b_gate=b_gate, threshold_pos=opens_pos + b_gate, threshold_neg=-opens_neg - b_gate)
    if not tied:
        out.update(r_mag_neg=scale_neg.log(), b_mag_neg=b_enc_neg.clone())
    return out
