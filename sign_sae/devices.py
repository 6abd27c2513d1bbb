"""The torch device a run asks for, checked before anything is built on it."""

import torch

from sign_sae.errors import SignSAEError


def check_device(name: str) -> None:
    """Refuse, in one line naming it and the fix, a torch device this machine cannot use: not
    a device name, CUDA or MPS absent, or a GPU index past the last one (torch would fail later
    with an ``AssertionError`` traceback)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SignSAEError(
            f"{name!r} is not a torch device; use cpu, cuda, cuda:1 or mps (data.device)."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            seen = f"{count} CUDA GPU(s)" if count else "no CUDA GPU"
            raise SignSAEError(
                f"The device {name!r} is not available: torch {torch.__version__} sees {seen} "
                "here. Use data.device: cpu, or run on a machine with that GPU and a CUDA build "
                "of torch."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SignSAEError(
            f"The device {name!r} is not available: torch {torch.__version__} sees no Apple "
            "GPU (MPS) here. Use data.device: cpu, or run on a Mac with Apple silicon."
        )
