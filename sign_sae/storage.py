"""Atomic, verified writes and safe reads of SAE folders (SAELens layout: cfg.json +
sae_weights.safetensors) and of every other artifact this toolkit persists.

A save stages its files in a temporary sibling folder, records their sha256 in ``sha256.json``
(the manifest, written last) and swaps the staged folder into place in one step (Linux's atomic
exchange; elsewhere two renames, undone by ``remove_stale`` when a kill falls between them). A
kill at any moment leaves the old folder or the new one, never a mix; files of the folder that
the save does not write are carried over unchanged. Reads accept safetensors only, check the
manifest when there is one (foreign SAELens folders have none) and check the config against the
registered architecture before anything is built. Files get 0666 and folders 0777 less the umask.
"""

import csv
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sign_sae.devices import check_device
from sign_sae.errors import SignSAEError

log = logging.getLogger(__name__)

MANIFEST = "sha256.json"  # {file name: sha256} of the files a save wrote; written last
# Keys SAELens writes into cfg.json, or its disk loader adds, beside the dataclass fields.
_EXTRA_CFG_KEYS = {"architecture", "metadata", "finetuning_scaling_factor"}
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
# Temporary names: .<name>.<pid>-<random>.tmp; a folder set aside by a two-rename swap ends -old.tmp
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<tag>[A-Za-z0-9_]+)\.tmp$")


def default_mode(folder: bool = False) -> int:
    """The permissions ``open`` / ``mkdir`` give: 0666 (files) or 0777 (folders) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


# Write refusals of the machine, not the code: what the one-line error says and how to fix it.
_REFUSALS = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("over the disk quota", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "make it writable or write elsewhere"),
    errno.EACCES: ("permission denied", "fix the permissions or write elsewhere"),
}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an OSError


def write_refused(error: BaseException, path: Path | str, needs: int | None = None) -> str | None:
    """The one-line reason when ``error`` is the machine refusing a write to ``path`` (disk
    full, over quota, read-only, no permission), else None. ``needs``: the bytes the write
    needed, when known. The CLI words such an ``OSError`` raised anywhere with it too."""
    code = getattr(error, "errno", None)
    if code is None and isinstance(error, SafetensorError):
        found = _OS_ERROR.search(str(error))
        code = int(found[1]) if found else None
    if code not in _REFUSALS:
        return None
    what, fix = _REFUSALS[code]
    size = f" (the write needed {_size(needs)})" if needs is not None else ""
    return (
        f"{what} writing {path}{size}: {fix} and run the same command again; it resumes where "
        "it stopped (finished work is kept, nothing half-written is left)."
    )


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 1_000_000 else f"{n / 1e6:,.1f} MB"


@contextmanager
def writing(path: Path, needs: int | None = None) -> Iterator[None]:
    """Turn a refused write inside the block into a one-line ``SignSAEError`` naming ``path``
    (the file or folder being written) and ``needs`` bytes; other errors pass unchanged."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = write_refused(e, path, needs)
        if reason is None:
            raise
        raise SignSAEError(reason) from e


