"""The one evaluator against a from-scratch reference: three full forward passes per batch,
no cached activations, log-probs or residual streams, no ``start_at_layer``."""

from math import nan

import pytest
import torch
from sae_lens import HookedSAETransformer
from torch.nn import functional as F
from transformer_lens import HookedTransformerConfig

from sign_sae.architectures import make_training_sae
from sign_sae.evaluate import HeldOut, evaluate, held_out

CONTEXT = 16
HOOK = "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=CONTEXT, d_head=4, n_heads=4, d_mlp=32, d_vocab=40,
        act_fn="gelu", normalization_type="RMS",
    )  # fmt: skip
    return HookedSAETransformer(cfg).eval()


@pytest.fixture(scope="module")
def sae():
    """Bipolar, one-signed and (thresholds out of reach) dead latents."""
    torch.manual_seed(1)
    sae = make_training_sae(
        "sa_gsae", 16, 24, 1.0, threshold_init=0.05, metadata={"hook_name": HOOK}
    )
    with torch.no_grad():
        sae.raw_threshold_pos[:3] = 1e3
        sae.raw_threshold_neg[:3] = 1e3
    return sae


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 40, (6, CONTEXT), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def reference(sae, model, tokens, ce_rows=None) -> dict[str, float]:
    """Every metric from its definition (docs/metrics.md), BOS excluded."""
    clean, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    acts = cache[HOOK][:, 1:]
    feats = sae.encode(acts)
    x_hat = sae.decode(feats)

    def put(value):
        def fn(act, hook):
            act = act.clone()
            act[:, 1:] = value
            return act

        return fn

    rows = slice(0, ce_rows)
    t = tokens[rows]
    spliced = model.run_with_hooks(t, fwd_hooks=[(HOOK, put(x_hat[rows]))])
    zero = model.run_with_hooks(t, fwd_hooks=[(HOOK, put(0.0))])

    def ce(logits):
        return F.cross_entropy(logits[:, 1:-1].flatten(0, 1), t[:, 2:].flatten()).item()

    logp, logp_clean = spliced[:, 1:-1].log_softmax(-1), clean[rows][:, 1:-1].log_softmax(-1)
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).mean().item()
    x, xh = acts.reshape(-1, 16).double(), x_hat.reshape(-1, 16).double()
    f = feats.reshape(-1, 24)
    n_pos, n_neg = (f > 0).sum(0).double(), (f < 0).sum(0).double()
    alive = n_pos + n_neg > 0
    balance = torch.minimum(n_pos, n_neg)[alive] / (n_pos + n_neg)[alive]
    ce_clean, ce_sae, ce_zero = ce(clean[rows]), ce(spliced), ce(zero)
    return {
        "r2": 1 - ((x - xh) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item(),
        "mse": ((x - xh) ** 2).sum(-1).mean().item(),
        "l0": (f != 0).sum(-1).double().mean().item(),
        "dead_fraction": 1 - alive.double().mean().item(),
        "bipolar_fraction": (balance >= 0.1).double().mean().item(),
        "ce_clean": ce_clean,
        "ce_with_sae": ce_sae,
        "ce_zero_ablation": ce_zero,
        "ce_loss_recovered": (ce_zero - ce_sae) / gap if (gap := ce_zero - ce_clean) > 0 else nan,
        "kl_with_sae": kl,
    }


def _acts(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
    return cache[HOOK][:, 1:].reshape(-1, 16)


@pytest.mark.parametrize("cached", [True, False], ids=["logprobs cached", "clean rerun"])
def test_shared_passes_give_the_reference_metrics(tiny, sae, tokens, cached):
    held = HeldOut(tiny, tokens, {HOOK: _acts(tiny, tokens)}, batch_size=4,
                   max_cache_bytes=2**30 * cached)  # fmt: skip
    assert held.cache_logprobs is cached and held.layers == {HOOK: 1}  # spliced from block 1
    got = held.evaluate(sae).to_dict()
    want = reference(sae, tiny, tokens)
    assert 0 < want["bipolar_fraction"] < 1 and 0 < want["dead_fraction"] < 1
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)
    assert got["n_tokens"] == 6 * (CONTEXT - 1) and held.n_ce_tokens == 6 * (CONTEXT - 2)
    assert got["hook"] == HOOK and got["d_sae"] == 24 and got["architecture"] == "sa_gsae"
    sequences = held.evaluate(sae).sequences  # the per-sequence sums behind r2 and l0
    assert sequences.n_tokens.tolist() == [CONTEXT - 1] * 6 and "sequences" not in got
    assert sequences.r2() == pytest.approx(got["r2"], rel=1e-9)
    assert sequences.l0() == pytest.approx(got["l0"], rel=1e-9)


def test_ce_and_kl_read_the_first_ce_rows_and_the_rest_all_rows(tiny, sae, tokens):
    got = held_out(tiny, tokens, [HOOK], ce_rows=3, batch_size=2).evaluate(sae).to_dict()
    want = reference(sae, tiny, tokens, ce_rows=3)
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)


def test_evaluate_is_the_evaluator_on_activations_read_now(tiny, sae, tokens):
    got = evaluate(sae, tiny, tokens, batch_size=4).to_dict()
    want = HeldOut(tiny, tokens, {HOOK: _acts(tiny, tokens)}).evaluate(sae, HOOK).to_dict()
    floats = {k for k, v in want.items() if isinstance(v, float)}
    assert {k: got[k] for k in floats} == pytest.approx(
        {k: want[k] for k in floats}, rel=1e-6, nan_ok=True
    )
    assert {k: got[k] for k in want.keys() - floats} == {k: want[k] for k in want.keys() - floats}


def test_refusals_name_the_problem(tiny, sae, tokens):
    with pytest.raises(ValueError, match="one per token without BOS"):
        HeldOut(tiny, tokens, {HOOK: torch.zeros(32, 16)})
    with pytest.raises(ValueError, match="Unknown hook 'blocks.1.hook_mlp'"):
        HeldOut(tiny, tokens, {"blocks.1.hook_mlp": torch.zeros(90, 16)})
    with pytest.raises(ValueError, match="No held-out activations at 'blocks.0.hook_mlp_out'"):
        held_out(tiny, tokens, [HOOK]).evaluate(sae, "blocks.0.hook_mlp_out")
