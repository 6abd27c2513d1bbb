"""Shared pieces of the benchmarks (torch only): machine line, interleaved timing, ratios.

Timings are interleaved: every round runs each candidate once (in a rotating order), so a load
change on a shared machine hits all candidates alike. Tables report the median time per
candidate and, for ratios, the median of the per-round ratios (paired within a round).
"""

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine(device: torch.device | str = "cpu") -> str:
    """One line naming the machine: CPU model or GPU, torch version, threads, load average."""
    device = torch.device(device)
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            chip = f"{names[0]} x {len(names)} logical CPUs" if names else chip
        except OSError:
            pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{chip}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"load average (1/5/15 min) {load}"
    )


def set_threads(n: int) -> None:
    """Fix intra-op threads explicitly (the benchmarks print the number they ran with)."""
    torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    warm_up: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``rounds`` rounds, order rotated every round."""
    names = list(candidates)
    for name in names:
        for _ in range(warm_up):
            candidates[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            candidates[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (rounds ran back to back, so load is shared)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def matmuls(
    batch: int, d_in: int, width: int, square: int, dtype: torch.dtype, device: torch.device
) -> dict[str, tuple[float, Callable[[], object]]]:
    """name -> (FLOPs, callable): the operand shapes of the SA-GSAE step's matmuls and one
    square product, in ``dtype``."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x, W_enc, W_dec = rnd(batch, d_in), rnd(d_in, width), rnd(width, d_in)
    f, g_out, a, b = rnd(batch, width), rnd(batch, d_in), rnd(square, square), rnd(square, square)
    flops = 2.0 * batch * d_in * width
    return {
        "x W_enc  [B,d]x[d,F]": (flops, lambda: x @ W_enc),
        "f W_dec  [B,F]x[F,d]": (flops, lambda: f @ W_dec),
        "g W_dec^T [B,d]x[d,F]": (flops, lambda: g_out @ W_dec.T),
        "x^T dp   [d,B]x[B,F]": (flops, lambda: x.T @ f),
        "f^T g    [F,B]x[B,d]": (flops, lambda: f.T @ g_out),
        f"square {square}": (2.0 * square**3, lambda: a @ b),
    }


STEP_MATMULS = (1, 2, 2, 1, 2)
"""How often the step runs each of the first five ``matmuls`` shapes: p; x_hat and the aux
reconstruction; grad f and grad u; grad W_enc; the two parts of grad W_dec (8 in all)."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth_mib(step: Callable[[], None]) -> float:
    """Peak resident memory of one (warm) CPU step above the resident memory before it, MiB.

    Linux only: resets the process's high-water mark through /proc/self/clear_refs. Freed
    heap memory that stays resident is reused without growth, so small transients can be
    under-counted; the F-wide tensors (tens of MiB) are mapped and unmapped, so they count.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024
