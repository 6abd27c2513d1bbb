"""SA-GSAE for inference: the folded Bi-Jump-ReLU form, an SAELens ``SAE`` subclass.

Training learns a gate (b_gate, theta+, theta-) and a signed magnitude (r, b_mag) on one shared
encoder product p = (x - b_dec) W_enc. At inference both fold into one pre-activation
z = (x - b_dec) W_enc' + b_enc and two thresholds, so encoding is one matmul and a Bi-Jump-ReLU:

    f = z * [H(z - t_pos) + H(-z - t_neg)]                  (tied r+ = r-, the default)
    f = z * H(z - t_pos) + z_neg * H(-z_neg - t_neg)          (untied; z_neg = s (z - b_enc) + b_enc_neg)
    f = z * H(z - t_pos)                                      (one-sided ablation = a Gated SAE)

``SAGSAETrainingSAE.save_inference_model`` writes exactly these parameters.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from torch import nn
from typing_extensions import override

from sign_sae.activation import bi_jump_relu
from sign_sae.storage import check_cfg_fields, write_folder

ARCHITECTURE = "sa_gsae"


class StrictSAGSAEConfig:
    """What the inference and training configs share: the architecture name, and strict parsing
    (unknown or wrongly typed fields are an error, not silently dropped as in SAELens)."""

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        check_cfg_fields(config_dict, cls)
        return super().from_dict(config_dict)  # type: ignore[misc]


@dataclass
class SAGSAEConfig(StrictSAGSAEConfig, SAEConfig):
    """Inference config. ``tied``: one magnitude scale for both signs; ``two_sided``: the gate
    opens on either sign (False is the one-sided ablation, equivalent to a Gated SAE)."""

    tied: bool = True
    two_sided: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_dims(self.d_in, self.d_sae)


def validate_dims(d_in: Any, d_sae: Any) -> None:
    """d_in and d_sae must be positive integers."""
    for name, v in (("d_in", d_in), ("d_sae", d_sae)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")


def check_input(x: torch.Tensor, d_in: int, hook_name: str | None) -> None:
    """Clear errors for activations of the wrong width or with NaN/Inf entries."""
    if x.shape[-1] != d_in:
        where = f" (trained on {hook_name})" if hook_name else ""
        raise ValueError(
            f"Activations have last dimension {x.shape[-1]} but this SAE expects d_in={d_in}"
            f"{where}. Feed activations from the hook the SAE was trained on."
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"Activations contain {bad} NaN/Inf value(s). Check the model forward (dtype "
            "overflow, a broken hook) or drop those rows before encoding."
        )


class SAGSAE(SAE[SAGSAEConfig]):
    """Sign-aware gated SAE at inference: signed latents, exactly zero when inactive."""

    b_enc: nn.Parameter
    threshold_pos: nn.Parameter
    threshold_neg: nn.Parameter
    scale_neg: nn.Parameter
    b_enc_neg: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        zeros = lambda: nn.Parameter(  # noqa: E731
            torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
        )
        self.b_enc = zeros()
        self.threshold_pos = zeros()
        if self.cfg.two_sided:
            self.threshold_neg = zeros()
            if not self.cfg.tied:
                self.scale_neg = nn.Parameter(
                    torch.ones(self.cfg.d_sae, dtype=self.dtype, device=self.device)
                )
                self.b_enc_neg = zeros()

    @override
    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        check_input(self.reshape_fn_in(sae_in), self.cfg.d_in, self.cfg.metadata.hook_name)
        return super().process_sae_in(sae_in)

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        if not self.cfg.two_sided:
            feats = z * (z > self.threshold_pos).to(z)
        elif self.cfg.tied:
            feats = bi_jump_relu(z, self.threshold_pos, self.threshold_neg)
        else:
            z_neg = self.scale_neg * (z - self.b_enc) + self.b_enc_neg
            feats = z * (z > self.threshold_pos).to(z) + z_neg * (-z_neg > self.threshold_neg).to(z)
        return self.hook_sae_acts_post(feats)

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


def save_sae_folder(
    path: str | Path, state_dict: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> tuple[Path, Path]:
    """Write an SAE folder in SAELens's layout atomically; returns (weights, cfg) paths."""
    path = Path(path)
    write_folder(path, {SAE_WEIGHTS_FILENAME: state_dict, SAE_CFG_FILENAME: cfg})
    return path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
