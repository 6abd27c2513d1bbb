"""Atomic writes and safe reads of SAE folders (SAELens layout: cfg.json + sae_weights.safetensors).

Writes go to a temporary sibling and are renamed into place, so a crash leaves either the old
folder or the new one, never a half-written mix. Reads accept safetensors only and check the
config against the registered architecture before anything is built.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sign_sae.errors import SignSAEError

# Keys SAELens writes into cfg.json, or its disk loader adds, beside the dataclass fields.
_EXTRA_CFG_KEYS = {"architecture", "metadata", "finetuning_scaling_factor"}
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_folder(path: Path, files: Mapping[str, dict[str, torch.Tensor] | dict[str, Any]]) -> None:
    """Write a folder of safetensors (tensor dicts) and JSON files atomically.

    ``files`` maps file names to contents: names ending in ``.safetensors`` take a dict of
    tensors, everything else a JSON-serialisable dict. The whole folder is replaced at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                tensors = {k: v.detach().contiguous() for k, v in content.items()}
                save_file(tensors, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SignSAEError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt.") from e
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

    Refuses pickles, names a corrupt or truncated weights file, an unregistered architecture,
    and unknown / missing / wrongly typed config fields; then loads through SAELens.
    """
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY

    folder = Path(path)
    cfg = read_cfg(folder)
    arch = cfg.get("architecture")
    if arch not in SAE_CLASS_REGISTRY:
        raise SignSAEError(
            f"{folder}/{SAE_CFG_FILENAME} names architecture {arch!r}, which is not registered "
            f"with SAELens (known: {sorted(SAE_CLASS_REGISTRY)}). Import the package that "
            "defines it first (e.g. `import sign_sae`)."
        )
    sae_cls, cfg_cls = SAE_CLASS_REGISTRY[arch]
    check_cfg_fields(cfg, cfg_cls)
    weights = read_weights(folder / SAE_WEIGHTS_FILENAME)
    try:
        return SAE.load_from_disk(folder, device=device, dtype=dtype)
    except RuntimeError as e:
        raise SignSAEError(
            f"The weights in {folder} do not fit its {arch!r} config ({len(weights)} tensors: "
            f"{sorted(weights)[:8]}...): {e}"
        ) from e
