"""Antipodal pairs planted in non-negative SAEs, and the signed initialisation that merges them."""

import json

import pytest
import torch
from sae_lens import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata, TrainStepInput

from analyses import pairs
from analyses.pairs import AntipodalPairs
from sign_sae import SAGSAE, SAGSAEConfig
from sign_sae.errors import SignSAEError
from sign_sae.export import to_signed_init

HOOK = "blocks.0.hook_resid_post"


def basis(d: int = 12, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q.T  # rows orthonormal


def planted_sae() -> StandardSAE:
    """(0, 1): exactly opposite, never co-fire. (2, 3): cos -0.3. (4, 5): opposite decoders but
    the same encoder, so they always co-fire. 6, 7, 8: 7 and 8 both oppose 6 (cos -1, -0.95)."""
    q = basis()
    dec = torch.stack(
        [
            q[0], -q[0],
            q[1], -0.3 * q[1] + (1 - 0.09) ** 0.5 * q[2],
            q[3], -q[3],
            q[4], -q[4], -0.95 * q[4] + (1 - 0.95**2) ** 0.5 * q[5],
            q[6],
        ]
    )  # fmt: skip
    enc = dec.T.clone()
    enc[:, 5] = q[3]
    sae = StandardSAE(StandardSAEConfig(d_in=12, d_sae=10, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(enc)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def activations(n: int = 3000) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(1))


def test_geometry_finds_planted_pairs_and_not_the_others() -> None:
    found = pairs.antipodal_pairs(planted_sae())
    assert set(found.as_tuples()) == {(0, 1), (4, 5), (6, 7)}
    assert found.n_candidates == 4  # (6, 8) is a candidate that loses to (6, 7)
    assert found.dictionary_share == pytest.approx(0.6)
    assert all(p.cofire is None for p in found.pairs)
    assert all(p.cos == pytest.approx(-1.0, abs=1e-6) for p in found.pairs)


def test_cofiring_filters_pairs_that_fire_together() -> None:
    found = pairs.antipodal_pairs(planted_sae(), activations=[activations()])
    assert set(found.as_tuples()) == {(0, 1), (6, 7)}
    p = found.pairs[[q.i for q in found.pairs].index(0)]
    assert p.n_both == 0 and p.cofire == 0.0
    assert 1300 < p.n_i < 1700 and p.n_i + p.n_j == 3000
    # relu(z) vs relu(-z) for z ~ N(0, 1): corr = -(1/(2 pi)) / (1/2 - 1/(2 pi)) = -0.466.
    assert p.correlation == pytest.approx(-0.466, abs=0.04)
    assert found.n_tokens == 3000
    df = found.to_dataframe()
    assert list(df.columns[:3]) == ["i", "j", "cos"] and len(df) == 2


def test_blockwise_search_matches_one_block() -> None:
    sae = planted_sae()
    assert pairs.antipodal_pairs(sae, block_size=3) == pairs.antipodal_pairs(sae)


def test_streaming_cofiring_matches_one_batch() -> None:
    sae, x = planted_sae(), activations()
    whole = pairs.antipodal_pairs(sae, activations=[x])
    parts = pairs.antipodal_pairs(sae, activations=list(x.split(700)))
    assert parts.as_tuples() == whole.as_tuples()
    for a, b in zip(parts.pairs, whole.pairs, strict=True):
        assert (a.n_i, a.n_j, a.n_both) == (b.n_i, b.n_j, b.n_both)
        assert a.correlation == pytest.approx(b.correlation)


def test_json_round_trip() -> None:
    found = pairs.antipodal_pairs(planted_sae(), activations=[activations(500)])
    assert AntipodalPairs.from_dict(json.loads(json.dumps(found.to_dict()))) == found


def test_bad_arguments() -> None:
    with pytest.raises(SignSAEError, match="cos_threshold"):
        pairs.antipodal_pairs(planted_sae(), cos_threshold=0.5)
    with pytest.raises(SignSAEError, match="model and tokens"):
        pairs.antipodal_pairs(planted_sae(), tokens=torch.zeros(1, 3, dtype=torch.long))


def test_matching_pair_finds_both_sides() -> None:
    signed = SAGSAE(SAGSAEConfig(d_in=12, d_sae=3))
    with torch.no_grad():
        signed.W_dec.copy_(basis()[[6, 0, 1]] * 3.0)
    assert pairs.matching_pair(signed, 1, planted_sae()) == (0, 1)


def planted_jumprelu() -> JumpReLUSAE:
    g = torch.Generator().manual_seed(2)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=5, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(5, 8, generator=g))
        sae.W_dec[1] = -2.0 * sae.W_dec[0] / sae.W_dec[0].norm()
        sae.W_enc.copy_(torch.randn(8, 5, generator=g))
        c = sae.W_dec.norm(dim=1)
        sae.W_enc[:, 1] = -(c[0] / c[1]) * sae.W_enc[:, 0]
        sae.b_enc.copy_(-0.3 * torch.rand(5, generator=g))
        sae.threshold.copy_(0.2 + torch.rand(5, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(8, generator=g))
    return sae


def planted_gated() -> GatedSAE:
    g = torch.Generator().manual_seed(3)
    sae = GatedSAE(GatedSAEConfig(d_in=8, d_sae=5, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(5, 8, generator=g))
        sae.W_dec[3] = -0.5 * sae.W_dec[1] / sae.W_dec[1].norm()
        sae.W_enc.copy_(torch.randn(8, 5, generator=g))
        c = sae.W_dec.norm(dim=1)
        sae.W_enc[:, 3] = -(c[1] / c[3]) * sae.W_enc[:, 1]
        sae.b_gate.copy_(-0.5 * torch.rand(5, generator=g))
        sae.r_mag.copy_(0.3 * torch.randn(5, generator=g))
        sae.b_mag.copy_(0.2 * torch.randn(5, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(8, generator=g))
    return sae


@pytest.mark.parametrize(("make", "pair"), [(planted_jumprelu, (0, 1)), (planted_gated, (1, 3))])
def test_signed_init_reproduces_an_exact_pair(make, pair) -> None:
    sae = make()
    signed = to_signed_init(sae, [pair])
    assert signed.cfg.d_sae == 4 and signed.cfg.metadata.hook_name == HOOK
    x = 2 * torch.randn(2000, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        f_src, f_new = sae.encode(x), signed.encode(x)
        assert torch.allclose(sae.decode(f_src), signed.decode(f_new), atol=1e-5)
        i, j = pair
        # The merged latent is latent 0: +side = i, -side = j, in unit-decoder units.
        c = sae.W_dec.norm(dim=1)
        assert torch.allclose(f_new[:, 0], c[i] * f_src[:, i] - c[j] * f_src[:, j], atol=1e-5)
        assert (f_new[:, 0] < 0).any() and (f_new[:, 0] > 0).any()
        others = [k for k in range(5) if k not in pair]
        assert torch.allclose(f_new[:, 1:], c[others] * f_src[:, others], atol=1e-5)
        assert (f_new[:, 1:] >= 0).all()


def test_signed_init_tied_trains_without_nan() -> None:
    signed = to_signed_init(planted_jumprelu(), [(0, 1)], tied=True)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    out = signed.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"sparsity": 1.0},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in signed.parameters() if p.grad is not None)


def test_signed_init_rejects_signed_sources_and_reused_latents() -> None:
    with pytest.raises(SignSAEError, match="architecture"):
        to_signed_init(SAGSAE(SAGSAEConfig(d_in=4, d_sae=4)), [(0, 1)])
    with pytest.raises(SignSAEError, match="distinct"):
        to_signed_init(planted_jumprelu(), [(0, 1), (1, 2)])
