"""Pretrained SAEs through SAELens's registry: ``SAE.from_pretrained(release, sae_id)``.

A release maps SAE ids to folders in SAELens's layout (``<path>/cfg.json``,
``<path>/sae_weights.safetensors``, optionally ``<path>/sparsity.safetensors``) inside a source:
a hub repository (``owner/name``) or a local folder. Releases are described exactly as in
SAELens's ``pretrained_saes.yaml``; ``sign_sae/releases.yaml`` is the list shipped with the
package, and ``register_release`` / ``register_releases`` add more at run time.

Importing ``sign_sae`` installs the loader ``"sign_sae"`` into SAELens's loader table (it reads
any registered architecture, ``sa_gsae`` included, from a local folder or the hub, safetensors
only) and puts the shipped releases into SAELens's directory; nothing of SAELens's own code is
replaced, so ``SAE.from_pretrained`` is SAELens's. ``load_pretrained(release, sae_id)`` is the
same call with errors that list close matches for an unknown release or SAE id. Registered
releases enter SAELens's directory on registration and at every ``find_release`` /
``load_pretrained`` call (so also after that directory's cache is cleared).
"""

import difflib
import re
from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import EntryNotFoundError
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.loading.pretrained_sae_loaders import (
    LLM_METADATA_KEYS,
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    NAMED_PRETRAINED_SAE_LOADERS,
)
from sae_lens.loading.pretrained_saes_directory import (
    PretrainedSAELookup,
    get_pretrained_saes_directory,
)
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.util import str_to_dtype

from sign_sae.errors import SignSAEError, unreachable
from sign_sae.storage import check_inside, read_cfg, read_weights, verify_folder

LOADER = "sign_sae"
SHIPPED = "releases.yaml"
CARD_FILE = "card.json"  # beside an SAE's weights in a release: recipe, commit, held-out metrics
_HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_ENTRY_KEYS = {"repo_id", "model", "conversion_func", "saes", "config_overrides"}
_SAE_KEYS = {"id", "path", "variance_explained", "l0", "neuronpedia", "norm_scaling_factor"}
# Releases registered through this module, by name; SAELens's directory gets the same objects.
_REGISTERED: dict[str, PretrainedSAELookup] = {}


# ---- registration -----------------------------------------------------------------------------
def register_release(
    name: str,
    source: str | Path,
    saes: Mapping[str, str] | Iterable[str] | None = None,
    *,
    model: str | None = None,
    norm_scaling_factor: Mapping[str, float] | None = None,
    replace: bool = False,
) -> PretrainedSAELookup:
    """Register release ``name`` so that ``SAE.from_pretrained(name, sae_id)`` loads from ``source``.

    ``source``: a local folder (a ``Path``, an absolute path, or a string starting with ``.`` or
    ``~``) or a hub repo id ``owner/name``. ``saes``: SAE id -> folder inside the source, or ids
    that are their own folders; ``None`` finds every SAE folder under a local source (its id is
    its relative path). ``model`` defaults to the first SAE's ``metadata.model_name`` (local
    sources). Registering the same release twice is a no-op; changing it needs ``replace=True``.
    """
    local = _local_path(source, Path.cwd())
    if saes is None:
        if local is None:
            raise SignSAEError(
                f"Release {name!r}: list the SAE ids of hub repo {source!r} (saes=...); only "
                "local folders are searched."
            )
        if (local / SAE_CFG_FILENAME).is_file():  # one SAE folder: its hook is its id
            saes = {_metadata(local).get("hook_name") or local.name: "."}
        else:
            saes = {p: p for p in find_sae_folders(local)}
        if not saes:
            raise FileNotFoundError(
                f"Release {name!r}: no SAE folders (with {SAE_CFG_FILENAME}) under {local}."
            )
    elif not isinstance(saes, Mapping):
        saes = {s: s for s in saes}
    if model is None and local is not None and saes:
        model = _metadata(local / next(iter(saes.values()))).get("model_name")
    entry: dict[str, Any] = {
        "repo_id": str(local) if local is not None else str(source),
        "model": model,
        "conversion_func": LOADER,
        "saes": [{"id": i, "path": p} for i, p in saes.items()],
    }
    for item in entry["saes"]:
        if norm_scaling_factor and item["id"] in norm_scaling_factor:
            item["norm_scaling_factor"] = norm_scaling_factor[item["id"]]
    return _register(lookup_from_entry(name, entry, Path.cwd()), replace)


