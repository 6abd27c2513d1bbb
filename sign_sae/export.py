"""Export trained SAEs as a SAELens release folder, and SA-GSAEs as doubled non-negative SAEs.

``export`` writes, for a run folder (every trained ``RUN_DIR/<name>/sae``) or one SAE folder::

    OUT_DIR/<sae_id>/cfg.json
    OUT_DIR/<sae_id>/sae_weights.safetensors
    OUT_DIR/<sae_id>/sparsity.safetensors   (only when activations are given)
    OUT_DIR/release.yaml                    (the release entry, pretrained_saes.yaml schema)
    OUT_DIR/README.md

``sparsity.safetensors`` holds ``{"sparsity": log10(freq + 1e-10)}`` per latent, SAELens's
convention, with the firing frequency counted as ``f != 0`` (a latent firing only negative is
alive). The SAE id is the SAE's hook when one exported SAE reads it, else ``<hook>/<name>``.

``to_doubled_jumprelu`` turns an SA-GSAE into an exactly equivalent ``JumpReLUSAE`` for tools that
assume non-negative latents: latent ``i`` is the positive part of signed latent ``i`` and latent
``d_sae + i`` the negated negative part, with decoder rows ``[D, -D]``.
"""

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sign_sae.harvest import ActivationCache, InvalidCacheError
from sign_sae.metrics import LatentStats
from sign_sae.releases import LOADER
from sign_sae.sae import ARCHITECTURE, SAGSAE
from sign_sae.storage import atomic_write_text, read_cfg, write_folder

log = logging.getLogger(__name__)

RELEASE_FILE = "release.yaml"
README_FILE = "README.md"
SPARSITY_EPS = 1e-10  # as SAELens's trainer: a dead latent gets log10 sparsity -10
Activations = torch.Tensor | ActivationCache | str | Path


# ---- doubled non-negative export ----------------------------------------------------------------
@torch.no_grad()
def to_doubled_jumprelu(sae: SAGSAE) -> JumpReLUSAE:
    """An SAELens ``JumpReLUSAE`` computing the same reconstruction as ``sae``.

    Two-sided: ``2 * d_sae`` latents, ``[i+ for all i] + [i- for all i]``; ``i+`` uses encoder
    column ``w_i``, bias ``b_i``, threshold ``t+_i``, decoder ``d_i``; ``i-`` uses ``-s_i w_i``,
    ``-b-_i``, ``t-_i`` and ``-d_i`` (tied: ``s = 1``, ``b- = b``; untied: ``scale_neg``,
    ``b_enc_neg``). One-sided: the same ``d_sae`` latents (already a JumpReLU SAE).
    ``signed_from_doubled`` maps the doubled latents back to signed ones.
    """
    if not isinstance(sae, SAGSAE):
        raise TypeError(f"to_doubled_jumprelu takes a sign_sae.SAGSAE, got {type(sae).__name__}.")
    cfg = sae.cfg
    W_enc, b_enc, threshold, W_dec = sae.W_enc, sae.b_enc, sae.threshold_pos, sae.W_dec
    if cfg.two_sided:
        scale = 1.0 if cfg.tied else sae.scale_neg
        b_neg = b_enc if cfg.tied else sae.b_enc_neg
        W_enc = torch.cat([W_enc, -scale * W_enc], dim=1)
        b_enc = torch.cat([b_enc, -b_neg])
        threshold = torch.cat([threshold, sae.threshold_neg])
        W_dec = torch.cat([W_dec, -W_dec])
    if bool((threshold < 0).any()):
        raise ValueError(
            "This SA-GSAE has negative thresholds; a JumpReLU (ReLU then threshold) cannot "
            "reproduce them. Clamp them to >= 0 (as training does) first."
        )
    meta = {**cfg.metadata.to_dict(), "doubled_from": ARCHITECTURE}
    doubled = JumpReLUSAE(
        JumpReLUSAEConfig(
            d_in=cfg.d_in,
            d_sae=W_dec.shape[0],
            dtype=cfg.dtype,
            device=cfg.device,
            apply_b_dec_to_input=cfg.apply_b_dec_to_input,
            normalize_activations=cfg.normalize_activations,
            reshape_activations=cfg.reshape_activations,
            metadata=SAEMetadata(**meta),
        )
    )
    state = {"W_enc": W_enc, "b_enc": b_enc, "threshold": threshold, "W_dec": W_dec}
    doubled.load_state_dict({**state, "b_dec": sae.b_dec})
    return doubled


