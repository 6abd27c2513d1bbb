"""Latent sharding's memory per rank, and sparse against dense decoding (CPU).

    python -m benchmarks.sharding memory   # params + grads + Adam bytes per rank at 1, 2, 4
                                           # latent shards (gloo ranks started by torchrun)
    python -m benchmarks.sharding decode   # step time against F at L0 32, dense vs sparse

``memory`` starts ``torchrun`` once per shard count; each run trains an SA-GSAE of width F
over that many latent shards for a few steps and every rank reports the bytes it holds for
the SAE's parameters, their gradients and Adam's state. ``decode`` times one training step
(forward and backward) with thresholds set so that L0 is about 32.
"""

import argparse
import json
import subprocess
import sys

import torch
from sae_lens.saes.sae import TrainStepInput

from benchmarks.common import interleaved, machine, median, paired_ratio, set_threads
from sign_sae import distributed
from sign_sae.architectures import make_training_sae
from sign_sae.markdown import markdown_table
from sign_sae.trainer import TensorBatches, TrainConfig, Trainer

MIB = 2**20


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rank_report(d_in: int, width: int, shards: int) -> None:
    """One rank under torchrun: train a few steps over ``shards`` latent shards, print bytes."""
    set_threads(1)
    with distributed.session():
        torch.manual_seed(0)
        sae = make_training_sae("sa_gsae", d_in, width, 1.0)
        data = TensorBatches(torch.randn(1024, d_in), 256)
        cfg = TrainConfig(total_steps=3, batch_size=256, latent_shards=shards, normalize=False)
        trainer = Trainer(sae, data, cfg, progress=False)
        trainer.run(stop_at=2)  # paused: the optimiser state is in place
        local = trainer.sae
        row = {
            "rank": distributed.get_rank(),
            "latents": local.cfg.d_sae,
            "params": _bytes(local.parameters()),
            "grads": _bytes(p.grad for p in local.parameters() if p.grad is not None),
            "adam": _bytes(v for s in trainer.opt.state.values() for v in s.values()),
        }
        rows = distributed.gather_rows([row])
        if distributed.is_main():
            print(json.dumps(rows))


def memory(args: argparse.Namespace) -> None:
    rows = []
    for shards in (1, 2, 4):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={shards}", "-m", "benchmarks.sharding", "rank"]
        cmd += [f"--d-in={args.d_in}", f"--width={args.width}", f"--shards={shards}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        ranks = json.loads(out.strip().splitlines()[-1])
        worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["adam"])
        total = worst["params"] + worst["grads"] + worst["adam"]
        rows.append(
            [
                str(shards),
                str(worst["latents"]),
                f"{worst['params'] / MIB:.2f}",
                f"{worst['grads'] / MIB:.2f}",
                f"{worst['adam'] / MIB:.2f}",
                f"{total / MIB:.2f}",
                f"{(total - _shared_bytes(args.d_in)) / worst['latents']:.1f}",
            ]
        )
    print(f"SA-GSAE d_in {args.d_in}, F {args.width}, fp32, Adam; the largest rank of each run")
    header = ["shards", "latents/rank", "params MiB", "grads MiB", "Adam MiB", "total MiB"]
    print(markdown_table([*header, "bytes per latent"], rows))
    print(machine())


def _shared_bytes(d_in: int) -> int:
    """b_dec's parameter, gradient and two Adam moments (every rank holds them whole) and
    Adam's step counters (one float32 per parameter tensor)."""
    return 4 * d_in * 4 + 8 * 4


def _sae_at_l0(width: int, x: torch.Tensor, l0: float, fused: bool, sparse: bool):
    """An SA-GSAE whose thresholds open about ``l0`` gates per row of ``x``."""
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", x.shape[1], width, 1.0)
    with torch.no_grad():
        p = (x - sae.b_dec) @ sae.W_enc
        t = torch.quantile(p.abs().flatten()[: 2**24], 1 - l0 / width).item()
        for raw in sae.raw_thresholds():
            raw.fill_(t / sae.cfg.threshold_lr_scale)
    sae.fused, sae.sparse_decode = fused, sparse
    return sae


def decode(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    device = torch.device("cpu")
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(0))
    step_in = TrainStepInput(x, {"sparsity": 1.0}, None, 0, False)
    rows = []
    for width in args.widths:
        saes = {
            "fused dense": _sae_at_l0(width, x, args.l0, True, False),
            "reference dense": _sae_at_l0(width, x, args.l0, False, False),
            "reference sparse": _sae_at_l0(width, x, args.l0, False, True),
        }

        def step(sae):
            def run() -> None:
                sae.zero_grad(set_to_none=True)
                sae.training_forward_pass(step_in).loss.backward()

            return run

        times = interleaved({k: step(s) for k, s in saes.items()}, args.rounds, device)
        with torch.no_grad():
            l0 = saes["fused dense"].training_forward_pass(step_in).feature_acts != 0
            l0 = l0.sum(-1).float().mean().item()
        dense, ref, sparse = (times[k] for k in saes)
        rows.append(
            [
                str(width),
                f"{l0:.1f}",
                *(f"{median(t) * 1e3:.0f}" for t in (dense, ref, sparse)),
                f"{paired_ratio(dense, sparse):.2f}x",
                f"{paired_ratio(ref, sparse):.2f}x",
            ]
        )
    print(f"SA-GSAE step (forward + backward), d_in {args.d_in}, batch {args.batch}, fp32; ")
    print(f"{args.rounds} interleaved rounds after 1 warm-up step each; ms are medians")
    header = ["F", "L0", "fused dense ms", "reference dense ms", "sparse decode ms"]
    print(markdown_table([*header, "sparse vs fused", "sparse vs reference"], rows))
    print(machine(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["memory", "decode", "rank"])
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--width", type=int, default=32768, help="memory: the SAE's F")
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--widths", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--l0", type=float, default=32.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.mode == "rank":
        rank_report(args.d_in, args.width, args.shards)
    else:
        {"memory": memory, "decode": decode}[args.mode](args)


if __name__ == "__main__":
    main()