def register_releases(path: str | Path, replace: bool = False) -> list[str]:
    """Register every release of a YAML file in SAELens's ``pretrained_saes.yaml`` format (as
    written by ``sign_sae.export``); a local ``repo_id`` is relative to the file's folder."""
    path = Path(path)
    return [_register(lookup, replace).release for lookup in _read_release_file(path)]


def unregister_release(name: str) -> None:
    """Remove a release registered through this module (no-op for unknown names)."""
    lookup = _REGISTERED.pop(name, None)
    directory = get_pretrained_saes_directory()
    if lookup is not None and directory.get(name) is lookup:
        del directory[name]


def registered_releases() -> dict[str, PretrainedSAELookup]:
    """The releases registered through this module (shipped ones included), by name."""
    _sync()
    return dict(_REGISTERED)


def find_sae_folders(root: Path) -> list[str]:
    """Relative POSIX paths of the folders under ``root`` holding a ``cfg.json`` (sorted)."""
    return sorted(p.parent.relative_to(root).as_posix() for p in Path(root).rglob(SAE_CFG_FILENAME))


def lookup_from_entry(name: str, entry: Mapping[str, Any], base: Path) -> PretrainedSAELookup:
    """Validate one release entry (``pretrained_saes.yaml`` schema) and build its lookup.

    Local sources are resolved against ``base`` and every listed SAE folder is checked."""
    where = f"Release {name!r}"
    if not isinstance(entry, Mapping):
        raise SignSAEError(f"{where} must be a mapping with repo_id, model and saes.")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    missing = sorted({"repo_id", "model", "saes"} - set(entry))
    if unknown or missing:
        raise SignSAEError(
            f"{where}: unknown keys {unknown}, missing keys {missing}; an entry has "
            f"{sorted(_ENTRY_KEYS)} (saes: a list of {sorted(_SAE_KEYS)})."
        )
    if not isinstance(entry["model"], str) or not entry["model"]:
        raise SignSAEError(f"{where}: 'model' must name the model the SAEs read (pass model=...).")
    items = entry["saes"]
    if not isinstance(items, list) or not items:
        raise SignSAEError(f"{where}: 'saes' must be a non-empty list of {{id, path}} mappings.")
    local = _local_path(str(entry["repo_id"]), base)
    loader = entry.get("conversion_func") or LOADER
    if loader not in NAMED_PRETRAINED_SAE_LOADERS:
        raise SignSAEError(f"{where}: unknown conversion_func {loader!r}.")
    if local is not None and loader != LOADER:
        raise SignSAEError(
            f"{where}: a local folder needs conversion_func {LOADER!r}, not {loader!r}."
        )
    saes: dict[str, str] = {}
    for item in items:
        if (
            not isinstance(item, Mapping)
            or not {"id", "path"} <= set(item)
            or set(item) - _SAE_KEYS
        ):
            raise SignSAEError(
                f"{where}: each SAE needs 'id' and 'path' (allowed: {sorted(_SAE_KEYS)})."
            )
        sae_id, rel = str(item["id"]), str(item["path"])
        if sae_id in saes:
            raise SignSAEError(f"{where}: SAE id {sae_id!r} is listed twice.")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise SignSAEError(
                f"{where}: SAE path {rel!r} must be relative and stay inside the source."
            )
        if local is not None:
            _check_sae_folder(local / rel, f"{where}, SAE {sae_id!r}")
        saes[sae_id] = rel
    return PretrainedSAELookup(
        release=name,
        repo_id=str(local) if local is not None else str(entry["repo_id"]),
        model=entry["model"],
        conversion_func=loader,
        saes_map=saes,
        expected_var_explained={str(i["id"]): i.get("variance_explained", 1.0) for i in items},
        expected_l0={str(i["id"]): i.get("l0", 0.0) for i in items},
        neuronpedia_id={str(i["id"]): i.get("neuronpedia") for i in items},
        norm_scaling_factor={
            str(i["id"]): i["norm_scaling_factor"] for i in items if "norm_scaling_factor" in i
        },
        config_overrides=entry.get("config_overrides"),
    )


