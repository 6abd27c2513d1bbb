"""Memory planned before work starts: a group of runs that trains from one stream needs its SAEs'
weights, gradients and Adam state, one SAE's step on a batch at a time, and the stream's buffer. Where
that would not fit what the device has free, the group is refused in one line with the nearest
plan that fits (fewer SAEs at once, a smaller buffer); an out-of-memory during training gives the
same advice. The estimate is an upper bound of the largest terms, not an exact count.
"""

from collections.abc import Sequence

import torch

from sign_sae.errors import SignSAEError
from sign_sae.runs.config import DataConfig
from sign_sae.runs.spec import Run

_FLOAT = 4
_STATE_COPIES = 4  # weights, gradients, Adam's two moments (float32)
_STEP_COPIES = 8  # per batch row and latent: pre-activations, gate, magnitude, masks, grads
_MARGIN = 1.2  # allocator slack and what the estimate leaves out


def sae_bytes(run: Run) -> int:
    """One SAE held while its group trains: its state (about 2 d_in d_sae + 8 d_sae
    parameters: weights, gradients, Adam's moments)."""
    return (2 * run.d_in * run.width + 8 * run.width) * _STATE_COPIES * _FLOAT


def step_bytes(run: Run) -> int:
    """One SAE's step on a batch (the SAEs of a group step one after another)."""
    return run.train.batch_size * run.width * _STEP_COPIES * _FLOAT


def stream_bytes(runs: Sequence[Run], data: DataConfig) -> int:
    """The stream: per hook two chunks in the buffer, one being made, and the float32 batch."""
    item = torch.empty(0, dtype=getattr(torch, data.harvest_dtype)).element_size()
    widths = {r.hook: r.d_in for r in runs}
    batch = runs[0].train.batch_size
    return sum(3 * data.buffer_tokens * d * item + batch * d * _FLOAT for d in widths.values())


def free_bytes(device: str) -> int | None:
    """Memory the device has free now (host: MemAvailable), or None where it cannot say."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def need_bytes(runs: Sequence[Run], data: DataConfig) -> float:
    """The group's estimate: every SAE's state, the largest step, the stream; with margin."""
    steps = max(step_bytes(r) for r in runs)
    return _MARGIN * (sum(sae_bytes(r) for r in runs) + steps + stream_bytes(runs, data))


def advice(runs: Sequence[Run], data: DataConfig, free: int) -> str:
    """The nearest plan that fits ``free`` bytes: fewer SAEs at once, else a smaller buffer."""
    per_sae = max(sae_bytes(r) for r in runs)
    fixed = max(step_bytes(r) for r in runs) + stream_bytes(runs, data)
    fits = int((free / _MARGIN - fixed) // per_sae)
    if fits >= 1:
        return f"set data.saes_at_once to {min(fits, len(runs) - 1) or 1}"
    smaller = data.buffer_tokens // 4
    if smaller >= runs[0].train.batch_size:
        return f"set data.saes_at_once to 1 and data.buffer_tokens to {smaller}"
    return "train a narrower SAE or a smaller train.batch_size on this device"


def check(runs: Sequence[Run], data: DataConfig, free: int | None = None) -> None:
    """Refuse a group whose estimate exceeds what the device has free, naming the fix."""
    free = free_bytes(data.device) if free is None else free
    if free is None:
        return
    need = need_bytes(runs, data)
    if need > free:
        raise SignSAEError(
            f"{len(runs)} SAE(s) at once need about {_gb(need)} on {data.device}, which has "
            f"{_gb(free)} free: {advice(runs, data, free)}. Runs resume from their checkpoints."
        )


def out_of_memory(runs: Sequence[Run], data: DataConfig) -> SignSAEError:
    """The one-line error for an out-of-memory during training: half as many SAEs at once (or,
    for one, a smaller buffer)."""
    fix = (
        f"set data.saes_at_once to {len(runs) // 2}"
        if len(runs) > 1
        else f"set data.buffer_tokens to {data.buffer_tokens // 4} or train a narrower SAE"
    )
    return SignSAEError(
        f"Out of memory on {data.device} training {len(runs)} SAE(s) at once: {fix}, then run "
        "the same command again; every run resumes from its last checkpoint."
    )


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"