@contextmanager
def staged_file(path: Path, needs: int | None = None) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; when the block ends without error it gets the
    umask's permissions and replaces ``path`` in one rename, otherwise it is removed. A refused
    write (full disk, ...) is a one-line ``SignSAEError`` (``writing``)."""
    path = Path(path)
    with writing(path, needs):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, default_mode(folder=False))  # mkstemp and safetensors make 0600
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file via a temporary file and an atomic rename; characters that UTF-8
    cannot encode (lone surrogates from broken token strings) are replaced, not fatal."""
    atomic_write_bytes(path, text.encode("utf-8", errors="replace"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary file (synced to disk) and an atomic rename."""
    with staged_file(path, len(data)) as tmp:
        _write_synced(tmp, data)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def staged_folder(path: Path, needs: int | None = None) -> Iterator[Path]:
    """A temporary folder to write into; when the block ends without error its files replace
    the ones of the same name in ``path`` all at once, with their hashes in ``MANIFEST``. Other
    files of ``path`` are kept (hard-linked into the new folder before the swap). On any error
    the temporary folder goes; a refused write is a one-line ``SignSAEError`` (``writing``)
    naming ``path`` and ``needs``, the bytes the save needs when the caller knows them."""
    path = Path(path)
    with writing(path, needs):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp"))
        try:
            os.chmod(tmp, default_mode(folder=True))
            yield tmp
            _commit(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the old folder


def _commit(tmp: Path, path: Path) -> None:
    written = {p.name for p in tmp.iterdir() if p.name != MANIFEST}
    manifest = {}
    if path.is_dir():
        try:
            old = _read_manifest(path, "this save writes a new one.") or {}
        except SignSAEError as e:  # e.g. a damaged checkpoint written again after a fallback
            log.warning("%s Files it does not write are kept without hashes.", e)
            old = {}
        for p in path.iterdir():
            if p.name not in written and p.name != MANIFEST:
                _link(p, tmp / p.name)
                if p.name in old:
                    manifest[p.name] = old[p.name]
    for name in sorted(written):
        if (tmp / name).is_file() and not (tmp / name).is_symlink():
            os.chmod(tmp / name, default_mode())  # safetensors creates files 0600
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
                manifest[name] = hashlib.file_digest(f, "sha256").hexdigest()
    # inside the staged folder: the swap below makes it appear atomically with the rest
    _write_synced(tmp / MANIFEST, json.dumps(dict(sorted(manifest.items())), indent=1).encode())
    os.chmod(tmp / MANIFEST, default_mode())
    if path.exists():
        _swap(tmp, path)
    else:
        os.replace(tmp, path)


def _link(src: Path, dst: Path) -> None:
    """Carry ``src`` into the staged folder without copying data where the file system allows."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path`` and the old folder at ``new``, atomically where possible."""
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if exchange is not None:
        if exchange(at_fdcwd, bytes(new), at_fdcwd, bytes(path), rename_exchange) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(path))
    aside = path.with_name(f".{path.name}.{os.getpid()}-old.tmp")
    os.rename(path, aside)  # a kill here leaves `aside`; remove_stale moves it back
    os.rename(new, path)
    os.rename(aside, new)


def remove_stale(root: Path) -> int:
    """Delete temporary files and folders (``.*.tmp``) under ``root`` whose writing process is
    gone, and move back a folder that a killed two-rename swap left aside; returns how many."""
    root, done = Path(root), 0
    if not root.is_dir():
        return 0
    for p in sorted(root.rglob(".*.tmp"), key=lambda q: len(q.parts)):
        m = _TMP.match(p.name)
        if not p.exists() and not p.is_symlink():
            continue  # inside a folder removed a moment ago
        if m and int(m["pid"]) != os.getpid() and _alive(int(m["pid"])):
            continue  # another process is writing it now
        target = p.with_name(m["name"]) if m else None
        if m and m["tag"] == "old" and target is not None and not target.exists():
            os.rename(p, target)
            log.warning("restored %s, left aside by an interrupted save", target)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done += 1
    if done:
        log.info("removed %d stale temporary file(s) under %s", done, root)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file; created) for the block: processes that
    share a folder take turns (``fcntl`` locks, local or NFS file systems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, mode=default_mode(folder=False))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("waiting for %s: another process holds it", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_folder(path: Path, files: Mapping[str, dict[str, torch.Tensor] | dict[str, Any]]) -> None:
    """Write safetensors (tensor dicts) and JSON files into folder ``path`` atomically.

    ``files`` maps file names to contents: names ending in ``.safetensors`` take a dict of
    tensors, everything else a JSON-serialisable dict. They replace their namesakes at once
    (``staged_folder``); other files of the folder stay.
    """
    with staged_folder(path, sum(map(_nbytes, files.values()))) as tmp:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                tensors = {k: v.detach().contiguous() for k, v in content.items()}
                save_file(tensors, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2))


def _nbytes(content: Mapping[str, Any]) -> int:
    """About the bytes a file of ``content`` takes: its tensors' data, or its JSON text."""
    if all(isinstance(v, torch.Tensor) for v in content.values()):
        return sum(v.numel() * v.element_size() for v in content.values())
    return len(json.dumps(content, indent=2, default=str))