def _register(lookup: PretrainedSAELookup, replace: bool) -> PretrainedSAELookup:
    name = lookup.release
    old = _REGISTERED.get(name)
    if old == lookup:
        _sync()
        return old
    if old is not None and not replace:
        raise SignSAEError(
            f"Release {name!r} is already registered with other contents; pass replace=True."
        )
    unregister_release(name)
    _REGISTERED[name] = lookup
    try:
        _sync()
    except ValueError:
        del _REGISTERED[name]
        raise
    return lookup


def _read_release_file(path: Path) -> list[PretrainedSAELookup]:
    """The releases of a YAML file; local repo ids are relative to its folder."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SignSAEError(f"{path} must map release names to entries.")
    base = path.parent.resolve()
    return [lookup_from_entry(str(name), entry, base) for name, entry in data.items()]


def _sync() -> dict[str, PretrainedSAELookup]:
    """Put every registered release into SAELens's (cached) directory; returns the directory."""
    directory = get_pretrained_saes_directory()
    for name, lookup in _REGISTERED.items():
        current = directory.setdefault(name, lookup)
        if current is not lookup:
            raise SignSAEError(
                f"Release name {name!r} is taken by SAELens's own directory; register it under "
                "another name."
            )
    return directory


def _local_path(source: str | Path, base: Path) -> Path | None:
    """The absolute folder of a local source, or None for a hub repo id."""
    if isinstance(source, str) and not _is_local(source):
        if not _HUB_REPO.match(source):
            raise SignSAEError(
                f"Source {source!r} is neither a local folder (a Path, an absolute path or one "
                "starting with ./) nor a hub repo id (owner/name)."
            )
        if (base / source).is_dir():
            raise SignSAEError(
                f"Source {source!r} is both a local folder and a possible hub repo id; write "
                f"'./{source}' (or pass a Path) for the folder."
            )
        return None
    folder = (base / Path(source).expanduser()).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"Release folder {folder} does not exist.")
    return folder


def _is_local(source: str) -> bool:
    """A source string names a local folder when absolute or starting with . or ~."""
    return source.startswith((".", "~", "/"))


def _check_sae_folder(folder: Path, where: str) -> None:
    """Raise a clear error unless ``folder`` holds cfg.json and sae_weights.safetensors."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: no folder {folder}.")
    read_cfg(folder)  # explains a missing or broken cfg.json
    if not (folder / SAE_WEIGHTS_FILENAME).is_file():
        raise FileNotFoundError(
            f"{where}: {folder} is not an SAE folder: no {SAE_WEIGHTS_FILENAME} beside "
            f"{SAE_CFG_FILENAME}."
        )


def _metadata(folder: Path) -> dict[str, Any]:
    """The metadata of an SAE folder's cfg.json (top level for pre-6.0 configs)."""
    cfg = read_cfg(folder)
    return cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else cfg


