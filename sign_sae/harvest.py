"""Activations read from TransformerLens hooks in one forward pass, cached on disk.

`harvest` runs the model once per batch for all requested hooks, stops after the deepest hooked
block, and writes each hook's activations as rows `[token, d_in]` into its own folder:

    out_dir/<hook>/shard_00000.safetensors ... metadata.json

`metadata.json` is written last and carries `"complete": true`, so a folder without it is an
interrupted harvest. A complete folder whose model, hook, token fingerprint, dtype and BOS
handling match the request is reused without running the model; anything else is rebuilt.
`ActivationCache` reads a folder back, checking its structure on open and finiteness on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from sign_sae.errors import SignSAEError
from sign_sae.models import stop_at_layer, validate_hook
from sign_sae.storage import atomic_write_text, read_json, sha256_file, staged_file

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A cached folder is reused only when these metadata entries equal the request.
MATCH_KEYS = ("model_name", "hook", "tokens_sha256", "dtype", "exclude_bos", "forward_dtype")
# A bfloat16 forward (autocast) gives activations within this relative error of float32
# (Frobenius norm over a batch). Measured on SmolLM2-135M over 512 held-out tokens: under 0.03 at
# every tested hook on a CPU with AVX-512 bf16 units; on an AVX2 CPU (bf16 emulated) 0.004-0.020
# except layer 15 resid-mid at 0.067 (0.029 over 4,096 tokens): tests/test_harvest.py.
BF16_FORWARD_RTOL = 0.08

_TENSOR_KEY = "acts"
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_SHARD_FILE = "shard_{:05d}.safetensors"
_SHARD_PATTERN = re.compile(r"^shard_\d{5}\.safetensors$")
_REBUILD = "run harvest() again to rebuild it, or delete the folder"
# What metadata.json must hold (checked on open, so a damaged file is rebuilt, never trusted).
_METADATA_FIELDS = {"complete": bool, "hook": str, "d_in": int, "n_tokens": int, "dtype": str,
                    "n_shards": int, "shards": list}  # fmt: skip


class InvalidCacheError(SignSAEError):
    """A folder that is not a complete, readable activation cache."""


def _shard_entry(entry: Any) -> bool:
    """Whether a ``shards`` item of metadata.json has a file name and a token count."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and isinstance(entry.get("n_tokens"), int)
    )


