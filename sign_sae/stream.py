"""Training activations as a stream: every hook's rows, batch by batch, in bounded memory.

The training split's token rows (sequences) are dealt once, by the stream's seed, into chunks of
``buffer_tokens // (context_size - 1)`` sequences. A chunk is one forward pass of the model over
its sequences (every requested hook at once, stopping after the deepest hooked block, BOS left
out) or, where the stream keeps a cache, one shard per hook read back from disk. An epoch visits
the chunks in an order fixed by (seed, epoch) and shuffles each chunk's rows in the buffer by
(seed, epoch, chunk); the batches cut that sequence of rows into ``batch_size`` pieces. So batch
k is a pure function of k: every SAE at a hook steps on the same batch, a resumed run needs no
stream state beyond its step (it re-reads at most the chunk it stopped in), and the rows are the
same whether a chunk comes from the model or from the cache (both are rounded to the storage
dtype).

Memory: at most two chunks per hook (the one a batch starts in and the next), each
``buffer_tokens x d_in`` values of the storage dtype, plus one chunk's forward. Nothing else
grows with the token budget.

Under ``torchrun`` rank r of W streams chunks r, r + W, ... only (its own share of the text,
its own buffer) and cuts them into its share of the global batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from sign_sae.errors import SignSAEError
from sign_sae.harvest import fingerprint
from sign_sae.models import stop_at_layer, validate_hook
from sign_sae.storage import atomic_write_text, sha256_file, staged_file

log = logging.getLogger(__name__)

DEFAULT_BUFFER_TOKENS = 65_536
_CHUNK_FILE = "chunk_{:05d}.safetensors"


class ActivationStream:
    """Batches ``{hook: [rows, d_in]}`` of one model's training tokens; ``batch(step)``.

    ``tokens`` are the split's rows ``[n_seq, context_size]`` (BOS first). With ``cache_dir``
    every chunk the model computes is written there (one safetensors shard per hook and chunk,
    atomically, its sha256 beside it) and later reads of it, in later epochs, runs or sweeps,
    come from disk; each shard's checksum is verified when this process first reads it.
    """

    def __init__(
        self,
        model: Any,
        tokens: torch.Tensor,
        hooks: Sequence[str],
        batch_size: int,
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        forward_dtype: torch.dtype = torch.float32,
        forward_batch: int = 32,
        cache_dir: Path | None = None,
        model_name: str | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.hooks = list(dict.fromkeys(hooks))
        for hook in self.hooks:
            validate_hook(model, hook)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise SignSAEError(f"tokens must be [n_seq, context >= 2], got {tuple(tokens.shape)}.")
        if buffer_tokens < batch_size:
            raise SignSAEError(
                f"data.buffer_tokens ({buffer_tokens}) is smaller than one batch ({batch_size} "
                "rows); raise data.buffer_tokens to at least train.batch_size."
            )
        if not 0 <= rank < world <= batch_size:
            raise SignSAEError(f"Need 0 <= rank < world <= batch_size, got {rank}, {world}.")
        self.model, self.tokens, self.seed = model, tokens, seed
        self.dtype, self.forward_dtype, self.forward_batch = dtype, forward_dtype, forward_batch
        self.rank, self.world = rank, world
        self.per_seq = tokens.shape[1] - 1
        per_chunk = max(1, buffer_tokens // self.per_seq)
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))
        chunks = list(order.split(per_chunk))
        if len(chunks) < world:
            raise SignSAEError(
                f"{len(chunks)} chunk(s) of {per_chunk} sequences for {world} ranks: each rank "
                "needs one; lower data.buffer_tokens or raise data.train_tokens."
            )
        self.chunks = chunks  # sequence ids of every chunk (all ranks)
        self.mine = list(range(rank, len(chunks), world))
        self.local_batch = batch_size // world + (rank < batch_size % world)
        self.rows_per_epoch = sum(len(chunks[i]) for i in self.mine) * self.per_seq
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.request = {
            "model_name": model_name or model.cfg.model_name,
            "tokens_sha256": fingerprint(tokens),
            "seed": seed,
            "sequences_per_chunk": per_chunk,
            "dtype": str(dtype).removeprefix("torch."),
            "forward_dtype": str(forward_dtype).removeprefix("torch."),
        }
        self._buffer: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None
        self._verified: set[Path] = set()
        self.forwards = 0  # chunks computed by the model (the rest came from the cache)

    def check_supply(self, total_steps: int, epochs: int) -> None:
        """Refuse, before any forward, a run that needs more rows than ``epochs`` passes give."""
        needed, have = total_steps * self.local_batch, epochs * self.rows_per_epoch
        if needed > have:
            more = math.ceil(needed / self.rows_per_epoch)
            raise SignSAEError(
                f"The stream runs dry: {total_steps} steps of {self.local_batch} rows need "
                f"{needed:,} tokens, but data.train_tokens gives {self.rows_per_epoch:,} (BOS "
                f"left out) x data.epochs {epochs} = {have:,}. Set data.epochs to {more} (with "
                "data.cache on, later epochs read the disk instead of running the model) or "
                "raise data.train_tokens."
            )

    def view(self, hook: str) -> HookBatches:
        """The batches of one hook, for one ``Trainer``."""
        if hook not in self.hooks:
            raise SignSAEError(f"The stream holds {self.hooks}, not {hook!r}.")
        return HookBatches(self, hook)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's rows of global batch ``step`` at every hook, float32."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        start, need = step * self.local_batch, self.local_batch
        parts: list[dict[str, torch.Tensor]] = []
        while need:
            epoch, offset = divmod(start, self.rows_per_epoch)
            index, within = self._locate(epoch, offset)
            rows = self._chunk(epoch, index)
            take = min(need, next(iter(rows.values())).shape[0] - within)
            parts.append({h: r[within : within + take] for h, r in rows.items()})
            start, need = start + take, need - take
        out = {h: torch.cat([p[h] for p in parts]).float() for h in self.hooks}
        self._last = (step, out)
        return out

    def _order(self, epoch: int) -> list[int]:
        """This rank's chunks in epoch ``epoch``'s order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        return [self.mine[i] for i in torch.randperm(len(self.mine), generator=g).tolist()]

    def _locate(self, epoch: int, offset: int) -> tuple[int, int]:
        """(position in the epoch's order, row within that chunk) of a row offset."""
        for position, chunk in enumerate(self._order(epoch)):
            size = len(self.chunks[chunk]) * self.per_seq
            if offset < size:
                return position, offset
            offset -= size
        raise AssertionError("offset past the epoch")

    def _chunk(self, epoch: int, position: int) -> dict[str, torch.Tensor]:
        """The shuffled rows of the epoch's ``position``-th chunk; two kept in the buffer."""
        key = (epoch, position)
        if key in self._buffer:
            return self._buffer[key]
        chunk = self._order(epoch)[position]
        rows = self._read(chunk)
        n = next(iter(rows.values())).shape[0]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + chunk)
        perm = torch.randperm(n, generator=g)
        self._buffer[key] = {h: rows[h][perm] for h in self.hooks}
        while len(self._buffer) > 2:
            self._buffer.popitem(last=False)
        return self._buffer[key]

    def _read(self, chunk: int) -> dict[str, torch.Tensor]:
        """A chunk's rows in forward order: from the cache where every hook's shard is there,
        else from the model (written to the cache when there is one)."""
        if self.cache_dir is not None:
            rows = {h: self._cached(h, chunk) for h in self.hooks}
            if all(r is not None for r in rows.values()):
                return rows  # type: ignore[return-value]
        rows = self._forward(self.tokens[self.chunks[chunk]])
        self.forwards += 1
        if self.cache_dir is not None:
            for hook, r in rows.items():
                self._write(hook, chunk, r)
        return rows

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every hook's rows for ``tokens`` from one forward per batch, in the storage dtype."""
        device = torch.device(self.model.cfg.device)
        autocast = torch.autocast(
            device.type, self.forward_dtype, enabled=self.forward_dtype != torch.float32
        )
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        with autocast:
            for batch in tokens.split(self.forward_batch):
                _, cache = self.model.run_with_cache(
                    batch.to(device),
                    names_filter=self.hooks,
                    stop_at_layer=stop_at_layer(self.hooks),
                )
                for hook in self.hooks:
                    acts = cache[hook]
                    if acts.shape[:2] != batch.shape:
                        raise SignSAEError(
                            f"Hook {hook} gives activations of shape {tuple(acts.shape)}, not "
                            "(batch, position, ...); only per-token hooks can be streamed."
                        )
                    acts = acts[:, 1:]
                    parts[hook].append(
                        acts.reshape(-1, math.prod(acts.shape[2:])).to("cpu", self.dtype)
                    )
        return {h: torch.cat(p) for h, p in parts.items()}

    def _path(self, hook: str, chunk: int) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / hook / _CHUNK_FILE.format(chunk)

    def _metadata(self, hook: str, chunk: int) -> dict[str, str]:
        ids = self.chunks[chunk]
        digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        return {**{k: str(v) for k, v in self.request.items()}, "hook": hook, "sequences": digest}

    def _cached(self, hook: str, chunk: int) -> torch.Tensor | None:
        """One shard of the cache, checked against its sha256 on this process's first read and
        against the stream it belongs to; None when it is not there (yet)."""
        path = self._path(hook, chunk)
        digest_file = path.with_suffix(".sha256")
        if not (path.is_file() and digest_file.is_file()):
            return None
        fix = (
            "delete it (the next run streams that chunk from the model again) or set data.cache "
            "to false to stream every chunk from the model"
        )
        if path not in self._verified:
            if sha256_file(path) != digest_file.read_text().strip():
                raise SignSAEError(
                    f"Activation cache shard {path} does not match the sha256 recorded when it "
                    f"was written (damaged); {fix}."
                )
            self._verified.add(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta, rows = f.metadata() or {}, f.get_tensor(hook)
        except (SafetensorError, OSError) as e:
            raise SignSAEError(f"Activation cache shard {path} is unreadable ({e}); {fix}.") from e
        want = self._metadata(hook, chunk)
        stale = sorted(k for k in want if meta.get(k) != want[k])
        expected_rows = len(self.chunks[chunk]) * self.per_seq
        if stale or rows.shape[0] != expected_rows or rows.dtype != self.dtype:
            what = ", ".join(stale) or f"shape {tuple(rows.shape)} {rows.dtype}"
            raise SignSAEError(
                f"Activation cache shard {path} was written for another stream ({what} differ "
                f"from this run's); {fix}."
            )
        return rows

    def _write(self, hook: str, chunk: int, rows: torch.Tensor) -> None:
        """One shard, atomically: data first, then its sha256 (a shard without one is unread).
        A full disk is one line naming the shard; the run resumes once there is space."""
        path = self._path(hook, chunk)
        path.with_suffix(".sha256").unlink(missing_ok=True)
        with staged_file(path, rows.numel() * rows.element_size()) as tmp:
            safetensors.torch.save_file(
                {hook: rows.contiguous()}, tmp, metadata=self._metadata(hook, chunk)
            )
            digest = sha256_file(tmp)
        atomic_write_text(path.with_suffix(".sha256"), digest)
        self._verified.add(path)


class HookBatches:
    """One hook's batches of an ``ActivationStream`` (a trainer's ``BatchSource``); every SAE
    at the hook reads the same batch, computed once per step."""

    def __init__(self, stream: ActivationStream, hook: str) -> None:
        self.stream, self.hook = stream, hook

    def batch(self, step: int) -> torch.Tensor:
        return self.stream.batch(step)[self.hook]

    def shard(self, rank: int, world: int) -> HookBatches:
        """Itself: a stream is built for one rank of one world (it streams only that share)."""
        if (rank, world) != (self.stream.rank, self.stream.world):
            raise SignSAEError(
                f"This stream was built for rank {self.stream.rank} of {self.stream.world}, "
                f"not {rank} of {world}."
            )
        return self


def describe(stream: ActivationStream) -> dict[str, Any]:
    """What ``train.json`` records of a run's stream."""
    return {
        **stream.request,
        "hooks": stream.hooks,
        "chunks": len(stream.chunks),
        "rank_tokens_per_epoch": stream.rows_per_epoch,
        "world": stream.world,
    }