# ---- errors with close matches ----------------------------------------------------------------
def find_release(release: str, sae_id: str | None = None) -> PretrainedSAELookup:
    """The directory entry of ``release`` (SAELens's or registered here); unknown names and ids
    raise a ValueError listing close matches."""
    directory = _sync()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=5, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SignSAEError(
            f"Unknown SAE release {release!r}.{hint} Releases are listed by "
            "sae_lens.loading.pretrained_saes_directory.get_pretrained_saes_directory(); add a "
            "local one with sign_sae.releases.register_release(name, folder)."
        )
    lookup = directory[release]
    if sae_id is not None and sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(repr(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
        raise SignSAEError(
            f"Unknown SAE id {sae_id!r} in release {release!r}.{hint} It has {len(ids)} "
            f"id(s): {shown}."
        )
    return lookup


def load_pretrained(release: str, sae_id: str, **kwargs: Any) -> SAE:
    """``SAE.from_pretrained(release, sae_id, **kwargs)``, after checking the release and the id
    (unknown ones raise a ValueError listing close matches; a hub repo id passes through)."""
    if release in _sync() or "/" not in release:
        find_release(release, sae_id)
    try:
        return SAE.from_pretrained(release, sae_id, **kwargs)
    except OSError as e:
        error = unreachable(f"SAE {sae_id!r} of release {release!r}", e)
        if error is None:
            raise
        raise error from e


# ---- the loader -------------------------------------------------------------------------------
def load_release_sae(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """SAELens loader ``"sign_sae"``: (cfg dict, state dict, log10 sparsity or None) of one SAE
    folder of a local or hub source."""
    names = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)
    folder = _fetch(repo_id, folder_name, names, force_download)
    cfg = _release_cfg(folder, cfg_overrides, f"{repo_id}:{folder_name}")
    dtype = str_to_dtype(cfg.get("dtype", "float32"))
    state = {k: v.to(device, dtype) for k, v in read_weights(folder / SAE_WEIGHTS_FILENAME).items()}
    sparsity = None
    if (folder / SPARSITY_FILENAME).is_file():
        sparsity = read_weights(folder / SPARSITY_FILENAME)["sparsity"].to(device)
    return cfg, state, sparsity


def load_release_cfg(
    repo_id: str,
    folder_name: str,
    device: str | None = None,
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SAELens config getter ``"sign_sae"``: the cfg dict alone."""
    folder = _fetch(repo_id, folder_name, (SAE_CFG_FILENAME,), force_download)
    overrides = {**(cfg_overrides or {}), **({"device": device} if device else {})}
    return _release_cfg(folder, overrides, f"{repo_id}:{folder_name}")


def _fetch(repo_id: str, folder_name: str, names: Iterable[str], force_download: bool) -> Path:
    """The local folder of one SAE: inside a local source, or downloaded from the hub (a
    missing sparsity file is fine)."""
    if _is_local(repo_id):
        root = Path(repo_id).expanduser().resolve()
        folder = root / folder_name
        where = f"SAE {folder_name!r} of {repo_id}"
        check_inside(root, [folder, *(folder / n for n in names)], where)
        _check_sae_folder(folder, where)
        verify_folder(folder, "export or download the release again.")
        return folder
    paths = []
    for name in names:
        try:
            paths.append(
                hf_hub_download(repo_id, f"{folder_name}/{name}", force_download=force_download)
            )
        except EntryNotFoundError:
            if name != SPARSITY_FILENAME:
                raise
    return Path(paths[0]).parent


def _release_cfg(folder: Path, overrides: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """cfg.json with SAELens's overrides (device, dtype, neuronpedia id...) applied; metadata
    keys go into ``metadata`` so that strict configs (``sa_gsae``) accept them."""
    cfg = read_cfg(folder)
    arch = cfg.get("architecture", "standard")
    if arch not in SAE_CLASS_REGISTRY:
        raise SignSAEError(
            f"SAE {where} has architecture {arch!r}, which is not registered with SAELens "
            f"(registered: {', '.join(sorted(SAE_CLASS_REGISTRY))}). Import the package that "
            "defines it first (sign_sae registers 'sa_gsae')."
        )
    meta = cfg.get("metadata")
    for key, value in (overrides or {}).items():
        if key in LLM_METADATA_KEYS and isinstance(meta, dict):
            if value is not None:
                meta[key] = value
        else:
            cfg[key] = value
    return cfg


# ---- installation -----------------------------------------------------------------------------
def install() -> None:
    """Add the loader and the shipped releases to SAELens's tables; idempotent. Called once
    by ``sign_sae.register`` on import."""
    NAMED_PRETRAINED_SAE_LOADERS[LOADER] = load_release_sae
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS[LOADER] = load_release_cfg
    for lookup in _read_release_file(Path(str(files("sign_sae").joinpath(SHIPPED)))):
        _register(lookup, replace=True)  # the same entry again keeps the registered object
    _sync()
