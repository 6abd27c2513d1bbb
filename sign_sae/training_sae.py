"""SA-GSAE for training: a two-sided gate and a signed magnitude on one shared encoder product.

With x' = x - b_dec and p = x' W_enc (computed once per step):

    pi  = p + b_gate                                    gate pre-activation
    g+  = H(pi - theta+),   g- = H(-pi - theta-)        theta+/- >= 0, so at most one is open
    m+  = exp(r+) p + b_mag+,   m- = exp(r-) p + b_mag-  (tied default: r+ = r-, b_mag+ = b_mag-)
    f   = g+ ReLU(m+) - g- ReLU(-m-)
    loss = ||x - x_hat||^2 + sparsity + aux_coefficient ||x - (W_dec u + b_dec)||^2
    u   = ReLU(pi - theta+) - ReLU(-pi - theta-)

Sparsity is on the gate only: ``gated_l1`` = lambda sum_i ||d_i|| (ReLU(pi - theta+) +
ReLU(-pi - theta-)); ``l0_ste`` = lambda sum_i (g+ + g-) with rectangle-kernel straight-through
gradients to the thresholds (then the gates in f also pass those gradients). ``aux_decoder``
treats the decoder the same way in the aux term and in the penalty's norms: ``live`` (as
SAELens's Gated SAE) or ``frozen`` (stop-gradient in both); ``decoder_norm="unit"`` instead
keeps decoder rows at unit norm and drops the norm weights. Thresholds are stored ``raw``
(clamped at 0), as ``abs`` (theta = |t|) or ``log`` (theta = exp(t)); they start at
``threshold_init`` or, with ``threshold_init_l0``, at per-latent quantiles of |pi| on the first
batch so that the starting L0 is that number. Latents that have not fired for
``dead_reset_tokens`` tokens get their thresholds reset to ``threshold_init``.
See docs/method.md for every choice and why, and docs/method-study.md for the measurements.

``training_forward_pass`` runs the step as one autograd Function (``sign_sae.fused``: one
encoder product, no F-wide temporaries kept for the backward) and falls back to the reference
ops when hooks, run-time normalisation or gradients into the input need them. Both give the same
losses and gradients (tests/test_fused.py). docs/performance.md has the measurements.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from sae_lens import TrainingSAE, TrainingSAEConfig
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from torch import nn
from torch.nn import functional as F
from typing_extensions import override

from sign_sae.activation import step
from sign_sae.fused import SAGSAEStep, StepSpec
from sign_sae.sae import StrictSAGSAEConfig, check_input, save_sae_folder, validate_dims

Sparsity = Literal["gated_l1", "l0_ste"]
AuxDecoder = Literal["live", "frozen"]
ThresholdParam = Literal["raw", "abs", "log"]
DecoderNorm = Literal["weighted", "unit"]
CHOICES = {
    "sparsity": ("gated_l1", "l0_ste"),
    "aux_decoder": ("live", "frozen"),
    "threshold_param": ("raw", "abs", "log"),
    "decoder_norm": ("weighted", "unit"),
}


@dataclass(kw_only=True)
class SAGSAETrainingSAEConfig(StrictSAGSAEConfig, TrainingSAEConfig):
    """Training config; every reading METHOD.md leaves open is a switch. Defaults = recommended."""

    tied: bool = True
    two_sided: bool = True
    sparsity: Sparsity = "gated_l1"
    sparsity_coefficient: float = 1.0
    sparsity_warm_up_steps: int = 0
    aux_coefficient: float = 1.0
    aux_decoder: AuxDecoder = "live"
    threshold_init: float = 1e-3
    threshold_init_l0: float | None = None
    threshold_param: ThresholdParam = "raw"
    threshold_lr_scale: float = 10.0
    decoder_norm: DecoderNorm = "weighted"
    bandwidth: float = 1e-3
    dead_reset_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        validate_dims(self.d_in, self.d_sae)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("sparsity_coefficient", "aux_coefficient", "threshold_init"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("bandwidth", "threshold_lr_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.threshold_param == "log" and self.threshold_init <= 0:
            raise ValueError("threshold_param='log' needs threshold_init > 0 (theta = exp(t)).")
        if self.threshold_init_l0 is not None and not 0 < self.threshold_init_l0 <= self.d_sae:
            raise ValueError(
                f"threshold_init_l0 must be in (0, d_sae={self.d_sae}], got {self.threshold_init_l0}."
            )
        super().__post_init__()


class SAGSAETrainingSAE(TrainingSAE[SAGSAETrainingSAEConfig]):
    """Trainable SA-GSAE; ``save_inference_model`` folds it into ``sign_sae.SAGSAE``.

    Speed switches (attributes, not config: they never change a result beyond rounding):
    ``fused`` runs the training step as ``sign_sae.fused.SAGSAEStep`` where it applies;
    ``compile_step`` fuses its element-wise passes with ``torch.compile``. Mixed precision is
    ``torch.autocast`` around ``training_forward_pass``: the fused step's matmuls, forward and
    backward, then run in the autocast dtype while weights and gradients keep theirs.
    """

    fused: bool = True
    compile_step: bool = False

    b_gate: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter
    r_mag_neg: nn.Parameter
    b_mag_neg: nn.Parameter
    threshold_pos: nn.Parameter
    threshold_neg: nn.Parameter
    tokens_since_fired: torch.Tensor

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        cfg = self.cfg

        def vec(value: float) -> nn.Parameter:
            return nn.Parameter(
                torch.full((cfg.d_sae,), value, dtype=self.dtype, device=self.device)
            )

        self.b_gate, self.r_mag, self.b_mag = vec(0.0), vec(0.0), vec(0.0)
        self.threshold_pos = vec(self._stored(cfg.threshold_init))
        if cfg.two_sided:
            self.threshold_neg = vec(self._stored(cfg.threshold_init))
            if not cfg.tied:
                self.r_mag_neg, self.b_mag_neg = vec(0.0), vec(0.0)
        # Persistent so that checkpoints resume the dead-latent clock exactly.
        self.register_buffer(
            "tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        )

    # ---- forward -------------------------------------------------------------------------
    @override
    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        check_input(sae_in, self.cfg.d_in, self.cfg.metadata.hook_name)
        return super().process_sae_in(sae_in)

    def _gate(self, pi: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if self.cfg.sparsity == "l0_ste":
            return step(pi, threshold, self.cfg.bandwidth)
        return (pi > threshold).to(pi)

    def _features(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(signed features f, positive magnitude pre-activation m+, gate pre-activation pi)."""
        cfg = self.cfg
        pi = p + self.b_gate
        m_pos = self.hook_sae_acts_pre(p * self.r_mag.exp() + self.b_mag)
        theta_pos, theta_neg = self.thresholds()
        f = self._gate(pi, theta_pos) * F.relu(m_pos)
        if cfg.two_sided:
            m_neg = m_pos if cfg.tied else p * self.r_mag_neg.exp() + self.b_mag_neg
            f = f - self._gate(-pi, theta_neg) * F.relu(-m_neg)
        return self.hook_sae_acts_post(f), m_pos, pi

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, m_pos, _ = self._features(self.process_sae_in(x) @ self.W_enc)
        return f, m_pos

    # ---- losses --------------------------------------------------------------------------
    def _gate_losses(
        self, pi: torch.Tensor, target: torch.Tensor, coefficient: float
    ) -> dict[str, torch.Tensor]:
        """Sparsity on the gate and the auxiliary reconstruction from the gate path alone."""
        cfg = self.cfg
        frozen = cfg.aux_decoder == "frozen"
        W_dec = self.W_dec.detach() if frozen else self.W_dec
        b_dec = self.b_dec.detach() if frozen else self.b_dec
        theta_pos, theta_neg = self.thresholds()
        u = F.relu(pi - theta_pos)
        if cfg.two_sided:
            u_neg = F.relu(-pi - theta_neg)
        if cfg.sparsity == "gated_l1":
            mass = u + u_neg if cfg.two_sided else u
            sparsity = (mass * self._penalty_norms(W_dec)).sum(-1).mean()
        else:
            opened = self._gate(pi, theta_pos)
            if cfg.two_sided:
                opened = opened + self._gate(-pi, theta_neg)
            sparsity = opened.sum(-1).mean()
        losses = {"sparsity_loss": coefficient * sparsity}
        if cfg.aux_coefficient > 0:
            signed_u = u - u_neg if cfg.two_sided else u
            aux = (signed_u @ W_dec + b_dec - target).pow(2).sum(-1).mean()
            losses["auxiliary_reconstruction_loss"] = cfg.aux_coefficient * aux
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
        n_resets = self._constrain_and_reset()
        sae_in = step_input.sae_in
        coefficient = step_input.coefficients["sparsity"]
        if self._can_fuse(sae_in):
            sae_out, f, m_pos, losses = self._fused_step(sae_in, coefficient)
        else:
            f, m_pos, pi = self._features(self.process_sae_in(sae_in) @ self.W_enc)
            sae_out = self.decode(f)
            losses = {"mse_loss": (sae_out - sae_in).pow(2).sum(-1).mean()}
            losses.update(self._gate_losses(pi, sae_in, coefficient))
        self._update_dead_clock(f)
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=f,
            hidden_pre=m_pos,
            loss=sum(losses.values()),
            losses=losses,
            metrics={"threshold_resets": n_resets},
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
            and not sae_in.requires_grad
            and self.cfg.normalize_activations == "none"
            and not self.hook_z_reshaping_mode
            and not any(h._forward_hooks or h._forward_pre_hooks for h in hooks)
        )

    def _fused_step(
        self, sae_in: torch.Tensor, coefficient: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x_hat, f, m+, losses) from ``SAGSAEStep``; same values as the reference path."""
        cfg = self.cfg
        check_input(sae_in, cfg.d_in, cfg.metadata.hook_name)
        x = sae_in.to(self.dtype)
        spec = StepSpec(
            two_sided=cfg.two_sided,
            tied=cfg.tied,
            l0_ste=cfg.sparsity == "l0_ste",
            aux=cfg.aux_coefficient > 0,
            frozen=cfg.aux_decoder == "frozen",
            centre=cfg.apply_b_dec_to_input,
            bandwidth=cfg.bandwidth,
            compile=self.compile_step,
        )
        norms = None
        if not spec.l0_ste:
            norms = self._penalty_norms(self.W_dec.detach() if spec.frozen else self.W_dec)
        theta_pos, theta_neg = self.thresholds()
        untied = cfg.two_sided and not cfg.tied
        sae_out, f, m_pos, mse, sparsity, aux = SAGSAEStep.apply(
            spec,
            x.reshape(-1, cfg.d_in),
            float(coefficient),
            float(cfg.aux_coefficient),
            self.b_dec,
            self.W_enc,
            self.W_dec,
            norms,
            self.b_gate,
            theta_pos,
            theta_neg,
            self.r_mag,
            self.b_mag,
            self.r_mag_neg if untied else None,
            self.b_mag_neg if untied else None,
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

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {
            "sparsity": TrainCoefficientConfig(
                value=self.cfg.sparsity_coefficient,
                warm_up_steps=self.cfg.sparsity_warm_up_steps,
            )
        }

    # ---- thresholds, constraints and dead-latent resets -----------------------------------
    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(theta+, theta- or None): the thresholds on pi, from their stored parameters."""
        theta = [self._theta(t) for t in self._threshold_params()]
        return theta[0], theta[1] if self.cfg.two_sided else None

    def _theta(self, stored: torch.Tensor) -> torch.Tensor:
        """A threshold from its stored parameter (``threshold_param``)."""
        mode = self.cfg.threshold_param
        return stored if mode == "raw" else stored.abs() if mode == "abs" else stored.exp()

    def _stored(self, theta: torch.Tensor | float) -> torch.Tensor | float:
        """The stored parameter value for threshold ``theta`` (inverse of ``thresholds``)."""
        if self.cfg.threshold_param != "log":
            return theta
        return theta.log() if isinstance(theta, torch.Tensor) else math.log(theta)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (``sign_sae.training.train`` applies
        them; SAELens's own trainer does not): the thresholds get ``threshold_lr_scale``."""
        return dict.fromkeys(self._threshold_names(), self.cfg.threshold_lr_scale)

    def _threshold_names(self) -> list[str]:
        return ["threshold_pos"] + (["threshold_neg"] if self.cfg.two_sided else [])

    def _threshold_params(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._threshold_names()]

    def _penalty_norms(self, W_dec: torch.Tensor) -> torch.Tensor:
        """Per-latent weights of the gated-L1 penalty: decoder norms (1 for unit rows)."""
        if self.cfg.decoder_norm == "unit":
            return torch.ones(self.cfg.d_sae, dtype=W_dec.dtype, device=W_dec.device)
        return W_dec.norm(dim=1)

    @torch.no_grad()
    def _clamp_thresholds(self) -> None:
        if self.cfg.threshold_param == "raw":
            for t in self._threshold_params():
                t.clamp_(min=0.0)

    @torch.no_grad()
    def initialize_from_activations(self, x: torch.Tensor) -> None:
        """Data-dependent start (called once by ``sign_sae.training.train`` on scaled inputs).

        With ``threshold_init_l0`` = L, each latent's threshold becomes the (1 - L/d_sae)
        quantile of |pi| over ``x``, so that at step 0 about L latents fire per token, each
        about equally often, instead of every latent firing on every token.
        """
        if self.cfg.threshold_init_l0 is None:
            return
        pi = self.process_sae_in(x.to(self.dtype)) @ self.W_enc + self.b_gate
        rows = pi.shape[0]
        keep = min(rows - 1, max(1, round(rows * self.cfg.threshold_init_l0 / self.cfg.d_sae)))
        top = pi.abs().topk(keep + 1, dim=0).values
        theta = (top[-2] + top[-1]) / 2  # between the keep-th and next: |pi| > theta on keep rows
        for t in self._threshold_params():
            t.copy_(self._stored(theta))

    @torch.no_grad()
    def _constrain_and_reset(self) -> int:
        """Apply the constraints (thresholds >= 0, unit decoder rows where asked) and reset
        the thresholds of latents dead for a full window."""
        self._clamp_thresholds()
        if self.cfg.decoder_norm == "unit":
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))
        window = self.cfg.dead_reset_tokens
        if window <= 0:
            return 0
        dead = self.tokens_since_fired >= window
        n_dead = int(dead.sum())
        if n_dead:
            for t in self._threshold_params():
                t[dead] = self._stored(self.cfg.threshold_init)
            self.tokens_since_fired[dead] = 0
        return n_dead

    @torch.no_grad()
    def _update_dead_clock(self, feature_acts: torch.Tensor) -> None:
        fired = (feature_acts != 0).reshape(-1, self.cfg.d_sae).any(0)
        self.tokens_since_fired.add_(feature_acts.reshape(-1, self.cfg.d_sae).shape[0])
        self.tokens_since_fired[fired] = 0

    # ---- folding and export --------------------------------------------------------------
    def _encoder_vectors(self) -> list[nn.Parameter]:
        """Per-latent biases on the scale of p (they scale with W_enc's columns)."""
        vecs = [self.b_gate, self.b_mag]
        if self.cfg.two_sided and not self.cfg.tied:
            vecs.append(self.b_mag_neg)
        return vecs

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.fold_and_get_W_dec_norm()
        for v in self._encoder_vectors():
            v.mul_(norms)
        for t in self._threshold_params():  # thresholds are on the scale of p too
            if self.cfg.threshold_param == "log":
                t.add_(norms.log())
            else:
                t.mul_(norms)

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
            if self.cfg.two_sided and not self.cfg.tied:
                self.b_mag_neg.sub_(shift * self.r_mag_neg.exp())

    @torch.no_grad()
    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The folded Bi-Jump-ReLU parameters of ``sign_sae.SAGSAE`` (same function)."""
        self._clamp_thresholds()
        theta_pos, theta_neg = self.thresholds()
        scale = self.r_mag.exp()
        state = {
            "W_enc": self.W_enc * scale,
            "b_enc": self.b_mag.clone(),
            "W_dec": self.W_dec.clone(),
            "b_dec": self.b_dec.clone(),
            # pi > theta+  <=>  m+ > exp(r)(theta+ - b_gate) + b_mag; ReLU adds m+ > 0.
            "threshold_pos": (scale * (theta_pos - self.b_gate) + self.b_mag).clamp(min=0),
        }
        if self.cfg.two_sided:
            scale_neg = scale if self.cfg.tied else self.r_mag_neg.exp()
            b_neg = self.b_mag if self.cfg.tied else self.b_mag_neg
            # -pi > theta-  <=>  -m- > exp(r-)(theta- + b_gate) - b_mag-; ReLU adds m- < 0.
            state["threshold_neg"] = (scale_neg * (theta_neg + self.b_gate) - b_neg).clamp(min=0)
            if not self.cfg.tied:
                state["scale_neg"] = scale_neg / scale
                state["b_enc_neg"] = b_neg.clone()
        return state

    @override
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save a training checkpoint (all parameters and the dead-latent clock), atomically."""
        return save_sae_folder(path, self.state_dict(), self.cfg.to_dict())

    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save the folded inference SAE (``sign_sae.SAGSAE``) in SAELens's format, atomically."""
        return save_sae_folder(
            path, self.inference_state_dict(), self.cfg.get_inference_sae_cfg_dict()
        )
