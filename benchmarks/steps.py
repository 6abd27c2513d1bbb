"""The training steps the CPU benchmarks time: SA-GSAE (fused or reference ops, eager or
compiled, fp32 or bf16 autocast) and SAELens's ``GatedTrainingSAE``, each a full optimisation
step as in ``sign_sae.trainer.train``."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig


@dataclass(frozen=True)
class StepCase:
    """One SAE training step to time: architecture, width and how SA-GSAE runs its step."""

    label: str
    arch: str  # "sa_gsae" or "gated"
    width: int
    fused: bool = True
    compile: bool = False
    autocast: torch.dtype | None = None


def make_sae(case: StepCase, d_in: int, device: torch.device) -> TrainingSAE:
    torch.manual_seed(0)
    if case.arch == "gated":
        return GatedTrainingSAE(GatedTrainingSAEConfig(d_in=d_in, d_sae=case.width)).to(device)
    sae = SAGSAETrainingSAE(SAGSAETrainingSAEConfig(d_in=d_in, d_sae=case.width)).to(device)
    sae.fused, sae.compile_step = case.fused, case.compile
    return sae


def autocast(case: StepCase, device: torch.device) -> torch.autocast:
    """The case's autocast context (a disabled one for fp32)."""
    dtype = case.autocast or torch.float32
    return torch.autocast(device.type, dtype=dtype, enabled=case.autocast is not None)


def step_input(case: StepCase, x: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x,
        coefficients={"l1" if case.arch == "gated" else "sparsity": 1.0},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )


def make_step(case: StepCase, x: torch.Tensor) -> Callable[[], None]:
    """One full optimisation step as in ``sign_sae.trainer.train``: forward, backward,
    gradient clipping, Adam (fp32 master weights; autocast only around the forward)."""
    sae = make_sae(case, x.shape[1], x.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    inputs = step_input(case, x)

    def step() -> None:
        with autocast(case, x.device):
            out = sae.training_forward_pass(inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return step


def step_flops(d_in: int, width: int, tokens: int) -> float:
    """Matmul FLOPs of one SA-GSAE step: 8 products of 2 d F per token (16 d F)."""
    return 16.0 * d_in * width * tokens


def saved_for_backward_mib(case: StepCase, x: torch.Tensor) -> float:
    """MiB that autograd keeps from the forward to the backward of one step (parameters,
    which are kept anyway, not counted)."""
    sae = make_sae(case, x.shape[1], x.device)
    params = {p.untyped_storage().data_ptr() for p in sae.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, autocast(case, x.device):
        sae.training_forward_pass(step_input(case, x))
    return sum(seen.values()) / 2**20