def signed_from_doubled(feature_acts: torch.Tensor) -> torch.Tensor:
    """Signed latents ``f[..., :d] - f[..., d:]`` from the latents of a two-sided doubled SAE."""
    width = feature_acts.shape[-1]
    if width % 2:
        raise ValueError(f"A doubled SAE has an even number of latents, got {width}.")
    return feature_acts[..., : width // 2] - feature_acts[..., width // 2 :]


# ---- release export ---------------------------------------------------------------------------
def export(
    source: str | Path,
    out_dir: str | Path,
    release_name: str | None = None,
    activations: Activations | None = None,
    *,
    doubled: bool = False,
    repo_id: str = ".",
    batch_size: int = 4096,
) -> Path:
    """Write the SAE(s) of ``source`` (a run folder or one SAE folder) as a SAELens release in
    ``out_dir``; returns the path of its ``release.yaml`` entry.

    ``activations`` (a ``[..., d_in]`` tensor, an ``ActivationCache`` or its folder) of the SAEs'
    hook give ``sparsity.safetensors``; without them it is omitted and README/YAML say so.
    ``doubled`` writes each SA-GSAE as its ``to_doubled_jumprelu`` (others as they are).
    ``repo_id`` goes into the entry: ``"."`` (this folder, for ``register_releases``) until the
    folder is uploaded to a hub repo. ``release_name`` defaults to the name of ``out_dir``.
    """
    source, out_dir = Path(source), Path(out_dir)
    release_name = release_name or out_dir.resolve().name
    items = _sources(source)
    ids = _sae_ids(items)
    saes = []
    for name, folder, _ in items:
        sae = SAE.load_from_disk(folder)
        if doubled and isinstance(sae, SAGSAE):
            sae = to_doubled_jumprelu(sae)
        log.info("exporting %s as %s", name, sae.cfg.architecture())
        saes.append(sae)
    freqs, n_tokens = (
        log_sparsity(saes, activations, batch_size) if activations is not None else ([], 0)
    )
    for i, sae in enumerate(saes):
        state = sae.state_dict()
        sae.process_state_dict_for_saving(state)
        files: dict[str, Any] = {SAE_WEIGHTS_FILENAME: state, SAE_CFG_FILENAME: sae.cfg.to_dict()}
        if freqs:
            files[SPARSITY_FILENAME] = {"sparsity": freqs[i]}
        write_folder(out_dir / ids[i], files)
    if freqs:
        note = f"log10 firing frequencies (f != 0) from {n_tokens:,} tokens"
    else:
        note = "no sparsity.safetensors: no activations were given to compute firing frequencies"
        log.warning("%s: %s", release_name, note)
    entry = _entry(saes, ids, [row for _, _, row in items], repo_id)
    path = out_dir / RELEASE_FILE
    header = f"# SAELens release entry for {release_name}, written by sign-sae export.\n"
    if repo_id == ".":
        header += (
            "# repo_id '.' is this folder: load it with sign_sae.releases.register_releases(\n"
            "# <this file>). After uploading the folder, set repo_id to the hub repo id.\n"
        )
    header += f"# Sparsity: {note}.\n"
    atomic_write_text(path, header + yaml.safe_dump({release_name: entry}, sort_keys=False))
    atomic_write_text(out_dir / README_FILE, _readme(release_name, saes, ids, entry, note))
    return path


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    release_name: str | None = None,
    *,
    doubled: bool = False,
) -> Path:
    """``sign-sae export RUN_DIR OUT_DIR``: every trained SAE of a run as release
    ``release_name`` in ``out_dir`` (see ``export``); returns the path of ``release.yaml``.

    Firing frequencies come from the run's cached activations (``RUN_DIR/activations/<hook>``,
    the training split) when they are there; otherwise ``sparsity.safetensors`` is omitted.
    """
    run_dir = Path(run_dir)
    hooks = {_hook(folder) for _, folder, _ in _sources(run_dir)}
    folder = run_dir / "activations" / hooks.pop() if len(hooks) == 1 else None
    activations = None
    if folder is not None and folder.is_dir():
        try:
            activations = ActivationCache.open(folder)
        except InvalidCacheError as e:
            log.warning("not using the run's activations for sparsity: %s", e)
    return export(run_dir, out_dir, release_name, activations, doubled=doubled)


@torch.no_grad()
def log_sparsity(
    saes: list[SAE], activations: Activations, batch_size: int = 4096
) -> tuple[list[torch.Tensor], int]:
    """log10(firing frequency + 1e-10) per latent of each SAE (firing: ``f != 0``) over the
    same activations, read once; returns (one tensor per SAE, number of tokens)."""
    stats = [LatentStats(sae.cfg.d_sae) for sae in saes]
    for batch in _batches(activations, batch_size):
        for sae, s in zip(saes, stats, strict=True):
            if batch.shape[-1] != sae.cfg.d_in:
                raise ValueError(
                    f"Activations have width {batch.shape[-1]} but the SAE reads "
                    f"{sae.cfg.metadata.hook_name} with d_in={sae.cfg.d_in}."
                )
            s.update(sae.encode(batch.to(sae.device)))
    n_tokens = stats[0].n_tokens if stats else 0
    if n_tokens == 0:
        raise ValueError("No activations to compute firing frequencies from.")
    out = [torch.log10((s.n_pos + s.n_neg) / n_tokens + SPARSITY_EPS).float() for s in stats]
    return out, n_tokens


