"""A model fingerprint: layer-15 MLP-out activations of fixed tokens, harvested on CPU when the
bundle is built and again on the host, so the host shows it runs the same model.

``make`` stores the tokens (the first ``ROWS`` rows of the validation split) and their float32
activations. ``check`` loads the default model on the host's device, compares its tokenisation
of the same text, harvests the rows with a float32 forward (TF32 off) and a bfloat16 forward
and writes the relative errors ||a - a_cpu||_F / ||a_cpu||_F against ``FP32_RTOL`` and
``BF16_FORWARD_RTOL``; it also checks that the model is the expanded compact one (NaN where the
bundle carries nothing).

    python -m benchmarks.gpu.fingerprint check FINGERPRINT.safetensors --device cuda --out X.json
"""

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sign_sae.corpus import load_texts, tokenize
from sign_sae.harvest import BF16_FORWARD_RTOL, harvest
from sign_sae.models import load_model

ROWS, CONTEXT = 4, 128
HOOK = "blocks.15.hook_mlp_out"
FP32_RTOL = 1e-4  # float32 on another device: summation order only


def fixed_tokens(model: Any) -> torch.Tensor:
    return tokenize(model, load_texts(split="validation"), CONTEXT, ROWS * CONTEXT)


def activations(model: Any, tokens: torch.Tensor, forward_dtype: torch.dtype) -> torch.Tensor:
    """The harvest's own rows (BOS dropped) of ``HOOK``, float32 on CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        caches = harvest(model, tokens, [HOOK], Path(tmp), forward_dtype=forward_dtype)
        return caches[HOOK].load().float().cpu()


def make(model: Any, out: Path) -> None:
    tokens = fixed_tokens(model)
    save_file({"tokens": tokens, "fp32": activations(model, tokens, torch.float32)}, str(out))


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def check(reference: Path, device: str) -> dict[str, Any]:
    """The fingerprint on ``device``: every number and whether it is within its tolerance."""
    torch.set_float32_matmul_precision("highest")
    ref = load_file(str(reference))
    model = load_model(device=device)
    tokens = fixed_tokens(model)
    same_tokens = torch.equal(tokens, ref["tokens"])
    fp32 = activations(model, ref["tokens"], torch.float32)
    bf16 = activations(model, ref["tokens"], torch.bfloat16)
    e32, e16 = rel_error(fp32, ref["fp32"]), rel_error(bf16, ref["fp32"])
    W_E, upper = model.W_E.detach(), model.blocks[-1].mlp.W_in.detach()
    result = dict(
        device=str(device),
        chip=torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        torch=torch.__version__,
        rows=list(fp32.shape),
        same_tokens=same_tokens,
        fp32_rel_error=e32,
        fp32_max_abs_error=float((fp32 - ref["fp32"]).abs().max()),
        fp32_rtol=FP32_RTOL,
        bf16_rel_error=e16,
        bf16_rtol=BF16_FORWARD_RTOL,
        embedding_rows_carried=int(torch.isfinite(W_E).all(dim=1).sum()),
        top_block_is_nan=bool(upper.isnan().all()),
    )
    result["ok"] = (
        same_tokens
        and e32 <= FP32_RTOL
        and e16 <= BF16_FORWARD_RTOL
        and not math.isnan(e32 + e16)
        and result["top_block_is_nan"]
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["check"])
    p.add_argument("reference", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    result = check(args.reference, args.device)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if not result["ok"]:
        raise SystemExit("fingerprint: MISMATCH (see above)")


if __name__ == "__main__":
    main()
