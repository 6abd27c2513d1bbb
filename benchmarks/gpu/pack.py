"""A sweep's results in one small file for the trip back from the GPU host, and back again.

``pack`` takes a sweep folder's ``results.csv``, ``results.json``, ``sweep.yaml`` and every run's
per-sequence sums (``sequences-<split>.safetensors``: what the interval code reads), never SAE
weights. Runs on the same held-out split share most of those sums (the sums of x are the data's),
so each distinct tensor is stored once: 45 runs take about 3 MB instead of 2.4 MB each.
``unpack`` writes the same files back at the same paths under a folder (e.g. ``runs/fair-gpu``),
where ``python -m experiments.fair --budget gpu --stage tables`` reads them.

    python -m benchmarks.gpu.pack pack SWEEP_DIR OUT.tar.gz
    python -m benchmarks.gpu.pack unpack OUT.tar.gz runs/fair-gpu
"""

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

TABLES = ("results.csv", "results.json", "sweep.yaml")
SUMS = "sequences.safetensors"  # each distinct tensor once
INDEX = "sequences.json"  # run file -> {field: tensor digest}


def _digest(t: torch.Tensor) -> str:
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(head + t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def pack(sweep_dir: Path, out: Path) -> dict[str, int]:
    """Write ``out`` (tar.gz); returns how many sum files and distinct tensors it holds."""
    store: dict[str, torch.Tensor] = {}
    index: dict[str, dict[str, str]] = {}
    for path in sorted(sweep_dir.rglob("sequences-*.safetensors")):
        keys = index[str(path.relative_to(sweep_dir))] = {}
        for name, t in load_file(str(path)).items():
            keys[name] = h = _digest(t)
            store.setdefault(h, t.contiguous())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for name in TABLES:
            if (sweep_dir / name).is_file():
                tar.add(sweep_dir / name, arcname=name)
        for name, blob in ((SUMS, save(store)), (INDEX, json.dumps(index, indent=1).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {"sequence_files": len(index), "tensors": len(store)}


def unpack(archive: Path, dest: Path) -> int:
    """Write the tables and every run's sums under ``dest``; returns the number of sum files."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for name in TABLES:
            if name in tar.getnames():
                (dest / name).write_bytes(tar.extractfile(name).read())
        store = load(tar.extractfile(SUMS).read())
        index = json.loads(tar.extractfile(INDEX).read())
    for rel, keys in index.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: store[h] for k, h in keys.items()}, str(path))
    return len(index)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["pack", "unpack"])
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path)
    args = p.parse_args()
    if args.command == "pack":
        print(f"packed {pack(args.source, args.target)} into {args.target}")
    else:
        print(f"unpacked {unpack(args.source, args.target)} sum files into {args.target}")


if __name__ == "__main__":
    main()