def _batches(activations: Activations, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(activations, str | Path):
        activations = ActivationCache.open(activations)
    if isinstance(activations, ActivationCache):
        return activations.iter_batches(batch_size, seed=0, drop_last=False)
    return activations.reshape(-1, activations.shape[-1]).float().split(batch_size)


def _sources(source: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, SAE folder, results row or {}) for one SAE folder or every trained SAE of a run."""
    if (source / SAE_CFG_FILENAME).is_file():
        return [(source.resolve().name, source, {})]
    config = source / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{source} is neither an SAE folder ({SAE_CFG_FILENAME}) nor a run folder "
            "(config.json from sign-sae train)."
        )
    names = [s["name"] for s in json.loads(config.read_text()).get("saes", [])]
    results = source / "results.json"
    rows = {r["name"]: r for r in json.loads(results.read_text())} if results.is_file() else {}
    items = [(n, source / n / "sae", rows.get(n, {})) for n in names]
    missing = [n for n, folder, _ in items if not (folder / SAE_CFG_FILENAME).is_file()]
    if missing:
        log.warning("skipping untrained SAE(s) %s of %s", missing, source)
    items = [item for item in items if item[0] not in missing]
    if not items:
        raise FileNotFoundError(
            f"Run {source} has no trained SAE (no <name>/sae/{SAE_CFG_FILENAME})."
        )
    return items


def _hook(folder: Path) -> str:
    return (read_cfg(folder).get("metadata") or {}).get("hook_name") or "sae"


def _sae_ids(items: list[tuple[str, Path, dict[str, Any]]]) -> list[str]:
    """The hook when only one exported SAE reads it, else ``<hook>/<name>``."""
    hooks = [_hook(folder) for _, folder, _ in items]
    return [
        h if hooks.count(h) == 1 else f"{h}/{n}" for (n, _, _), h in zip(items, hooks, strict=True)
    ]


def _entry(
    saes: list[SAE], ids: list[str], rows: list[dict[str, Any]], repo_id: str
) -> dict[str, Any]:
    """The release entry in SAELens's pretrained_saes.yaml schema."""
    entries = []
    for sae_id, sae, row in zip(ids, saes, rows, strict=True):
        item: dict[str, Any] = {"id": sae_id, "path": sae_id}
        if "l0" in row and not sae.cfg.metadata.doubled_from:  # a doubled L0 may differ
            item["l0"] = round(float(row["l0"]), 4)
        if "r2" in row:  # the doubled SAE reconstructs identically
            item["variance_explained"] = round(float(row["r2"]), 4)
        entries.append(item)
    models = {sae.cfg.metadata.model_name for sae in saes}
    entry: dict[str, Any] = {
        "repo_id": repo_id,
        "model": models.pop() if len(models) == 1 else "unknown",
    }
    # SAELens's own loader reads native architectures from the hub; sa_gsae needs sign_sae's.
    if any(sae.cfg.architecture() == ARCHITECTURE for sae in saes):
        entry["conversion_func"] = LOADER
    return {**entry, "saes": entries}


def _readme(release: str, saes: list[SAE], ids: list[str], entry: dict[str, Any], note: str) -> str:
    lines = [
        f"# {release}",
        "",
        f"SAEs for `{entry['model']}` in SAELens's layout (`<sae_id>/cfg.json`, "
        "`<sae_id>/sae_weights.safetensors`). Architecture `sa_gsae` is the sign-aware gated "
        "SAE of the `sign-sae` package: its latents are signed, so count L0 and density with "
        "`!= 0`.",
        "",
        "| sae_id | architecture | hook | d_in | d_sae |",
        "|---|---|---|---|---|",
    ]
    for sae_id, sae in zip(ids, saes, strict=True):
        cfg = sae.cfg
        lines.append(
            f"| {sae_id} | {cfg.architecture()} | {cfg.metadata.hook_name} | {cfg.d_in} | "
            f"{cfg.d_sae} |"
        )
    if any(sae.cfg.metadata.doubled_from for sae in saes):
        lines += [
            "",
            "`jumprelu` SAEs with `metadata.doubled_from: sa_gsae` are exact doubled exports of "
            "SA-GSAEs: latent `i` is the positive part of signed latent `i`, latent `d_sae/2 + i` "
            "its negated negative part (decoder rows `[D, -D]`).",
        ]
    lines += [
        "",
        f"Sparsity: {note}.",
        "",
        "```python",
        "import sign_sae  # registers the architecture and the loader",
        "from sae_lens import SAE",
        "",
        f"sign_sae.releases.register_releases('{RELEASE_FILE}')  # or the hub entry",
        f"sae = SAE.from_pretrained('{release}', '{ids[0]}')",
        "```",
        "",
    ]
    return "\n".join(lines)
