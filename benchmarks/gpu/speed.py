"""GPU speed, one short run: SA-GSAE vs SAELens Gated, training step and inference encode.

Sized for one part of the GPU run (benchmarks/gpu/run.sh) on an H100/H200: d 2048, F 16384 and
65536, batch 4096, bf16 autocast with fp32 master weights, all candidates of one width side by
side in one process (interleaved rounds). The training steps are plain-torch mirrors of
SAELens's ``GatedTrainingSAE`` step and ``SAGSAETrainingSAE``'s default (fused) step
(``--check`` verifies both mirrors against those classes); the
encodes are the real inference classes (``sign_sae.SAGSAE``, SAELens's ``GatedSAE``). Per width:

1. checks on the device: compiled (Triton) kernels equal the eager ones, fp32, small size;
2. the bf16 matmul rate on the step's operand shapes and an 8192^3 product;
3. training steps (forward, backward, clipping, Adam): tokens/s, speed vs Gated at F and 2F,
   peak memory, and 16 d F x batch / time as a share of the best measured matmul and of the
   card's nominal dense bf16 peak (``PEAK_TFLOPS``);
4. inference encode under ``torch.inference_mode``: tokens/s, speed vs Gated at F and 2F.

    python -m benchmarks.gpu.speed --json speed.json          # from the repository root
    python -m benchmarks.gpu.speed --check --device cpu --d-in 64 --widths 256 --batch 512
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import STEP_MATMULS, interleaved, machine, matmuls, median, paired_ratio
from sign_sae import fused
from sign_sae.markdown import markdown_table
from sign_sae.sa_gsae import RAW, THRESHOLDS, SAGSAETrainingSAEConfig, scaled_threshold

Params = dict[str, torch.Tensor]
SCALE = SAGSAETrainingSAEConfig.threshold_lr_scale  # the default step's threshold rate


def init_params(d: int, width: int, device: torch.device, gated: bool) -> Params:
    """SAELens's initialisation (decoder rows of norm 0.1, W_enc = W_dec^T, zero biases);
    SA-GSAE adds thresholds at 1e-3, learnt as raw = threshold / ``SCALE``."""
    torch.manual_seed(0)
    W_dec = torch.empty(width, d, device=device)
    torch.nn.init.kaiming_uniform_(W_dec)
    W_dec *= 0.1 / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.contiguous(), "W_dec": W_dec, "b_dec": torch.zeros(d, device=device)}
    for name in ("b_gate", "r_mag", "b_mag"):
        params[name] = torch.zeros(width, device=device)
    if not gated:
        for name in THRESHOLDS:
            params[RAW + name] = torch.full((width,), 1e-3 / SCALE, device=device)
    return {k: v.requires_grad_() for k, v in params.items()}


def sa_gsae_loss(P: Params, x: torch.Tensor, compile_step: bool) -> torch.Tensor:
    """``SAGSAETrainingSAE.training_forward_pass`` with the default config (fused path)."""
    with torch.no_grad():
        for name in THRESHOLDS:
            P[RAW + name].clamp_(min=0)
    t_pos, t_neg = (scaled_threshold(P[RAW + name], SCALE) for name in THRESHOLDS)
    spec = fused.StepSpec(two_sided=True, tied=True, aux=True, centre=True, compile=compile_step)
    _, f, _, mse, sparsity, aux = fused.SAGSAEStep.apply(
        spec, x, 1.0, 1.0, P["b_dec"], P["W_enc"], P["W_dec"], P["W_dec"].norm(dim=1),
        P["b_gate"], t_pos, t_neg, P["r_mag"], P["b_mag"], None, None,
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


PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4}
"""Nominal dense bf16 tensor-core peaks (vendor data sheets), matched by name in this order."""


def nominal_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def encoders(d: int, w: int, x: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """Inference encodes of SA-GSAE at F and SAELens Gated at F and 2F (the real classes)."""
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

    from benchmarks.encode import sa_gsae

    saes = {
        "encode SA-GSAE, F": sa_gsae(d, w),
        "encode Gated, F": GatedSAE(GatedSAEConfig(d_in=d, d_sae=w)),
        "encode Gated, 2F": GatedSAE(GatedSAEConfig(d_in=d, d_sae=2 * w)),
    }

    def encode(sae: torch.nn.Module) -> Callable[[], None]:
        sae.to(x.device)

        def run() -> None:
            with (
                torch.inference_mode(),
                torch.autocast(
                    x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
                ),
            ):
                sae.encode(x)

        return run

    return {k: encode(v) for k, v in saes.items()}


def one_width(args: argparse.Namespace, w: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Every candidate at SA-GSAE width ``w``, interleaved; prints the tables, returns numbers."""
    d, b = args.d_in, args.batch
    print(f"\nd_in {d}, F {w}, batch {b}, {'fp32 + TF32' if args.fp32 else 'bf16 autocast'}")
    mms = matmuls(b, d, w, 8192 if device.type == "cuda" else 512, dtype, device)
    x = torch.randn(b, d, device=device)
    steps = {
        "SA-GSAE, fused (eager)": (w, lambda P, x: sa_gsae_loss(P, x, False), False),
        "Gated (SAELens step), F": (w, gated_loss, True),
        "Gated (SAELens step), 2F": (2 * w, gated_loss, True),
    }
    if args.compile:
        steps["SA-GSAE, fused + compile"] = (w, lambda P, x: sa_gsae_loss(P, x, True), False)
    autocast = None if args.fp32 else dtype
    candidates: dict[str, Callable[[], None]] = {}
    memory: dict[str, float] = {}
    for name, (width, loss_fn, gated) in steps.items():
        step = make_step(loss_fn, init_params(d, width, device, gated), x, autocast)
        step()  # compiles where asked, allocates Adam's state
        memory[name] = peak_memory_gib(step, device)
        candidates[name] = repeat(step, args.steps)
    encodes = encoders(d, w, x, autocast)
    candidates.update({k: repeat(fn, args.steps) for k, fn in encodes.items()})
    candidates.update({k: repeat(fn, args.steps) for k, (_, fn) in mms.items()})
    times = interleaved(candidates, args.rounds, device)
    per = {k: [t / args.steps for t in v] for k, v in times.items()}

    rates = {k: flops / median(per[k]) / 1e12 for k, (flops, _) in mms.items()}
    best = max(rates, key=rates.get)
    peak = nominal_peak(device)
    print(markdown_table(
        ["matmul", "ms", "TFLOP/s"], [[k, f"{median(per[k]) * 1e3:.2f}", f"{rates[k]:.0f}"] for k in mms]
    ))  # fmt: skip
    counts = dict(zip(list(mms)[:5], STEP_MATMULS, strict=True))
    mm_only = sum(n * median(per[k]) for k, n in counts.items())
    print(f"The SA-GSAE step's 8 matmuls alone: {mm_only * 1e3:.2f} ms")

    flops = 16.0 * d * w * b
    rows, results = [], {}
    for name in steps:
        t = median(per[name])
        util = flops / t / 1e12 if name.startswith("SA-GSAE") else None
        results[name] = {
            "ms": t * 1e3,
            "tokens_per_s": b / t,
            "peak_gib": memory[name],
            "of_best_matmul": None if util is None else util / rates[best],
            "of_nominal_peak": None if util is None or peak is None else util / peak,
        }
        rows.append([
            name, f"{t * 1e3:.2f}", f"{b / t:,.0f}",
            f"{paired_ratio(per['Gated (SAELens step), F'], per[name]):.2f}x",
            f"{paired_ratio(per['Gated (SAELens step), 2F'], per[name]):.2f}x",
            f"{memory[name]:.2f}",
            "" if util is None else f"{util / rates[best]:.0%}",
            "" if util is None or peak is None else f"{util / peak:.0%}",
        ])  # fmt: skip
    print(f"\ntraining steps, {args.rounds} interleaved rounds x {args.steps} steps")
    print(markdown_table(
        ["step", "ms/step", "tokens/s", "speed vs Gated F", "speed vs Gated 2F",
         "peak memory of a step (GiB)", f"16 d F / best matmul ({rates[best]:.0f} TFLOP/s)",
         f"16 d F / nominal bf16 peak ({peak or 'unknown'} TFLOP/s)"],
        rows,
    ))  # fmt: skip
    enc_rows = []
    for name in encodes:
        t = median(per[name])
        results[name] = {"ms": t * 1e3, "tokens_per_s": b / t}
        enc_rows.append([
            name, f"{t * 1e3:.3f}", f"{b / t:,.0f}",
            f"{paired_ratio(per['encode Gated, F'], per[name]):.2f}x",
            f"{paired_ratio(per['encode Gated, 2F'], per[name]):.2f}x",
        ])  # fmt: skip
    print(markdown_table(
        ["encode", "ms", "tokens/s", "speed vs Gated F", "speed vs Gated 2F"], enc_rows
    ))  # fmt: skip
    return {"d_in": d, "width": w, "batch": b, "matmul_tflops": rates, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="+", default=[16384, 65536], help="SA-GSAE F")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    parser.add_argument("--fp32", action="store_true", help="fp32 (TF32 matmuls) instead of bf16")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--check", action="store_true", help="also check the mirrors (sae-lens)")
    parser.add_argument("--json", type=Path, help="also write the results here (after each width)")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 runs
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(machine(device), f"| CUDA {torch.version.cuda}" if device.type == "cuda" else "")
    out = {
        "machine": machine(device),
        "nominal_bf16_peak_tflops": nominal_peak(device),
        "widths": [],
    }
    if args.check:
        check_against_saelens()
    if args.compile:
        t0 = time.perf_counter()
        out["compiled_vs_eager"] = check_compiled(device)
        print(out["compiled_vs_eager"], f"({time.perf_counter() - t0:.0f} s with compilation)")
    for w in args.widths:
        out["widths"].append(one_width(args, w, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    print(f"\n{machine(device)}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
