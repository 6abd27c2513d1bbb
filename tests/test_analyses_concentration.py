"""Concentration of minority-sign mass on hand-made censuses with known answers."""

import json
import math

import pytest
import torch

from analyses import concentration
from analyses.concentration import Concentration
from analyses.polarity import PolarityCensus
from sign_sae.errors import SignSAEError


def hand_census() -> PolarityCensus:
    """Minority masses 4, 1, 3, 2 for latents 0-3; latent 4 unipolar (0); latent 5 dead."""
    return PolarityCensus(
        n_pos=torch.tensor([5, 1, 9, 2, 7, 0]),
        n_neg=torch.tensor([4, 8, 3, 2, 0, 0]),
        mass_pos=torch.tensor([4.0, 1.0, 6.0, 2.0, 5.0, 0.0], dtype=torch.float64),
        mass_neg=torch.tensor([8.0, 9.0, 3.0, 2.0, 0.0, 0.0], dtype=torch.float64),
        n_tokens=10,
    )


def test_top_k_shares_have_the_known_values() -> None:
    conc = concentration.top_latents(hand_census(), k=[1, 2, 3, 50])
    assert conc.share == pytest.approx([0.4, 0.7, 0.9, 1.0])
    assert conc.top_latents.tolist() == [0, 2, 3, 1, 4]
    assert conc.total_minority_mass == 10.0
    assert conc.minority_fraction == pytest.approx(10 / 40)
    assert conc.n_alive == 5
    assert conc.curve.tolist() == pytest.approx([0.4, 0.7, 0.9, 1.0, 1.0])
    assert conc.share_at(2) == pytest.approx(0.7)
    assert conc.to_dataframe().loc[3, "share"] == pytest.approx(0.9)


def test_gini() -> None:
    assert concentration.gini(torch.full((7,), 2.5)) == pytest.approx(0.0)
    assert concentration.gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)
    assert concentration.gini(torch.tensor([1.0, 3.0])) == pytest.approx(0.25)
    assert math.isnan(concentration.gini(torch.zeros(3)))
    # Over the alive latents of the hand census: masses 4, 1, 3, 2, 0.
    want = sum(abs(a - b) for a in [4, 1, 3, 2, 0] for b in [4, 1, 3, 2, 0]) / (2 * 25 * 2)
    assert concentration.top_latents(hand_census()).gini == pytest.approx(want)


def test_non_negative_census_has_no_shares() -> None:
    c = hand_census()
    c.n_neg.zero_()
    c.mass_neg.zero_()
    conc = concentration.top_latents(c, k=[1])
    assert math.isnan(conc.share[0]) and math.isnan(conc.gini)
    assert conc.minority_fraction == 0.0


def test_rejects_non_positive_k() -> None:
    with pytest.raises(SignSAEError, match="k must be positive"):
        concentration.top_latents(hand_census(), k=[0])


def test_json_round_trip_with_nan() -> None:
    conc = concentration.top_latents(hand_census())
    assert Concentration.from_dict(json.loads(json.dumps(conc.to_dict()))) == conc
    c = hand_census()
    c.mass_neg.zero_()
    empty = concentration.top_latents(c)
    assert Concentration.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


def test_compare_across_hookpoints() -> None:
    df = concentration.compare({"mlp_out": hand_census(), "attn_out": hand_census()}, k=[1, 2])
    assert list(df.index) == ["mlp_out", "attn_out"]
    assert df.loc["mlp_out", "top1_share"] == pytest.approx(0.4)
    assert df.loc["attn_out", "bipolar_fraction"] == pytest.approx(4 / 5)
    assert df.loc["mlp_out", "dead_fraction"] == pytest.approx(1 / 6)
    assert {"null_bipolar_fraction", "gini", "l0", "top2_share"} <= set(df.columns)
