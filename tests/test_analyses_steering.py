"""Logit lens and steering dials on a tiny random transformer with planted SAEs."""

import json
import math

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from analyses import logit_lens, steering
from analyses.steering import Dial, DialComparison, DialSpec
from sign_sae.errors import SignSAEError

D, VOCAB = 8, 30
LAST = "blocks.1.hook_resid_post"


def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D,
        n_ctx=16,
        d_head=4,
        n_heads=2,
        d_vocab=VOCAB,
        act_fn="relu",
        normalization_type="RMS",
    )
    return HookedTransformer(cfg)


def orthonormal_sae(rows: torch.Tensor, hook: str = LAST) -> StandardSAE:
    """W_enc = W_dec^T with unit rows, no biases: each latent reads and writes one direction."""
    sae = StandardSAE(
        StandardSAEConfig(d_in=D, d_sae=rows.shape[0], metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def basis() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))
    return q.T


PROMPTS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))


def test_logit_lens_reads_planted_tokens() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.W_U[0].zero_()
        model.W_U[0, 3], model.W_U[0, 7] = 5.0, -4.0
        model.ln_final.w[0] = 2.0
    lens = logit_lens.logit_lens(model, 0.3 * torch.eye(D)[0], k=2)
    assert lens.pos_ids[0] == 3 and lens.pos_logits[0] == pytest.approx(10.0)
    assert lens.neg_ids[0] == 7 and lens.neg_logits[0] == pytest.approx(8.0)
    assert lens.pos_tokens[0] == "3"  # no tokenizer: the id as text
    assert logit_lens.LogitLens.from_dict(json.loads(json.dumps(lens.to_dict()))) == lens
    assert list(lens.to_dataframe().columns) == ["pos_token", "pos_logit", "neg_token", "neg_logit"]
    with pytest.raises(SignSAEError, match="d_model"):
        logit_lens.logit_lens(model, torch.ones(D + 1))


def test_add_dial_kl_grows_with_alpha_and_is_monotone() -> None:
    model, sae = tiny_model(), orthonormal_sae(basis()[:3])
    alphas = [-8, -4, -2, 0, 2, 4, 8]
    result = steering.dial(model, sae, 1, DialSpec(alphas, PROMPTS, k_tokens=3))
    kl = {p.alpha: p.kl for p in result.points}
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert kl[2] < kl[4] < kl[8] and kl[-2] < kl[-4] < kl[-8]
    assert all(math.isfinite(p.effect) for p in result.points)
    # At the last layer the direction writes straight into the logits: a clean dial.
    assert result.monotonicity == pytest.approx(1.0)
    assert result.antisymmetry > 0.5
    assert result.points[-1].shift_pos > 0 > result.points[-1].shift_neg
    assert len(result.points[0].promoted) == 3 and result.latents == [1]
    assert list(result.to_dataframe()["alpha"]) == alphas


def test_clamp_sets_the_latent_and_leaves_the_others() -> None:
    sae = orthonormal_sae(basis()[:3] * 2.0)  # decoder norm 2: clamp value = amount / 2
    hook = steering.steering_hook(sae, 1, amount=3.0, mode="clamp")
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # W_enc = W_dec^T with norm-2 rows: encode scales by 4, so compare decoded parts.
        before, after = sae.encode(x), sae.encode(hook(x, None))
        assert torch.allclose(after[..., [0, 2]], before[..., [0, 2]], atol=1e-5)
        moved = hook(x, None) - x
        assert torch.allclose(moved, (1.5 - before[..., 1:2]) * sae.W_dec[1], atol=1e-5)


def test_add_hook_moves_by_amount_along_the_unit_direction() -> None:
    sae = orthonormal_sae(basis()[:3] * 5.0)
    x = torch.zeros(1, 2, D)
    moved = steering.steering_hook(sae, 2, amount=-2.0, mode="add")(x, None)
    assert torch.allclose(moved[0, 1], -2.0 * basis()[2], atol=1e-6)
    with pytest.raises(SignSAEError, match="mode"):
        steering.steering_hook(sae, 0, 1.0, mode="scale")