def save_sae(sae: Any, path: Path) -> Path:
    """Save an SAE folder through its own SAELens ``save_inference_model`` (training SAEs) or
    ``save_model``, atomically and with its manifest, after checking every parameter is finite."""
    check_finite(dict(sae.named_parameters()), f"the SAE saved to {path}")
    with staged_folder(path, _nbytes(sae.state_dict())) as tmp:
        save = getattr(sae, "save_inference_model", None) or sae.save_model
        save(tmp)
    return Path(path)


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse NaN / Inf in any tensor, naming it, before anything is written."""
    for name, t in tensors.items():
        bad = t.numel() - int(torch.isfinite(t.detach()).sum())
        if bad:
            raise SignSAEError(
                f"{name} of {what} holds {bad} NaN/Inf value(s); nothing was written. Lower the "
                "learning rate, or drop non-finite input rows (skip_nonfinite), and train again."
            )


def _read_manifest(folder: Path, fix: str) -> dict[str, str] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path, dict, fix=fix)
    plain = all(
        isinstance(v, str) and Path(k).name == k not in ("", ".", "..") for k, v in manifest.items()
    )
    if not plain:
        raise SignSAEError(
            f"{path} is not a manifest of plain file names and hashes; it is corrupt; {fix}"
        )
    return manifest


def verify_folder(folder: Path, fix: str, required: Iterable[str] = ()) -> None:
    """Check every file ``MANIFEST`` lists against its sha256; ``required`` files must be listed
    (a folder without a manifest passes unless something is required). ``fix`` ends the error,
    also when the manifest itself is damaged."""
    folder = Path(folder)
    manifest = _read_manifest(folder, fix)
    missing = [n for n in required if n not in (manifest or {})]
    if missing:
        raise SignSAEError(f"{folder} has no recorded hash for {missing} ({MANIFEST}); {fix}")
    for name, digest in (manifest or {}).items():
        path = folder / name
        if not path.is_file():
            raise SignSAEError(f"{path} is missing (listed in {MANIFEST}); {fix}")
        if sha256_file(path) != digest:
            raise SignSAEError(
                f"{path} does not match the sha256 recorded when it was written: it is corrupt "
                f"or was changed; {fix}"
            )


def check_inside(root: Path, paths: Iterable[Path], what: str) -> None:
    """Refuse any of ``paths`` (or a symlink on the way to it) that leads out of ``root``: a
    release or run folder must not reach files elsewhere on the machine."""
    base = Path(root).resolve()
    for path in paths:
        if Path(path).exists() and not Path(path).resolve().is_relative_to(base):
            raise SignSAEError(
                f"{path} in {what} is a symlink to {Path(path).resolve()}, outside {base}; "
                "replace the link with the file itself."
            )


def read_json(
    path: Path, expect: type = object, fields: Mapping[str, type] | None = None, fix: str = ""
) -> Any:
    """A JSON file, checked: a one-line error names the file, what is wrong and ``fix`` when it
    is not UTF-8 JSON, not an ``expect`` (``dict``, ``list``), or, for an object, lacks one of
    ``fields`` or holds one of another type (``{"steps": int, "wall_s": float}``). A missing
    file stays a ``FileNotFoundError`` (the CLI prints it as one line too)."""
    path = Path(path)
    fix = fix or "the file is truncated or corrupt."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SignSAEError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(data, expect):
        raise SignSAEError(
            f"{path} should hold a JSON {_json_type(expect)}, not {_json_type(type(data))}; {fix}"
        )
    fields = fields if isinstance(data, dict) and fields else {}
    missing = [k for k in fields if k not in data]
    wrong = [
        f"{k} is a {_json_type(type(data[k]))}, not a {_json_type(t)}"
        for k, t in fields.items()
        if k in data and not _is_instance(data[k], t)
    ]
    if missing or wrong:
        what = ", ".join(([f"lacks {missing}"] if missing else []) + wrong)
        raise SignSAEError(f"{path}: {what}; {fix}")
    return data


def _json_type(kind: type) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number",
             bool: "boolean", type(None): "null"}  # fmt: skip
    return names.get(kind, kind.__name__)


def read_table(path: Path) -> list[dict[str, Any]]:
    """The rows of a results table (``results.json``: an array of objects, or ``results.csv``:
    UTF-8, numbers parsed, empty cells None), with a one-line error naming the file and the
    command that writes it again when it is damaged."""
    path = Path(path)
    fix = (
        f"delete it and run `sign-sae eval {path.parent}` to write it again from the trained runs."
    )
    if path.suffix.lower() == ".json":
        rows = read_json(path, list, fix=fix)
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
        if bad:
            raise SignSAEError(f"{path}: row {bad[0]} is not a JSON object; {fix}")
        return rows
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [{k: _parse_cell(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing.") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise SignSAEError(f"{path} is not a UTF-8 CSV table ({e}); {fix}") from e


def _parse_cell(text: str | None) -> Any:
    if text is None or text.strip() == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; refuse pickles and explain corrupt files."""
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise SignSAEError(
            f"{path} is a pickle-based checkpoint; sign-sae only loads safetensors "
            "(pickles can run code). Convert it with safetensors.torch.save_file in a trusted "
            "environment."
        )
    if not path.is_file():
        raise FileNotFoundError(f"No weights at {path}: expected a {SAE_WEIGHTS_FILENAME} file.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SignSAEError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt. "
            "Re-export or re-download it."
        ) from e


