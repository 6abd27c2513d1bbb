"""Polarity census on planted SAEs: signs counted with != 0 / > 0 / < 0, streaming-exact."""

import json
import math
from itertools import product

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from analyses import polarity
from analyses.polarity import PolarityCensus
from sign_sae import SAGSAE, SAGSAEConfig
from sign_sae.errors import SignSAEError

HOOK = "blocks.0.hook_resid_post"


def identity_sagsae(d: int = 6, threshold: float = 0.2) -> SAGSAE:
    """Latent k reads and writes coordinate k: its sign is the sign of x_k beyond the threshold."""
    sae = SAGSAE(SAGSAEConfig(d_in=d, d_sae=d, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.threshold_pos.fill_(threshold)
        sae.threshold_neg.fill_(threshold)
    return sae


def planted_activations(n: int = 4000, d: int = 6, seed: int = 0) -> torch.Tensor:
    """Coordinate 0: both signs; 1: negative only; 2: positive only; 3: never past threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 1] = -x[:, 1].abs() - 0.5
    x[:, 2] = x[:, 2].abs() + 0.5
    x[:, 3] = 0.1 * x[:, 3].clamp(-1, 1)
    return x


def test_negative_only_latent_is_alive_and_unipolar() -> None:
    c = polarity.census_from_activations(identity_sagsae(), [planted_activations()])
    assert c.n_neg[1] == 4000 and c.n_pos[1] == 0
    assert bool(c.alive[1]) and c.balance[1] == 0
    assert c.n_pos[2] == 4000 and c.balance[2] == 0
    assert not bool(c.alive[3]) and c.dead_fraction == pytest.approx(1 / 6)
    assert c.mass_neg[1] > 0 and c.mass_pos[1] == 0


def test_symmetric_latent_has_balance_near_half() -> None:
    c = polarity.census_from_activations(identity_sagsae(), [planted_activations()])
    assert abs(c.balance[0].item() - 0.5) < 0.03
    assert c.mass_pos[0].item() == pytest.approx(c.mass_neg[0].item(), rel=0.1)


def test_bipolar_fraction_counts_alive_latents_only() -> None:
    c = polarity.census_from_activations(identity_sagsae(), [planted_activations()])
    # alive: 0, 1, 2, 4, 5; bipolar: 0, 4, 5 (standard normal coordinates).
    assert c.bipolar_fraction(0.1) == pytest.approx(3 / 5)
    assert c.bipolar_fraction(0.1, among="all") == pytest.approx(3 / 6)
    curve = c.balance_curve([0.0, 0.1, 0.6])
    assert curve == [1.0, pytest.approx(3 / 5), 0.0]


def test_non_negative_sae_is_never_bipolar() -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=6, d_sae=8, metadata=SAEMetadata(hook_name=HOOK)))
    c = polarity.census_from_activations(sae, [planted_activations()])
    assert int(c.n_neg.sum()) == 0 and int(c.n_pos.sum()) > 0
    assert c.bipolar_fraction(0.01) == 0.0


def test_streaming_in_batches_equals_one_batch() -> None:
    sae = identity_sagsae()
    x = planted_activations(n=600).reshape(20, 30, 6)
    whole = polarity.census_from_activations(sae, [x], exclude_bos=True, top_examples=4)
    parts = polarity.census_from_activations(
        sae, list(x.split(3)), exclude_bos=True, top_examples=4
    )
    assert parts == whole
    assert whole.n_tokens == 20 * 29
    assert torch.equal(parts.top_neg.seq, whole.top_neg.seq)


def test_top_examples_match_brute_force() -> None:
    sae = identity_sagsae()
    x = planted_activations(n=600).reshape(20, 30, 6)
    c = polarity.census_from_activations(sae, list(x.split(7)), top_examples=5)
    f = sae.encode(x).detach()
    for latent, sign in product(range(6), "+-"):
        vals = f[..., latent] if sign == "+" else -f[..., latent]
        order = vals.flatten().argsort(descending=True)[:5]
        expected = [
            (int(r // 30), int(r % 30), float(f.flatten(0, 1)[r, latent]))
            for r in order
            if vals.flatten()[r] > 0
        ]
        got = c.examples(latent, sign)
        assert [(s, p) for s, p, _ in got] == [(s, p) for s, p, _ in expected]
        assert [v for *_, v in got] == pytest.approx([v for *_, v in expected])
    assert c.examples(3, "+") == [] and c.examples(1, "+") == []


def test_top_examples_are_capped() -> None:
    with pytest.raises(SignSAEError, match="top_examples"):
        polarity.census_from_activations(identity_sagsae(), [], top_examples=1000)


def test_json_round_trip() -> None:
    c = polarity.census_from_activations(
        identity_sagsae(), [planted_activations(n=50)], top_examples=2
    )
    back = PolarityCensus.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    assert back.n_pos.dtype == torch.int64 and back.mass_pos.dtype == torch.float64
    assert back.to_dataframe().equals(c.to_dataframe())


def test_expected_null_balance_is_exact() -> None:
    n = torch.arange(0, 13)
    c = PolarityCensus(
        n_pos=n,
        n_neg=torch.zeros_like(n),
        mass_pos=n.double(),
        mass_neg=0 * n.double(),
        n_tokens=20,
    )
    for k, got in zip(n.tolist(), c.expected_null_balance().tolist(), strict=True):
        want = sum(math.comb(k, j) * min(j, k - j) / k for j in range(k + 1)) / 2**k if k else 0.0
        assert got == pytest.approx(want, abs=1e-12)


def test_sign_flip_null_keeps_counts_and_is_seeded() -> None:
    c = polarity.census_from_activations(identity_sagsae(), [planted_activations()])
    null = c.sign_flip_null(seed=3)
    assert torch.equal(null.n_fired, c.n_fired)
    assert null == c.sign_flip_null(seed=3)
    # The unipolar latents 1 and 2 look bipolar under the null.
    assert (null.balance[[1, 2]] > 0.45).all()
    assert torch.allclose(null.mass_pos + null.mass_neg, c.mass_pos + c.mass_neg)


def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=6,
        n_ctx=16,
        d_head=3,
        n_heads=2,
        d_vocab=30,
        act_fn="relu",
        normalization_type="RMS",
    )
    return HookedTransformer(cfg)


def test_census_on_a_model_streams_the_hook() -> None:
    model, sae = tiny_model(), identity_sagsae()
    tokens = torch.randint(0, 30, (5, 8), generator=torch.Generator().manual_seed(1))
    c = polarity.census(sae, model, tokens, batch_size=2, top_examples=2)
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    ref = polarity.census_from_activations(
        sae, [cache[HOOK]], exclude_bos=True, top_examples=2, hook_name=HOOK
    )
    assert torch.equal(c.n_pos, ref.n_pos) and torch.equal(c.n_neg, ref.n_neg)
    assert torch.allclose(c.mass_pos, ref.mass_pos) and torch.allclose(c.mass_neg, ref.mass_neg)
    assert c.n_tokens == 5 * 7 and c.hook_name == HOOK
    assert all(pos >= 1 for _, pos, _ in c.examples(0, "+") + c.examples(0, "-"))


def test_census_needs_a_hook_name() -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=6, d_sae=4))
    with pytest.raises(SignSAEError, match="hook"):
        polarity.census(sae, tiny_model(), torch.zeros(1, 4, dtype=torch.long))
