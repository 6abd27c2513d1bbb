"""What verified, atomic saves cost: ``sign_sae.storage.save_sae`` / ``load_sae`` (staged
folder, sha256 manifest, one swap; hash checked on load) vs SAELens's own ``save_model`` /
``SAE.load_from_disk`` (in place, unchecked) on the same SAELens Gated SAE, interleaved.

    python -m benchmarks.integrity                 # d_in 576, d_sae 2304 (the demo's Gated 2H)
    python -m benchmarks.integrity --width 16384 --rounds 5
"""

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

from benchmarks.common import interleaved, machine, median, paired_ratio, set_threads
from sign_sae.markdown import markdown_table
from sign_sae.storage import load_sae, save_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine())
    data = os.urandom(256 << 20)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    print(f"sha256 of 256 MiB in memory: {0.25 / (time.perf_counter() - start):.2f} GiB/s")
    torch.manual_seed(0)
    sae = GatedSAE(GatedSAEConfig(d_in=args.d_in, d_sae=args.width))
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        ours, theirs = Path(tmp) / "ours", Path(tmp) / "theirs"
        save = interleaved(
            {
                "sign_sae save_sae": lambda: save_sae(sae, ours),
                "SAELens save_model": lambda: sae.save_model(theirs),
            },
            args.rounds,
            torch.device("cpu"),
        )
        load = interleaved(
            {
                "sign_sae load_sae": lambda: load_sae(ours),
                "SAELens load_from_disk": lambda: SAE.load_from_disk(theirs),
            },
            args.rounds,
            torch.device("cpu"),
        )
        size = (ours / "sae_weights.safetensors").stat().st_size / 2**20
    rows = []
    for times, (a, b) in (
        (save, ("sign_sae save_sae", "SAELens save_model")),
        (load, ("sign_sae load_sae", "SAELens load_from_disk")),
    ):
        ratio = paired_ratio(times[a], times[b])
        rows += [
            [a, f"{median(times[a]) * 1e3:.0f}", f"{ratio:.2f}"],
            [b, f"{median(times[b]) * 1e3:.0f}", "1.00"],
        ]
    print(
        f"\nGated SAE d_in {args.d_in}, d_sae {args.width}: weights {size:.0f} MiB, {args.rounds} rounds\n"
    )
    print(markdown_table(["call", "median ms", "ratio to SAELens"], rows))


if __name__ == "__main__":
    main()