class ActivationCache:
    """One hook's cached activations: `n_tokens` rows of width `d_in`, in safetensors shards."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = Path(path)
        self._metadata = metadata

    @classmethod
    def open(cls, path: Path | str) -> ActivationCache:
        """Open a cache folder, checking metadata and every shard header (not the values)."""
        path = Path(path)
        meta_path = path / METADATA_FILE
        if not meta_path.is_file():
            raise InvalidCacheError(
                f"{path} is not an activation cache: no {METADATA_FILE}. Create one with harvest()."
            )
        try:
            meta = read_json(meta_path, dict, _METADATA_FIELDS, f"{_REBUILD}.")
            if not all(_shard_entry(s) for s in meta["shards"]):
                raise SignSAEError(f"{meta_path}: a shard entry is malformed; {_REBUILD}.")
        except SignSAEError as e:
            raise InvalidCacheError(str(e)) from e
        if meta["complete"] is not True:
            raise InvalidCacheError(f"{path} is an incomplete activation cache; {_REBUILD}.")
        cache = cls(path, meta)
        cache._check_shards()
        return cache

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of `metadata.json`."""
        return dict(self._metadata)

    @property
    def hook(self) -> str:
        return self._metadata["hook"]

    @property
    def d_in(self) -> int:
        return self._metadata["d_in"]

    @property
    def n_tokens(self) -> int:
        return self._metadata["n_tokens"]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype; `load` and `iter_batches` convert from it."""
        return DTYPES[self._metadata["dtype"]]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self._metadata["shards"]]

    def load(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All activations as one `[n_tokens, d_in]` tensor of `dtype`."""
        return self._stored().to(dtype)

    def iter_batches(
        self, batch_size: int, seed: int, drop_last: bool = True
    ) -> Iterator[torch.Tensor]:
        """One epoch of float32 batches `[batch_size, d_in]` in an order fixed by `seed`.

        The whole cache is held in memory in its storage dtype and shuffled globally.
        """
        if batch_size < 1:
            raise SignSAEError(f"batch_size must be positive, got {batch_size}.")
        if drop_last and batch_size > self.n_tokens:
            raise SignSAEError(
                f"batch_size {batch_size} exceeds the {self.n_tokens} cached tokens, so "
                "drop_last=True would yield nothing; use a smaller batch or drop_last=False."
            )
        data = self._stored()
        order = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(seed))
        stop = self.n_tokens - self.n_tokens % batch_size if drop_last else self.n_tokens
        for start in range(0, stop, batch_size):
            yield data[order[start : start + batch_size]].float()

    def iter_rows(self, n_rows: int) -> Iterator[torch.Tensor]:
        """The rows in order, ``n_rows`` at a time (the last piece may be shorter), float32:
        one piece in memory at a time, read as a slice of its shard(s), checked for NaN/Inf."""
        shards = self._metadata["shards"]
        start = 0
        while start < self.n_tokens:
            stop, pieces, offset = min(start + n_rows, self.n_tokens), [], 0
            for shard in shards:
                lo, hi = max(start, offset), min(stop, offset + shard["n_tokens"])
                if lo < hi:
                    path = self.path / shard["file"]
                    try:
                        with safe_open(path, framework="pt") as f:
                            pieces.append(f.get_slice(_TENSOR_KEY)[lo - offset : hi - offset])
                    except (SafetensorError, OSError) as e:
                        raise InvalidCacheError(
                            f"Shard {path} is unreadable ({e}); {_REBUILD}."
                        ) from e
                offset += shard["n_tokens"]
            rows = torch.cat(pieces).float()
            if not bool(torch.isfinite(rows).all()):
                raise SignSAEError(
                    f"Non-finite values (NaN/Inf) in {self.path}. Delete it and harvest again."
                )
            yield rows
            start = stop

    def _stored(self) -> torch.Tensor:
        """All shards concatenated, in the storage dtype, checked for NaN and Inf."""
        return torch.cat([self._read_shard(p) for p in self.shard_paths])

    def _read_shard(self, path: Path) -> torch.Tensor:
        """One shard, read once: its bytes are checked against the recorded sha256, then parsed."""
        try:
            data = path.read_bytes()
            digest = next(
                s.get("sha256") for s in self._metadata["shards"] if s["file"] == path.name
            )
            if digest is not None and hashlib.sha256(data).hexdigest() != digest:
                raise InvalidCacheError(
                    f"Shard {path} does not match the sha256 recorded when it was written: it is "
                    f"corrupt or was changed; {_REBUILD}."
                )
            acts = safetensors.torch.load(data)[_TENSOR_KEY]
        except (SafetensorError, OSError, KeyError) as e:
            raise InvalidCacheError(f"Shard {path} is unreadable ({e}); {_REBUILD}.") from e
        bad = acts.numel() - int(torch.isfinite(acts).sum())
        if bad:
            raise SignSAEError(
                f"{bad} non-finite values (NaN/Inf) in {path}. Delete {self.path} and harvest "
                "again; if they come back the model itself overflows: store float32 or bfloat16 "
                "(float16 saturates above 65504) or exclude the BOS position."
            )
        return acts

    def _check_shards(self) -> None:
        """Raise InvalidCacheError unless shard files, shapes and dtypes match the metadata."""
        meta = self._metadata
        try:
            shards, d_in, n_tokens = meta["shards"], meta["d_in"], meta["n_tokens"]
            dtype_name = meta["dtype"]
            if meta["n_shards"] != len(shards) or dtype_name not in DTYPES:
                raise SignSAEError("inconsistent n_shards or dtype")
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidCacheError(
                f"{self.path}/{METADATA_FILE} is malformed ({e}); {_REBUILD}."
            ) from e
        on_disk = {p.name for p in self.path.iterdir() if _SHARD_PATTERN.match(p.name)}
        listed = {s["file"] for s in shards}
        if on_disk != listed:
            missing, extra = sorted(listed - on_disk), sorted(on_disk - listed)
            raise InvalidCacheError(
                f"{self.path} does not match its metadata: {len(missing)} shard(s) missing "
                f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}; {_REBUILD}."
            )
        for shard in shards:
            path = self.path / shard["file"]
            try:
                with safe_open(path, framework="pt") as f:
                    tensor = f.get_slice(_TENSOR_KEY)
                    shape, dtype = tensor.get_shape(), tensor.get_dtype()
            except (SafetensorError, OSError, KeyError) as e:
                raise InvalidCacheError(f"Shard {path} is unreadable ({e}); {_REBUILD}.") from e
            if shape != [shard["n_tokens"], d_in] or _SAFETENSORS_DTYPES.get(dtype) != dtype_name:
                raise InvalidCacheError(
                    f"Shard {path} has shape {shape} and dtype {dtype}, expected "
                    f"{[shard['n_tokens'], d_in]} {dtype_name}; {_REBUILD}."
                )
        if sum(s["n_tokens"] for s in shards) != n_tokens:
            raise InvalidCacheError(f"Shards of {self.path} do not add up to {n_tokens} tokens.")

    def verify(self) -> None:
        """Check every shard's bytes against the sha256 recorded when it was written (a cache
        written before shards had hashes counts as damaged, so it is rebuilt)."""
        for shard in self._metadata["shards"]:
            path = self.path / shard["file"]
            if "sha256" not in shard or sha256_file(path) != shard["sha256"]:
                raise InvalidCacheError(
                    f"Shard {path} does not match the sha256 recorded when it was written; "
                    f"{_REBUILD}."
                )


