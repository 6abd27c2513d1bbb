"""The fused training step (``sign_sae.fused``) equals the reference ops in every variant."""

import shutil

import pytest
import torch
from test_sa_gsae import make_sae, step_input

from sign_sae import SAGSAETrainingSAE
from sign_sae.trainer import TensorBatches, TrainConfig, train

D_IN, D_SAE, BATCH = 16, 48, 256
SHAPES = [
    dict(tied=True, two_sided=True),
    dict(tied=False, two_sided=True),
    dict(tied=True, two_sided=False),
]
VARIANTS = [{**shape, "aux_coefficient": aux} for shape in SHAPES for aux in (1.0, 0.0)]


def run(sae: SAGSAETrainingSAE, x: torch.Tensor, fused: bool, output_grads: bool):
    """One step's output and every parameter's gradient (None where it gets none)."""
    sae.fused = fused
    out = sae.training_forward_pass(step_input(x))
    assert ("SAGSAEStep" in type(out.losses["mse_loss"].grad_fn).__name__) == fused
    loss = out.loss
    if output_grads:  # gradients that enter through the returned tensors as well
        g = torch.Generator().manual_seed(1)
        w = torch.randn(out.feature_acts.shape, generator=g)
        loss = loss + (out.feature_acts * w).sum() + 0.5 * (out.hidden_pre * w).sum()
        loss = loss + (out.sae_out * torch.randn(out.sae_out.shape, generator=g)).sum()
    loss.backward()
    return out, {n: p.grad for n, p in sae.named_parameters()}


def assert_same_step(variant: dict, x: torch.Tensor, output_grads: bool = False) -> None:
    ref, ref_grads = run(make_sae(**variant), x, fused=False, output_grads=output_grads)
    out, grads = run(make_sae(**variant), x, fused=True, output_grads=output_grads)
    assert out.losses.keys() == ref.losses.keys()
    for k in ref.losses:
        torch.testing.assert_close(out.losses[k], ref.losses[k], atol=1e-5, rtol=1e-5, msg=k)
    # The gates are computed with the same operations: identical latents, bit for bit.
    assert torch.equal(out.feature_acts, ref.feature_acts)
    assert torch.equal(out.hidden_pre, ref.hidden_pre)
    torch.testing.assert_close(out.sae_out, ref.sae_out, atol=1e-5, rtol=1e-5)
    for name, g in ref_grads.items():
        assert (grads[name] is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("output_grads", [False, True])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_fused_step_equals_reference(variant, output_grads, x):
    assert_same_step(variant, x, output_grads)


@pytest.mark.parametrize("variant", SHAPES)
def test_fused_step_without_input_centering(variant, x):
    assert_same_step({**variant, "apply_b_dec_to_input": False}, x)


def test_fused_step_in_float64(x):
    assert_same_step({"dtype": "float64"}, x.double(), output_grads=True)


def test_fused_step_on_batch_sequence_input(x):
    assert_same_step({}, x.reshape(16, 16, D_IN), output_grads=True)


def test_fused_step_keeps_two_f_wide_tensors_for_backward(x):
    """p and f are kept for the backward; the reference ops keep many more."""

    def f_wide_saved(fused: bool) -> int:
        sae = make_sae()
        sae.fused = fused
        storages: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel() == BATCH * D_SAE:
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sae.training_forward_pass(step_input(x))
        return len(storages)

    assert f_wide_saved(fused=True) == 2
    assert f_wide_saved(fused=False) >= 6


def test_hooks_and_input_gradients_use_the_reference_path(x):
    sae = make_sae()
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.shape))
    out = sae.training_forward_pass(step_input(x))
    assert seen == [(BATCH, D_SAE)]
    assert "SAGSAEStep" not in type(out.losses["mse_loss"].grad_fn).__name__
    sae.reset_hooks()
    x_grad = x.clone().requires_grad_()
    sae.training_forward_pass(step_input(x_grad)).loss.backward()
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0


def test_training_runs_give_the_same_weights():
    data = torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    cfg = TrainConfig(total_steps=8, batch_size=256, lr=3e-3, log_every=4)
    trained = []
    for fused in (False, True):
        sae = make_sae(sparsity_warm_up_steps=4)
        sae.fused = fused
        train(sae, TensorBatches(data, 256, seed=0), cfg, progress=False)
        trained.append(sae.state_dict())
    for name, ref in trained[0].items():
        torch.testing.assert_close(trained[1][name], ref, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_autocast_keeps_fp32_master_weights_and_gradients(x):
    """Matmuls in bf16, everything else fp32: close to the fp32 step, fp32 gradients."""
    ref, ref_grads = run(make_sae(), x, fused=True, output_grads=False)
    sae = make_sae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    assert out.feature_acts.dtype == torch.float32
    for k, v in ref.losses.items():
        torch.testing.assert_close(out.losses[k], v, rtol=0.05, atol=0.05, msg=k)
    for name, p in sae.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref_grads[name].flatten(), 0)
        assert cos > 0.95, name


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_kernels_equal_eager(x):
    eager, eager_grads = run(make_sae(), x, fused=True, output_grads=True)
    sae = make_sae()
    sae.compile_step = True
    out, grads = run(sae, x, fused=True, output_grads=True)
    assert torch.equal(out.feature_acts, eager.feature_acts)
    for k, v in eager.losses.items():
        torch.testing.assert_close(out.losses[k], v, atol=1e-5, rtol=1e-5, msg=k)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)
