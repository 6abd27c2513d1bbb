"""sign-sae: sign-aware gated sparse autoencoders (SA-GSAE) for SAELens and TransformerLens.

Importing this package registers the architecture ``"sa_gsae"`` with SAELens (idempotent), so
``SAE.load_from_disk`` and ``SAE.from_pretrained`` return ``SAGSAE`` objects.
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sign_sae.activation import bi_jump_relu
from sign_sae.sae import ARCHITECTURE, SAGSAE, SAGSAEConfig
from sign_sae.storage import load_sae
from sign_sae.training_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig


def register() -> None:
    """Register SA-GSAE with SAELens; safe to call any number of times."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, SAGSAE, SAGSAEConfig)
    if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(ARCHITECTURE, SAGSAETrainingSAE, SAGSAETrainingSAEConfig)


register()
import sign_sae.releases  # noqa: E402, F401  (installs the release loader; idempotent)

__all__ = [
    "ARCHITECTURE",
    "SAGSAE",
    "SAGSAEConfig",
    "SAGSAETrainingSAE",
    "SAGSAETrainingSAEConfig",
    "bi_jump_relu",
    "load_sae",
    "register",
]