def harvest(
    model: Any,
    tokens: torch.Tensor,
    hooks: list[str],
    out_dir: Path,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    exclude_bos: bool = True,
    shard_tokens: int = 2**18,
    model_name: str | None = None,
    forward_dtype: torch.dtype = torch.float32,
) -> dict[str, ActivationCache]:
    """Cache the activations of `hooks` for `tokens` `[n_seq, context_size]` under `out_dir`.

    All hooks come from one forward pass per batch, which stops after the deepest hooked block.
    Rows are (sequence, position) pairs flattened in order; `exclude_bos` drops position 0 of every
    row (the BOS token, an attention sink whose activations are outliers). Returns one
    `ActivationCache` per hook, reused from disk when a complete matching cache exists.
    `forward_dtype=torch.bfloat16` runs the model under bfloat16 autocast: about twice as fast
    on CPUs with bfloat16 units, within `BF16_FORWARD_RTOL` of the float32 activations.
    """
    hooks = list(hooks)
    if not hooks or len(set(hooks)) != len(hooks):
        raise SignSAEError(f"hooks must be a non-empty list without repeats, got {hooks}.")
    for hook in hooks:
        validate_hook(model, hook)
    if tokens.ndim != 2 or tokens.dtype != torch.long:
        raise SignSAEError(
            f"tokens must be an int64 tensor [n_seq, context_size], got {tuple(tokens.shape)} "
            f"{tokens.dtype}; make one with sign_sae.corpus.tokenize()."
        )
    if exclude_bos and tokens.shape[1] < 2:
        raise SignSAEError("exclude_bos=True needs context_size >= 2.")
    if dtype not in DTYPES.values():
        raise SignSAEError(f"Unsupported storage dtype {dtype}; use one of {sorted(DTYPES)}.")
    if forward_dtype not in (torch.float32, torch.bfloat16):
        raise SignSAEError(f"forward_dtype must be float32 or bfloat16, got {forward_dtype}.")
    if batch_size < 1 or shard_tokens < 1:
        raise SignSAEError("batch_size and shard_tokens must be positive.")

    request = {
        "model_name": model_name or model.cfg.model_name,
        "tokens_sha256": fingerprint(tokens),
        "dtype": str(dtype).removeprefix("torch."),
        "exclude_bos": exclude_bos,
        "forward_dtype": str(forward_dtype).removeprefix("torch."),
    }
    out_dir = Path(out_dir)
    caches, todo = {}, []
    for hook in hooks:
        cache = _reusable(out_dir / hook, {**request, "hook": hook})
        if cache is None:
            todo.append(hook)
        else:
            caches[hook] = cache
    if todo:
        caches.update(_run(model, tokens, todo, out_dir, request, batch_size, shard_tokens))
    return {hook: caches[hook] for hook in hooks}


