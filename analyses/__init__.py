"""Analyses of signed and non-negative SAEs: polarity census, concentration of minority-sign
mass, antipodal pairs, logit lens and steering dials.

Every analysis works on SA-GSAE and on any SAELens SAE through ``sae.encode``, ``sae.decode``,
``sae.W_dec``, ``sae.cfg.metadata.hook_name`` and ``sae.cfg.d_sae``, streams over token batches
(or precomputed activation batches) and returns a dataclass with ``to_dict`` / ``from_dict``.
This package depends on ``sign_sae``; ``sign_sae`` never imports it.
"""

from analyses import concentration, logit_lens, pairs, polarity, steering

__all__ = ["concentration", "logit_lens", "pairs", "polarity", "steering"]
