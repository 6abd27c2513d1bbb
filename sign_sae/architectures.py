"""One constructor for every trainable architecture: SA-GSAE and the SAELens baselines.

Each architecture names its sparsity knob differently in SAELens; ``make_training_sae`` maps a
single ``sparsity`` number onto it (an L1 / L0 coefficient, or k for the TopK family).
"""

from typing import Any

from sae_lens import TrainingSAE, TrainingSAEConfig
from sae_lens.registry import get_sae_training_class

import sign_sae  # noqa: F401  (registers "sa_gsae")
from sign_sae.errors import SignSAEError
from sign_sae.storage import check_cfg_fields

# architecture -> (config field set by `sparsity`, its warm-up field or None)
ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "sa_gsae": ("sparsity_coefficient", "sparsity_warm_up_steps"),
    "gated": ("l1_coefficient", "l1_warm_up_steps"),
    "jumprelu": ("l0_coefficient", "l0_warm_up_steps"),
    "topk": ("k", None),
    "abstopk": ("k", None),
}


def training_config(
    arch: str,
    d_in: int,
    d_sae: int,
    sparsity: float,
    /,
    warm_up_steps: int = 0,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> TrainingSAEConfig:
    """The config of a fresh TrainingSAE of ``arch`` (see ``ARCHITECTURES``) with its sparsity
    set; unknown or wrongly typed ``options`` are named with the architecture's fields.

    The first four arguments are positional-only, so that every key of ``options`` (a sweep
    file's SAE options, passed on as written) reaches that check and is named there, even one
    spelt like an argument (``sparsity``, ``arch``), rather than clashing with it."""
    if arch not in ARCHITECTURES:
        raise SignSAEError(f"Unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    knob, warm = ARCHITECTURES[arch]
    cfg_cls = get_sae_training_class(arch)[1]
    value = int(sparsity) if knob == "k" else float(sparsity)
    kwargs = {"d_in": d_in, "d_sae": d_sae, knob: value, **options}
    if warm is not None:
        kwargs[warm] = warm_up_steps
    check_cfg_fields(kwargs, cfg_cls)
    cfg = cfg_cls(**kwargs)
    for key, val in (metadata or {}).items():
        cfg.metadata[key] = val
    return cfg


def make_training_sae(
    arch: str,
    d_in: int,
    d_sae: int,
    sparsity: float,
    /,
    warm_up_steps: int = 0,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> TrainingSAE:
    """A fresh TrainingSAE of ``arch`` built from ``training_config`` (same arguments)."""
    cfg = training_config(arch, d_in, d_sae, sparsity, warm_up_steps, metadata, **options)
    return get_sae_training_class(arch)[0](cfg)


def parameter_count(sae: Any) -> int:
    """Number of trainable numbers in the SAE (parameters, not buffers)."""
    return sum(p.numel() for p in sae.parameters())