def fingerprint(tokens: torch.Tensor) -> str:
    """sha256 of a token tensor's shape and int64 values."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    digest.update(tokens.detach().to("cpu", torch.long).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _reusable(folder: Path, request: dict[str, Any]) -> ActivationCache | None:
    """The cache in `folder` when it is complete and matches `request`, else None (logged)."""
    if not folder.exists():
        return None
    try:
        cache = ActivationCache.open(folder)
        cache.verify()
    except InvalidCacheError as e:
        logger.warning("Rebuilding activation cache: %s", e)
        return None
    stale = [k for k in MATCH_KEYS if cache.metadata.get(k) != request[k]]
    if stale:
        logger.info("Rebuilding %s: it was made with a different %s", folder, ", ".join(stale))
        return None
    logger.info(
        "Reusing activation cache %s (%d tokens); the model is not run", folder, cache.n_tokens
    )
    return cache


def _run(
    model: Any,
    tokens: torch.Tensor,
    hooks: list[str],
    out_dir: Path,
    request: dict[str, Any],
    batch_size: int,
    shard_tokens: int,
) -> dict[str, ActivationCache]:
    """Run the model over `tokens` once and write every hook's shards, then its metadata."""
    dtype, exclude_bos = DTYPES[request["dtype"]], request["exclude_bos"]
    autocast = torch.autocast(
        torch.device(model.cfg.device).type,
        DTYPES[request["forward_dtype"]],
        enabled=request["forward_dtype"] != "float32",
    )
    stop = stop_at_layer(hooks)
    n_seq, context_size = tokens.shape
    n_tokens = n_seq * (context_size - 1 if exclude_bos else context_size)
    start_time = time.perf_counter()
    # One background thread writes the shards, so disk writes do not stall the forward passes.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="harvest-writer") as pool:
        writers = {h: _ShardWriter(out_dir / h, shard_tokens, dtype, pool) for h in hooks}
        with (
            torch.inference_mode(),
            autocast,
            tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="harvest") as bar,
        ):
            for start in range(0, n_seq, batch_size):
                batch = tokens[start : start + batch_size].to(model.cfg.device)
                _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop)
                for hook in hooks:
                    acts = cache[hook]
                    if acts.shape[:2] != batch.shape:
                        raise SignSAEError(
                            f"Hook {hook} gives activations of shape {tuple(acts.shape)}, not "
                            "(batch, position, ...); harvest only supports per-token hooks."
                        )
                    if exclude_bos:
                        acts = acts[:, 1:]
                    rows = acts.reshape(-1, math.prod(acts.shape[2:])).to("cpu", dtype)
                    writers[hook].add(rows)
                bar.update(batch.shape[0] * (context_size - 1 if exclude_bos else context_size))
        shared = {**request, "context_size": context_size, "n_sequences": n_seq}
        caches = {h: w.finish({**shared, "hook": h}) for h, w in writers.items()}
    elapsed = time.perf_counter() - start_time
    logger.info(
        "Harvested %d tokens x %d hooks in %.1f s (%.0f tokens/s)",
        n_tokens,
        len(hooks),
        elapsed,
        n_tokens / max(elapsed, 1e-9),
    )
    return caches


class _ShardWriter:
    """Buffers rows of one hook and writes full shards atomically on `pool`, at most one in
    flight per hook; `finish` waits for them and writes the metadata."""

    def __init__(
        self, folder: Path, shard_tokens: int, dtype: torch.dtype, pool: ThreadPoolExecutor
    ):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.shard_tokens, self.dtype, self.pool = folder, shard_tokens, dtype, pool
        self.pending: Future[None] | None = None
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.d_in: int | None = None

    def add(self, rows: torch.Tensor) -> None:
        bad = rows.numel() - int(torch.isfinite(rows).sum())
        if bad:
            raise SignSAEError(
                f"{bad} non-finite activations at {self.folder.name} in {self.dtype}; float16 "
                "saturates above 65504: store float32 or bfloat16, or exclude the BOS position."
            )
        self.d_in = rows.shape[1]
        self.buffer.append(rows)
        self.buffered += rows.shape[0]
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def finish(self, metadata: dict[str, Any]) -> ActivationCache:
        if self.buffered:
            self._flush(self.buffered)
        self._wait()
        meta = {
            **metadata,
            "d_in": self.d_in,
            "n_tokens": sum(s["n_tokens"] for s in self.shards),
            "n_shards": len(self.shards),
            "shard_tokens": self.shard_tokens,
            "shards": self.shards,
            "complete": True,
        }
        atomic_write_text(self.folder / METADATA_FILE, json.dumps(meta, indent=2))
        return ActivationCache(self.folder, meta)

    def _flush(self, n_rows: int) -> None:
        rows = torch.cat(self.buffer)
        shard, rest = rows[:n_rows].contiguous(), rows[n_rows:].clone()
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        path = self.folder / _SHARD_FILE.format(len(self.shards))
        self._wait()
        self.shards.append({"file": path.name, "n_tokens": n_rows})
        self.pending = self.pool.submit(_write_shard, shard, path, self.shards[-1])

    def _wait(self) -> None:
        """Wait for the shard in flight; re-raises its error."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def _write_shard(shard: torch.Tensor, path: Path, entry: dict[str, Any]) -> None:
    """Write one shard atomically and record its sha256 in its metadata ``entry``; a refused
    write (full disk, ...) is a one-line error and leaves no temporary file."""
    with staged_file(path, shard.numel() * shard.element_size()) as tmp:
        safetensors.torch.save_file({_TENSOR_KEY: shard}, tmp)
        entry["sha256"] = sha256_file(tmp)