def read_cfg(folder: Path) -> dict[str, Any]:
    """Read cfg.json from an SAE folder with a clear error when it is missing or not JSON."""
    folder = Path(folder)
    cfg_path = folder / SAE_CFG_FILENAME
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; expected an SAE folder with cfg.json.")
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if not cfg_path.is_file():
        hint = (
            f" It holds pickle files ({', '.join(pickles)}), which are refused." if pickles else ""
        )
        raise FileNotFoundError(
            f"{folder} is not an SAE folder: no {SAE_CFG_FILENAME}.{hint} "
            f"Expected {SAE_CFG_FILENAME} + {SAE_WEIGHTS_FILENAME} as written by save_model."
        )
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise SignSAEError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg


def check_cfg_fields(cfg: Mapping[str, Any], cfg_cls: type) -> None:
    """Raise a clear error for unknown, missing or wrongly typed fields of a config dict."""
    known = {f.name: f for f in fields(cfg_cls)}
    unknown = sorted(set(cfg) - set(known) - _EXTRA_CFG_KEYS)
    if unknown:
        raise SignSAEError(
            f"Unknown config field(s) {unknown} for {cfg_cls.__name__}; known fields are "
            f"{sorted(known)}. Remove them or check the file is for this architecture."
        )
    missing = [
        n
        for n, f in known.items()
        if f.default is MISSING and f.default_factory is MISSING and n not in cfg
    ]
    if missing:
        raise SignSAEError(f"Config for {cfg_cls.__name__} is missing required field(s) {missing}.")
    for name, value in cfg.items():
        expected = _simple_type(known[name].type) if name in known else None
        if expected is not None and not _is_instance(value, expected):
            raise SignSAEError(
                f"Config field {name!r} should be {expected.__name__}, got {value!r} "
                f"({type(value).__name__})."
            )


def _simple_type(annotation: Any) -> type | None:
    if annotation in (int, float, bool, str) or annotation in ("int", "float", "bool", "str"):
        return {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)
    return None


def _is_instance(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def load_sae(path: str | Path, device: str = "cpu", dtype: str | None = None) -> Any:
    """Load an SAE folder safely: checks before anything is built, clear errors after.

    Refuses pickles, names a file that no longer matches its recorded hash (when the folder has
    a manifest), a corrupt or truncated weights file, an unregistered architecture, and unknown /
    missing / wrongly typed config fields; then loads through SAELens.
    """
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    check_device(device)
    folder = Path(path)
    cfg = read_cfg(folder)
    verify_folder(folder, "re-export, re-download or retrain the SAE.")
    arch = cfg.get("architecture")
    if arch not in SAE_CLASS_REGISTRY:
        raise SignSAEError(
            f"{folder}/{SAE_CFG_FILENAME} names architecture {arch!r}, which is not registered "
            f"with SAELens (known: {sorted(SAE_CLASS_REGISTRY)}). Import the package that "
            "defines it first (e.g. `import sign_sae`)."
        )
    cfg_cls = SAE_CLASS_REGISTRY[arch][1]
    training_cfg_cls = SAE_TRAINING_CLASS_REGISTRY.get(arch, (None, None))[1]
    inference_fields = {f.name for f in fields(cfg_cls)} | _EXTRA_CFG_KEYS
    if training_cfg_cls is not None and set(cfg) - inference_fields:
        cfg_cls = training_cfg_cls  # a training checkpoint: SAELens keeps the inference fields
    check_cfg_fields(cfg, cfg_cls)
    weights = read_weights(folder / SAE_WEIGHTS_FILENAME)
    try:
        return SAE.load_from_disk(folder, device=device, dtype=dtype)
    except RuntimeError as e:
        raise SignSAEError(
            f"The weights in {folder} do not fit its {arch!r} config ({len(weights)} tensors: "
            f"{sorted(weights)[:8]}...): {e}"
        ) from e
