"""GPU benchmark, one short run: SA-GSAE step vs a Gated SAE step, and against the bf16 matmul rate.

Sized for one call on an H100/H200 (d 2048, F 16384, batch 8192, bf16 autocast with fp32 master
weights; a few minutes including ``torch.compile``). Needs torch alone: it loads
``sign_sae/fused.py`` and the table writer ``sign_sae/markdown.py`` by path and mirrors, in plain
torch, SAELens's ``GatedTrainingSAE`` step and ``SAGSAETrainingSAE``'s default step (``--check``
verifies both mirrors against those classes where sae-lens is installed). Prints, in order:

1. checks on the GPU: compiled (Triton) kernels equal the eager ones, fp32, small size;
2. the bf16 matmul rate on the step's operand shapes and an 8192^3 product (the limit);
3. training steps (forward, backward, clipping, Adam), interleaved rounds: tokens/s, speed vs
   Gated at F and 2F, peak GPU memory, and utilisation = achieved / best matmul rate.

    python3 -m benchmarks.gpu                 # from the repository root
    python3 -m benchmarks.gpu --check --device cpu --d-in 64 --width 256 --batch 512
"""

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.common import STEP_MATMULS, interleaved, machine, matmuls, median, paired_ratio

Params = dict[str, torch.Tensor]


def load(name: str) -> ModuleType:
    """``sign_sae.<name>`` (a module that needs torch at most) without importing the package,
    whose other modules need sae-lens."""
    path = Path(__file__).resolve().parents[1] / "sign_sae" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sign_sae_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fused = load("fused")
markdown_table = load("markdown").markdown_table


def init_params(d: int, width: int, device: torch.device, gated: bool) -> Params:
    """SAELens's initialisation (decoder rows of norm 0.1, W_enc = W_dec^T, zero biases);
    SA-GSAE adds thresholds at 1e-3."""
    torch.manual_seed(0)
    W_dec = torch.empty(width, d, device=device)
    torch.nn.init.kaiming_uniform_(W_dec)
    W_dec *= 0.1 / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.contiguous(), "W_dec": W_dec, "b_dec": torch.zeros(d, device=device)}
    for name in ("b_gate", "r_mag", "b_mag"):
        params[name] = torch.zeros(width, device=device)
    if not gated:
        params["threshold_pos"] = torch.full((width,), 1e-3, device=device)
        params["threshold_neg"] = torch.full((width,), 1e-3, device=device)
    return {k: v.requires_grad_() for k, v in params.items()}


def sa_gsae_loss(P: Params, x: torch.Tensor, compile_step: bool) -> torch.Tensor:
    """``SAGSAETrainingSAE.training_forward_pass`` with the default config (fused path)."""
    with torch.no_grad():
        P["threshold_pos"].clamp_(min=0)
        P["threshold_neg"].clamp_(min=0)
    spec = fused.StepSpec(two_sided=True, tied=True, aux=True, centre=True, compile=compile_step)
    _, f, _, mse, sparsity, aux = fused.SAGSAEStep.apply(
        spec, x, 1.0, 1.0, P["b_dec"], P["W_enc"], P["W_dec"], P["W_dec"].norm(dim=1),
        P["b_gate"], P["threshold_pos"], P["threshold_neg"], P["r_mag"], P["b_mag"], None, None,
    )  # fmt: skip
    (f != 0).any(0)  # the dead-latent clock, as the trainer updates it every step
    return mse + sparsity + aux


