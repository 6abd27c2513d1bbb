"""Inference encode throughput: ``sign_sae.SAGSAE`` vs SAELens ``GatedSAE`` and ``JumpReLUSAE``.

All run ``encode`` under ``torch.inference_mode`` on the same batch, interleaved. SA-GSAE's
inference form is one matmul and a mask-free Bi-Jump-ReLU; SAELens's Gated SAE runs two matmuls (gate and
magnitude) and rescales W_enc on every call; JumpReLU runs one matmul.

    python -m benchmarks.encode                      # d_in 576, F 4608, batch 4096, fp32
    python -m benchmarks.encode --rounds 9 --batch 8192
"""

import argparse

import torch
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

from benchmarks.common import interleaved, machine, median, paired_ratio, set_threads
from sign_sae import SAGSAE, SAGSAEConfig, SAGSAETrainingSAE, SAGSAETrainingSAEConfig
from sign_sae.markdown import markdown_table


def sa_gsae(d_in: int, width: int) -> SAGSAE:
    """The folded inference SAE of a freshly initialised training SAE (thresholds 1e-3)."""
    train = SAGSAETrainingSAE(SAGSAETrainingSAEConfig(d_in=d_in, d_sae=width))
    sae = SAGSAE(SAGSAEConfig.from_dict(train.cfg.get_inference_sae_cfg_dict()))
    sae.load_state_dict(train.inference_state_dict())
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--width", type=int, default=4608, help="SA-GSAE width F")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine())
    torch.manual_seed(0)
    d, w = args.d_in, args.width
    saes = {
        "SA-GSAE (Bi-Jump-ReLU), F": sa_gsae(d, w),
        "SAELens JumpReLU, F": JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=w)),
        "SAELens Gated, F": GatedSAE(GatedSAEConfig(d_in=d, d_sae=w)),
        "SAELens Gated, 2F": GatedSAE(GatedSAEConfig(d_in=d, d_sae=2 * w)),
    }
    x = torch.randn(args.batch, d)

    def encoder(sae: torch.nn.Module):
        def run() -> None:
            with torch.inference_mode():
                sae.encode(x)

        return run

    times = interleaved({k: encoder(s) for k, s in saes.items()}, args.rounds, torch.device("cpu"))
    gated, jump = times["SAELens Gated, F"], times["SAELens JumpReLU, F"]
    rows = [
        [
            name,
            f"{median(t) * 1e3:.1f}",
            f"{args.batch / median(t):,.0f}",
            f"{paired_ratio(jump, t):.2f}x",
            f"{paired_ratio(gated, t):.2f}x",
        ]
        for name, t in times.items()
    ]
    print(f"d_in {d}, F {w}, batch {args.batch}, fp32; {args.rounds} interleaved rounds")
    head = ["encode", "ms (median)", "tokens/s", "speed vs JumpReLU F", "speed vs Gated F"]
    print(markdown_table(head, rows))
    print(machine())


if __name__ == "__main__":
    main()
