"""Sign-aware metrics: negative-only latents are alive; R^2 is around the mean."""

import pytest
import torch

from sign_sae.metrics import (
    BIPOLAR_BALANCE,
    LatentStats,
    ReconstructionStats,
    SequenceStats,
    balance,
    bipolar_fraction,
    explained_variance,
    l0,
)


def test_negative_only_latent_is_alive_and_counted():
    f = torch.tensor([[0.0, -1.0, 2.0], [0.0, -0.5, 0.0]])
    stats = LatentStats(3)
    stats.update(f)
    assert l0(f) == pytest.approx(1.5)
    assert stats.l0 == pytest.approx(1.5)
    assert stats.alive.tolist() == [False, True, True]
    assert stats.dead_fraction == pytest.approx(1 / 3)
    assert stats.n_neg.tolist() == [0, 2, 0]
    assert stats.mass_neg.tolist() == [0, 1.5, 0]
    assert stats.balance.tolist() == [0, 0, 0]


def test_balance_of_bipolar_latent():
    assert balance(torch.tensor([5.0, 0.0]), torch.tensor([5.0, 0.0])).tolist() == [0.5, 0.0]


def test_explained_variance_is_around_the_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) + 10.0  # a large mean
    x_hat = x.mean(0, keepdim=True).expand_as(x)  # predicting the mean explains nothing
    assert explained_variance(x, x_hat) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(x, x) == pytest.approx(1.0)


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    x_hat = torch.randn(300, 4, generator=g, dtype=torch.float64)
    s = ReconstructionStats()
    for a, b in zip(x.split(70), x_hat.split(70), strict=True):
        s.update(a, b)
    assert s.explained_variance == pytest.approx(explained_variance(x, x_hat), rel=1e-12)
    assert s.mse == pytest.approx((x - x_hat).pow(2).sum(-1).mean().item(), rel=1e-9)


def test_bipolar_fraction_counts_alive_latents_at_the_one_cut_off():
    # latent 0: balance exactly 0.1 (bipolar); 1: 1/11 (not); 2: one-signed; 3: dead
    stats = LatentStats(4)
    stats.update(torch.tensor([[1.0, 1.0, -1.0, 0.0]] * 9 + [[-1.0, 1.0, -1.0, 0.0]]))
    stats.update(torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
    assert BIPOLAR_BALANCE == 0.1 and stats.balance[0].item() == pytest.approx(0.1)
    assert bipolar_fraction(stats) == pytest.approx(1 / 3)  # of the 3 alive latents
    assert bipolar_fraction(stats, threshold=0.05) == pytest.approx(2 / 3)
    assert bipolar_fraction(LatentStats(4)) == 0.0  # none alive


def test_sequence_stats_reweight_sequences_like_duplicating_them():
    """R^2 and L0 from per-sequence sums equal the direct metrics, and a weight of k on a
    sequence equals repeating it k times (what a bootstrap draw means)."""
    g = torch.Generator().manual_seed(0)
    n_seq, rows, d = 5, 7, 6
    x = torch.randn(n_seq * rows, d, generator=g) * 2 + 1
    x_hat = x + 0.3 * torch.randn(x.shape, generator=g)
    f = torch.randn(n_seq * rows, 9, generator=g) * (torch.rand(n_seq * rows, 9, generator=g) < 0.3)
    stats = SequenceStats.cat(
        [
            SequenceStats.of(x[:14], x_hat[:14], f[:14], rows),
            SequenceStats.of(x[14:], x_hat[14:], f[14:], rows),
        ]
    )
    assert stats.r2() == pytest.approx(explained_variance(x, x_hat), rel=1e-12)
    recon = ReconstructionStats()
    recon.update(x, x_hat)
    assert stats.mse() == pytest.approx(recon.mse, rel=1e-12)
    assert stats.l0() == pytest.approx(l0(f), rel=1e-6)  # l0() averages in float32
    w = torch.tensor([0, 3, 1, 0, 1])
    keep = torch.cat(
        [torch.arange(i * rows, (i + 1) * rows) for i in range(n_seq) for _ in range(int(w[i]))]
    )
    assert stats.r2(w) == pytest.approx(explained_variance(x[keep], x_hat[keep]), rel=1e-12)
    assert stats.l0(w) == pytest.approx(l0(f[keep]), rel=1e-6)
    assert stats.r2(w) != pytest.approx(stats.r2())
    with pytest.raises(ValueError, match="whole sequences"):
        SequenceStats.of(x[:10], x_hat[:10], f[:10], rows)