def gated_loss(P: Params, x: torch.Tensor) -> torch.Tensor:
    """SAELens ``GatedTrainingSAE.training_forward_pass`` (encode, decode, aux loss), verbatim."""
    sae_in = x - P["b_dec"]
    active = (sae_in @ P["W_enc"] + P["b_gate"] > 0).to(x.dtype)
    magnitude = sae_in @ (P["W_enc"] * P["r_mag"].exp()) + P["b_mag"]
    f = active * torch.relu(magnitude)
    sae_out = f @ P["W_dec"] + P["b_dec"]
    mse = (sae_out - x).pow(2).sum(dim=-1).mean()
    pi_gate_act = torch.relu((x - P["b_dec"]) @ P["W_enc"] + P["b_gate"])
    l1 = 1.0 * torch.sum(pi_gate_act * P["W_dec"].norm(dim=1), dim=-1).mean()
    aux = (pi_gate_act @ P["W_dec"] + P["b_dec"] - x).pow(2).sum(dim=-1).mean()
    return mse + l1 + aux


def make_step(
    loss_fn: Callable[[Params, torch.Tensor], torch.Tensor],
    P: Params,
    x: torch.Tensor,
    dtype: torch.dtype | None,
) -> Callable[[], None]:
    """Forward under autocast, backward, clip to 1.0, Adam: as ``sign_sae.trainer.train``."""
    opt = torch.optim.Adam(P.values(), lr=1e-4)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(P, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(P.values(), 1.0)
        opt.step()

    return step


def max_diff(a: Params, b: Params) -> float:
    return max(float((a[k].grad - b[k].grad).abs().max()) for k in a)


def check_compiled(device: torch.device) -> str:
    """Compiled kernels vs eager on this device, fp32, small size: loss and gradient gaps."""
    x = torch.randn(512, 256, device=device)
    runs = []
    for compile_step in (False, True):
        P = init_params(256, 1024, device, gated=False)
        with torch.no_grad():
            for k in ("b_gate", "b_mag", "r_mag"):
                P[k].normal_(0, 0.3)
        loss = sa_gsae_loss(P, x, compile_step)
        loss.backward()
        runs.append((loss.item(), P))
    (l0, p0), (l1, p1) = runs
    gap = max_diff(p0, p1)
    ok = abs(l0 - l1) <= 1e-4 * abs(l0) and gap <= 1e-4
    return f"compiled vs eager: loss {l1:.6g} vs {l0:.6g}, max gradient gap {gap:.2e}: " + (
        "OK" if ok else "MISMATCH"
    )


def check_against_saelens() -> None:
    """The plain-torch mirrors equal SAELens's GatedTrainingSAE and SAGSAETrainingSAE (CPU)."""
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig

    x = torch.randn(256, 64)
    for name, cls, cfg, key, gated in (
        ("Gated", GatedTrainingSAE, GatedTrainingSAEConfig(d_in=64, d_sae=256), "l1", True),
        ("SA-GSAE", SAGSAETrainingSAE, SAGSAETrainingSAEConfig(d_in=64, d_sae=256), "sparsity", False),
    ):  # fmt: skip
        P = init_params(64, 256, x.device, gated)
        with torch.no_grad():
            for k in ("b_gate", "b_mag", "r_mag", "b_dec"):
                P[k].normal_(0, 0.3)
        sae = cls(cfg)
        sae.load_state_dict({k: v.detach().clone() for k, v in P.items()}, strict=False)
        out = sae.training_forward_pass(
            TrainStepInput(x, {key: 1.0}, None, n_training_steps=0, is_logging_step=False)
        )
        out.loss.backward()
        loss = gated_loss(P, x) if gated else sa_gsae_loss(P, x, False)
        loss.backward()
        gap = max(float((P[k].grad - getattr(sae, k).grad).abs().max()) for k in P)
        print(f"{name} mirror vs sae-lens class: loss {loss.item():.6g} vs {out.loss.item():.6g}, "
              f"max gradient gap {gap:.2e}")  # fmt: skip
        assert abs(loss.item() - out.loss.item()) < 1e-4 and gap < 1e-4


def peak_memory_gib(step: Callable[[], None], device: torch.device) -> float:
    """Peak GPU memory one step adds over what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def repeat(fn: Callable[[], object], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--width", type=int, default=16384, help="SA-GSAE width F")
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    parser.add_argument("--fp32", action="store_true", help="fp32 (TF32 matmuls) instead of bf16")
    parser.add_argument("--check", action="store_true", help="also check the mirrors (sae-lens)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 runs
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(machine(device), f"| CUDA {torch.version.cuda}" if device.type == "cuda" else "")
    d, w, b = args.d_in, args.width, args.batch
    print(f"d_in {d}, F {w}, batch {b}, {'fp32 + TF32' if args.fp32 else 'bf16 autocast'}")
    if args.check:
        check_against_saelens()
    t0 = time.perf_counter()
    print(check_compiled(device), f"({time.perf_counter() - t0:.0f} s with compilation)")

    mms = matmuls(b, d, w, 8192, dtype, device)
    x = torch.randn(b, d, device=device)
    steps = {
        "SA-GSAE, fused + compile": (w, lambda P, x: sa_gsae_loss(P, x, True), False),
        "SA-GSAE, fused (eager)": (w, lambda P, x: sa_gsae_loss(P, x, False), False),
        "Gated (SAELens step), F": (w, gated_loss, True),
        "Gated (SAELens step), 2F": (2 * w, gated_loss, True),
    }
    candidates: dict[str, Callable[[], None]] = {}
    memory: dict[str, float] = {}
    autocast = None if args.fp32 else dtype
    for name, (width, loss_fn, gated) in steps.items():
        step = make_step(loss_fn, init_params(d, width, device, gated), x, autocast)
        step()  # compiles where asked, allocates Adam's state
        memory[name] = peak_memory_gib(step, device)
        candidates[name] = repeat(step, args.steps)
    candidates.update({k: repeat(fn, args.steps) for k, (_, fn) in mms.items()})
    times = interleaved(candidates, args.rounds, device)
    per = {k: [t / args.steps for t in v] for k, v in times.items()}

    rates = {k: flops / median(per[k]) / 1e12 for k, (flops, _) in mms.items()}
    best = max(rates, key=rates.get)
    print(f"\nmatmuls ({dtype}), {args.rounds} rounds x {args.steps} calls")
    print(
        markdown_table(
            ["matmul", "ms", "TFLOP/s"],
            [[k, f"{median(per[k]) * 1e3:.2f}", f"{rates[k]:.0f}"] for k in mms],
        )
    )
    counts = dict(zip(list(mms)[:5], STEP_MATMULS, strict=True))
    mm_only = sum(n * median(per[k]) for k, n in counts.items())
    print(f"The SA-GSAE step's 8 matmuls alone: {mm_only * 1e3:.2f} ms")

    flops = 16.0 * d * w * b
    rows, results = [], {}
    for name in steps:
        t = median(per[name])
        util = flops / t / 1e12 / rates[best] if name.startswith("SA-GSAE") else None
        results[name] = {
            "ms": t * 1e3,
            "tokens_per_s": b / t,
            "peak_gib": memory[name],
            "utilisation": util,
        }
        rows.append([
            name, f"{t * 1e3:.2f}", f"{b / t:,.0f}",
            f"{paired_ratio(per['Gated (SAELens step), F'], per[name]):.2f}x",
            f"{paired_ratio(per['Gated (SAELens step), 2F'], per[name]):.2f}x",
            f"{memory[name]:.2f}", "" if util is None else f"{util:.0%}",
        ])  # fmt: skip
    print(f"\ntraining steps, {args.rounds} interleaved rounds x {args.steps} steps")
    print(markdown_table(
        ["step", "ms/step", "tokens/s", "speed vs Gated F", "speed vs Gated 2F",
         "peak memory of a step (GiB)", f"utilisation (16 d F / best matmul, {rates[best]:.0f} TFLOP/s)"],
        rows,
    ))  # fmt: skip
    print(f"\n{machine(device)}; total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(device), "matmul_tflops": rates, "steps": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
