"""sign-sae: sign-aware gated sparse autoencoders (SA-GSAE) for SAELens and TransformerLens.

Importing this package registers the architecture ``"sa_gsae"`` with SAELens and adds the
``"sign_sae"`` release loader and the shipped releases to SAELens's tables (both idempotent);
it changes nothing else in SAELens. ``SAE.load_from_disk`` and ``SAE.from_pretrained`` then
return ``SAGSAE`` objects for SA-GSAE folders.
"""

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from sign_sae import releases
from sign_sae.releases import load_pretrained
from sign_sae.sa_gsae import (
    ARCHITECTURE,
    SAGSAE,
    SAGSAEConfig,
    SAGSAETrainingSAE,
    SAGSAETrainingSAEConfig,
    bi_jump_relu,
)
from sign_sae.storage import load_sae


def register() -> None:
    """Register SA-GSAE and the release loader with SAELens; safe to call any number of times."""
    if ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(ARCHITECTURE, SAGSAE, SAGSAEConfig)
    if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(ARCHITECTURE, SAGSAETrainingSAE, SAGSAETrainingSAEConfig)
    releases.install()


register()

__all__ = [
    "ARCHITECTURE",
    "SAGSAE",
    "SAGSAEConfig",
    "SAGSAETrainingSAE",
    "SAGSAETrainingSAEConfig",
    "bi_jump_relu",
    "load_pretrained",
    "load_sae",
    "register",
]