def test_clamp_dial_runs_with_continuations() -> None:
    model, sae = tiny_model(), orthonormal_sae(basis()[:3], hook="blocks.0.hook_resid_post")
    result = steering.dial(model, sae, 2, DialSpec([-2, 0, 2], PROMPTS, "clamp", max_new_tokens=2))
    assert all(len(p.continuations) == 2 for p in result.points)
    assert all(len(c.split()) == 2 for c in result.points[0].continuations)
    assert result.points[1].kl > 0  # clamp at 0 ablates the latent
    assert Dial.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_compare_dial_with_an_exact_pair_matches_the_signed_latent() -> None:
    model, q = tiny_model(), basis()
    signed = orthonormal_sae(q[:2])  # its encoder is irrelevant in add mode
    gated = orthonormal_sae(torch.stack([q[1], q[5], -q[0], q[0]]))
    cmp = steering.compare_dial(model, signed, 0, gated, DialSpec([-4, 0, 4], PROMPTS))
    assert cmp.paired.latents == [3, 2]  # found by matching_pair
    for a, b in zip(cmp.signed.points, cmp.paired.points, strict=True):
        assert a.kl == pytest.approx(b.kl, abs=1e-6)
        assert a.effect == pytest.approx(b.effect, abs=1e-5)
    assert DialComparison.from_dict(json.loads(json.dumps(cmp.to_dict()))) == cmp
    assert len(cmp.to_dataframe()) == 6


def test_dial_scores() -> None:
    assert steering.spearman([1, 2, 3], [1, 5, 9]) == pytest.approx(1.0)
    assert steering.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(steering.spearman([1, 2, 3], [1, 1, 1]))
    assert steering.antisymmetry([-2, 0, 2], [-1.0, 0.0, 1.0]) == pytest.approx(1.0)
    assert steering.antisymmetry([-2, 0, 2], [1.0, 0.0, 1.0]) == pytest.approx(0.0)
    assert steering.antisymmetry([-1, 0, 1], [-0.5, 1.0, 3.0]) == pytest.approx(1 - 0.5 / 3.5)
    assert math.isnan(steering.antisymmetry([0, 1], [0.0, 1.0]))


def test_typical_scale() -> None:
    from analyses.polarity import PolarityCensus

    c = PolarityCensus(
        n_pos=torch.tensor([2, 0]),
        n_neg=torch.tensor([2, 0]),
        mass_pos=torch.tensor([3.0, 0.0], dtype=torch.float64),
        mass_neg=torch.tensor([5.0, 0.0], dtype=torch.float64),
        n_tokens=10,
    )
    sae = orthonormal_sae(basis()[:2] * 3.0)
    assert steering.typical_scale(c, sae, 0) == pytest.approx(2.0 * 3.0)
    with pytest.raises(SignSAEError, match="never fired"):
        steering.typical_scale(c, sae, 1)


def test_prompts_of_different_lengths_keep_their_order() -> None:
    model, sae = tiny_model(), orthonormal_sae(basis()[:3])
    prompts = [PROMPTS[0], PROMPTS[1][:4], PROMPTS[1]]
    together = steering.dial(model, sae, 1, DialSpec([3.0], prompts, max_new_tokens=3))
    alone = [steering.dial(model, sae, 1, DialSpec([3.0], [p], max_new_tokens=3)) for p in prompts]
    assert together.points[0].continuations == [a.points[0].continuations[0] for a in alone]
    n = [p.numel() for p in prompts]
    kl = sum(k * a.points[0].kl for k, a in zip(n, alone, strict=True)) / sum(n)
    assert together.points[0].kl == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", LAST])
def test_steered_passes_from_the_hook_block_equal_full_forwards(hook) -> None:
    """The dial runs the blocks before the steered hook once; its steered logits must equal a
    full forward with the same hook (a hook in the first block runs the whole model)."""
    model = tiny_model()
    u = basis()[0]
    for h in (hook, "blocks.0.hook_mlp_out"):
        fwd = [(h, lambda act, hook: act + 3.0 * u)]
        clean, run = steering._from_hook_block(model, h, [PROMPTS, PROMPTS[:1, :4]])
        with torch.inference_mode():
            want = [model.run_with_hooks(b, fwd_hooks=fwd) for b in (PROMPTS, PROMPTS[:1, :4])]
            plain = [model(b) for b in (PROMPTS, PROMPTS[:1, :4])]
            got = run(fwd)
        for g, w, c, p in zip(got, want, clean, plain, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            torch.testing.assert_close(c, p, rtol=0, atol=0)
            assert (g - c).abs().max() > 1e-3  # the hook did something
