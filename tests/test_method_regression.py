"""Regression guard for the default SA-GSAE on real activations, judged on the validation split.

A fixed small set of SmolLM2-135M layer-15 MLP-out activations (32k tokens of the training
plays; 32 sequences of the validation plays for the metrics), made here from the default model.
SA-GSAE with the library's defaults at width H = d_model and SAELens's Gated SAE at 2H train
with one recipe at two sparsity coefficients each; ``analyses.gaps.bootstrap_gap`` compares
their R^2-L0 frontiers over the L0 overlap on the validation sequences.

This is a small-data regime (each token seen eight times), not evidence about the method: the
fair benchmark (docs/results.md) is. What the test holds is the number it measured when it was
recorded: the mean gap of SA-GSAE over Gated across their L0 overlap (51-134), +0.052, with a
95% bootstrap interval over the validation sequences of [+0.048, +0.057]. A change to the default SA-GSAE (or the trainer) that
moves the gap below that interval's lower bound, ``MARGIN``, fails; so does one that lets either
SAE go dense or dead.
"""

import pytest
import torch

from analyses.gaps import bootstrap_gap
from sign_sae.architectures import make_training_sae
from sign_sae.metrics import LatentStats, SequenceStats
from sign_sae.trainer import TensorBatches, TrainConfig, train

RECIPE = dict(
    total_steps=500, batch_size=512, lr=1e-3, lr_warm_up_steps=15, lr_decay_steps=100, log_every=500
)
SA_COEFFICIENTS, GATED_COEFFICIENTS = (2.0, 6.0), (1.5, 5.0)
ROWS_PER_SEQUENCE = 127  # 128-token rows without BOS
MARGIN = 0.047  # the lower bound of the recorded interval of the mean gap (module doc)


@pytest.fixture(scope="module")
def curves(mlp_out_activations) -> dict[str, dict[float, list[SequenceStats]]]:
    train_acts, held = mlp_out_activations
    d = train_acts.shape[1]
    out: dict[str, dict[float, list[SequenceStats]]] = {}
    for arch, width, coefficients in (
        ("sa_gsae", d, SA_COEFFICIENTS),
        ("gated", 2 * d, GATED_COEFFICIENTS),
    ):
        for c in coefficients:
            torch.manual_seed(0)
            sae = make_training_sae(arch, d, width, c, warm_up_steps=RECIPE["total_steps"] // 10)
            batches = TensorBatches(train_acts, RECIPE["batch_size"])
            train(sae, batches, TrainConfig(**RECIPE), progress=False)
            with torch.no_grad():
                f = sae.encode(held)
                stats = LatentStats(width)
                stats.update(f)
                assert stats.dead_fraction < 0.05, (arch, c, stats.dead_fraction)
                seqs = SequenceStats.of(held, sae.decode(f), f, ROWS_PER_SEQUENCE)
            out.setdefault(arch, {})[c] = [seqs]
    return out


def test_the_default_sa_gsae_keeps_its_recorded_gap_over_gated_2h(curves):
    for curve in curves.values():  # both are frontiers: sparse, and more sparsity costs R^2
        (lo, r2_lo), (hi, r2_hi) = sorted((s[0].l0(), s[0].r2()) for s in curve.values())
        assert 2 < lo < hi < 200 and r2_lo < r2_hi
    gap = bootstrap_gap(curves["sa_gsae"], curves["gated"], ("sa_gsae_H", "gated_2H"), n_boot=300)
    assert gap.overlap is not None and gap.overlap[1] / gap.overlap[0] > 1.5, gap
    assert gap.mean_gap > MARGIN, gap
