"""The training path on an accelerator: what ``benchmarks/gpu/run.sh`` checks on CUDA first.

The device comes from ``SIGN_SAE_TEST_DEVICE`` (default ``cpu``, so the same tests run in every
CI): the fused step against the reference ops, Bi-Jump-ReLU's straight-through gradients
against the CPU, the trainer in float32 and under bfloat16 autocast, the compiled (Triton on
CUDA) kernels against eager ones, and an SAE trained on the device saved and loaded on the CPU.
"""

import os
import shutil

import pytest
import torch
from test_fused import VARIANTS
from test_sa_gsae import D_IN, make_sae, step_input

from sign_sae import bi_jump_relu
from sign_sae.storage import load_sae, save_sae
from sign_sae.trainer import TensorBatches, TrainConfig, train

DEVICE = torch.device(os.environ.get("SIGN_SAE_TEST_DEVICE", "cpu"))
CAN_COMPILE = DEVICE.type == "cuda" or shutil.which("g++") is not None


@pytest.fixture(autouse=True)
def exact_fp32():
    """No TF32 in the float32 comparisons; the default afterwards."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(5)).to(DEVICE)


def step(sae, x, fused: bool, compile_step: bool = False):
    sae.fused, sae.compile_step = fused, compile_step
    out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    return out, {n: p.grad for n, p in sae.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_fused_step_equals_reference_on_the_device(variant, x):
    ref, ref_grads = step(make_sae(**variant).to(DEVICE), x, fused=False)
    out, grads = step(make_sae(**variant).to(DEVICE), x, fused=True)
    assert out.feature_acts.device.type == DEVICE.type
    assert torch.equal(out.feature_acts, ref.feature_acts)  # the same gate ops, bit for bit
    for k in ref.losses:
        torch.testing.assert_close(out.losses[k], ref.losses[k], atol=1e-5, rtol=1e-5, msg=k)
    for name, g in ref_grads.items():
        assert (grads[name] is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_bi_jump_relu_gradients_on_the_device_equal_the_cpu():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 64, generator=g, dtype=torch.float64)
    t_pos, t_neg = torch.rand(64, generator=g, dtype=torch.float64) * 0.5, torch.rand(64, generator=g, dtype=torch.float64) * 0.5  # fmt: skip
    grads = []
    for device in ("cpu", DEVICE):
        zz, tp, tn = (v.to(device).requires_grad_() for v in (z, t_pos, t_neg))
        out = bi_jump_relu(zz, tp, tn, 0.05)
        (out * torch.linspace(-1, 1, 64, dtype=torch.float64, device=device)).sum().backward()
        grads.append([v.grad.cpu() for v in (zz, tp, tn)] + [out.detach().cpu()])
    assert (grads[0][1] != 0).any() and (grads[0][2] != 0).any()  # the thresholds learn
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_trainer_on_the_device_reaches_the_cpu_result(dtype, tmp_path):
    data = torch.randn(4096, D_IN, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    cfg = TrainConfig(total_steps=20, batch_size=256, lr=3e-3, log_every=10, autocast_dtype=dtype)
    trained = {}
    for device in ("cpu", DEVICE):
        sae = make_sae(sparsity_warm_up_steps=4).to(device)
        result = train(sae, TensorBatches(data, 256, seed=0), cfg, progress=False)
        assert all(p.dtype == torch.float32 and p.device.type == torch.device(device).type
                   for p in sae.parameters())  # fmt: skip
        trained[str(device)] = (sae, result)
    (cpu, _), (dev, _) = trained["cpu"], trained[str(DEVICE)]
    sd_cpu, sd_dev = cpu.state_dict(), dev.state_dict()
    tol = 1e-4 if dtype == "float32" else 0.05  # bf16 matmuls: rounding differs between devices
    for name, ref in sd_cpu.items():
        torch.testing.assert_close(sd_dev[name].cpu(), ref, atol=tol, rtol=tol, msg=name)
    assert not torch.equal(sd_cpu["W_enc"], make_sae().state_dict()["W_enc"])  # it trained


@pytest.mark.skipif(not CAN_COMPILE, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_kernels_equal_eager_on_the_device(x):
    eager, eager_grads = step(make_sae().to(DEVICE), x, fused=True)
    out, grads = step(make_sae().to(DEVICE), x, fused=True, compile_step=True)
    assert torch.equal(out.feature_acts, eager.feature_acts)
    for k, v in eager.losses.items():
        torch.testing.assert_close(out.losses[k], v, atol=1e-5, rtol=1e-5, msg=k)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_an_sae_trained_on_the_device_loads_on_the_cpu(x, tmp_path):
    data = torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(3))
    sae = make_sae().to(DEVICE)
    train(sae, TensorBatches(data, 256, seed=0), TrainConfig(total_steps=4, batch_size=256), progress=False)  # fmt: skip
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae", device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        on_device = sae.decode(sae.encode(x)).cpu()
        on_cpu = loaded.decode(loaded.encode(x.cpu()))
    torch.testing.assert_close(on_cpu, on_device, atol=1e-5, rtol=1e-5)
