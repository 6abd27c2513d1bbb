"""Export trained SAEs as a SAELens release folder, and SA-GSAEs as doubled non-negative SAEs.

``export`` writes, for a run folder (every trained run of ``sign_sae.runs``) or one SAE folder::

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
``d_sae + i`` the negated negative part, with decoder rows ``[D, -D]``. ``to_signed_init`` goes
the other way: it merges pairs of latents of a non-negative SAE into signed SA-GSAE latents, and
brings a doubled tied SA-GSAE back exactly.
"""

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sign_sae import ARCHITECTURE, SAGSAE, SAGSAETrainingSAE, SAGSAETrainingSAEConfig
from sign_sae.corpus import HELD_OUT
from sign_sae.errors import SignSAEError
from sign_sae.harvest import DTYPES, ActivationCache, InvalidCacheError
from sign_sae.markdown import markdown_table
from sign_sae.metrics import LatentStats
from sign_sae.releases import LOADER
from sign_sae.runs import (
    RESULTS_JSON,
    SWEEP_FILE,
    TRAIN_FILE,
    activations_dir,
    read_results,
    trained_runs,
)
from sign_sae.storage import (
    atomic_write_text,
    check_inside,
    load_sae,
    read_cfg,
    write_folder,
)

log = logging.getLogger(__name__)

RELEASE_FILE = "release.yaml"
README_FILE = "README.md"
SPARSITY_EPS = 1e-10  # as SAELens's trainer: a dead latent gets log10 sparsity -10
Activations = torch.Tensor | ActivationCache | str | Path
# theta- of latents kept one-sided by to_signed_init: the negative gate never opens.
CLOSED_THRESHOLD = 1e9
# Encoders to_signed_init can read, as "gate p + b_gate > theta, magnitude exp(r) p + b_mag".
_NON_NEGATIVE = ("standard", "jumprelu", "topk", "gated")


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
        raise SignSAEError(
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
        raise SignSAEError(f"A doubled SAE has an even number of latents, got {width}.")
    return feature_acts[..., : width // 2] - feature_acts[..., width // 2 :]


# ---- the reverse: pairs of non-negative latents into signed latents ---------------------------
def to_signed_init(
    sae: Any,
    pairs: Iterable[tuple[int, int]],
    tied: bool = False,
    threshold_init: float = 1e-3,
) -> SAGSAETrainingSAE:
    """An SA-GSAE initialisation that merges each pair (i, j) of a non-negative SAE into one
    signed latent and keeps every other latent, so that training from it measures what the merge
    gains; the inverse of ``to_doubled_jumprelu`` for a tied SA-GSAE, paired ``(i, d_sae + i)``.
    ``pairs``: e.g. ``analyses.pairs.antipodal_pairs(sae, ...).as_tuples()``.

    Latent order: the merged pairs first (in the given order; +side = i, -side = j), then the
    unpaired latents in ascending original order. Every source latent l is read as
    "gate p + b_gate > theta, magnitude exp(r) p + b_mag" with p = (x - b_dec) W_enc[:, l]
    (standard / TopK: b_gate = b_mag = b_enc, theta = 0, r = 0; JumpReLU: theta = threshold;
    Gated: its own b_gate, r_mag, b_mag, theta = 0) and its decoder norm c_l folded in (W_enc,
    b_gate, theta, b_mag times c_l; decoder row unit-norm). Then, with m = (b_gate_i + b_gate_j)/2:

    - merged: W_dec = (d_i - d_j) / ||d_i - d_j|| (unit rows), W_enc = (w_i - w_j) / 2,
      b_gate = (b_gate_i - b_gate_j) / 2, theta+ = max(0, theta_i - m),
      theta- = max(0, theta_j - m); untied: r+ = r_i, b_mag+ = b_mag_i, r- = r_j,
      b_mag- = -b_mag_j; tied: r = (r_i + r_j) / 2, b_mag = (b_mag_i - b_mag_j) / 2.
    - unpaired: the source latent as is, with theta- = CLOSED_THRESHOLD (it stays one-sided;
      a dead-latent reset during training reopens it).
    - b_dec, apply_b_dec_to_input, normalize_activations and the hook name are copied.

    Untied, the merged latent reproduces both source latents exactly when w_j = -w_i,
    d_j ~ -d_i and theta_i + theta_j >= b_gate_i + b_gate_j (the two gates never overlap);
    otherwise it is their symmetric average. TopK's global top-k selection is not carried over.
    The result takes raw activations: a trainer that rescales inputs must rescale it too.
    """
    arch = sae.cfg.architecture()
    if arch not in _NON_NEGATIVE:
        raise SignSAEError(f"to_signed_init reads {_NON_NEGATIVE} SAEs, got architecture {arch!r}.")
    pair_list = [(int(i), int(j)) for i, j in pairs]
    flat = [x for p in pair_list for x in p]
    if len(set(flat)) != len(flat) or any(not 0 <= x < sae.cfg.d_sae for x in flat):
        raise SignSAEError("Pairs must use distinct latent indices within [0, d_sae).")
    new = _merged_weights(_gate_form(sae), pair_list, tied)
    meta = sae.cfg.metadata
    cfg = SAGSAETrainingSAEConfig(
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae - len(pair_list),
        dtype=sae.cfg.dtype,
        device=sae.cfg.device,
        apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
        normalize_activations=sae.cfg.normalize_activations,
        tied=tied,
        threshold_init=threshold_init,
        metadata=SAEMetadata(hook_name=meta.hook_name, model_name=meta.model_name),
    )
    signed = SAGSAETrainingSAE(cfg)
    signed.load_state_dict(new)
    return signed


def _merged_weights(
    src: dict[str, torch.Tensor], pair_list: list[tuple[int, int]], tied: bool
) -> dict[str, torch.Tensor]:
    """``to_signed_init``'s weights from the source's gate form: merged pairs, then the rest."""
    P = torch.tensor([p[0] for p in pair_list], dtype=torch.long)
    N = torch.tensor([p[1] for p in pair_list], dtype=torch.long)
    paired = torch.zeros(src["b_gate"].shape[0], dtype=torch.bool)
    paired[[x for p in pair_list for x in p]] = True
    U = (~paired).nonzero().squeeze(1)

    mid = (src["b_gate"][P] + src["b_gate"][N]) / 2
    d_merged = src["W_dec"][P] - src["W_dec"][N]
    new = {
        "W_enc": torch.cat([(src["W_enc"][:, P] - src["W_enc"][:, N]) / 2, src["W_enc"][:, U]], 1),
        "W_dec": torch.cat([d_merged / d_merged.norm(dim=1, keepdim=True), src["W_dec"][U]]),
        "b_gate": torch.cat([(src["b_gate"][P] - src["b_gate"][N]) / 2, src["b_gate"][U]]),
        "threshold_pos": torch.cat([(src["theta"][P] - mid).clamp(min=0), src["theta"][U]]),
        "threshold_neg": torch.cat(
            [
                (src["theta"][N] - mid).clamp(min=0),
                torch.full_like(src["theta"][U], CLOSED_THRESHOLD),
            ]
        ),
        "b_dec": src["b_dec"],
    }
    if tied:
        new["r_mag"] = torch.cat([(src["r"][P] + src["r"][N]) / 2, src["r"][U]])
        new["b_mag"] = torch.cat([(src["b_mag"][P] - src["b_mag"][N]) / 2, src["b_mag"][U]])
    else:
        new["r_mag"] = torch.cat([src["r"][P], src["r"][U]])
        new["b_mag"] = torch.cat([src["b_mag"][P], src["b_mag"][U]])
        new["r_mag_neg"] = torch.cat([src["r"][N], src["r"][U]])
        new["b_mag_neg"] = torch.cat([-src["b_mag"][N], src["b_mag"][U]])

    return new


def _gate_form(sae: Any) -> dict[str, torch.Tensor]:
    """The source SAE's per-latent (W_enc, b_gate, theta, r, b_mag) with decoder norms folded."""
    W_dec = sae.W_dec.detach()
    c = W_dec.norm(dim=1).clamp(min=1e-12)
    zeros = torch.zeros_like(c)
    if sae.cfg.architecture() == "gated":
        b_gate, r, b_mag, theta = sae.b_gate.detach(), sae.r_mag.detach(), sae.b_mag.detach(), zeros
    else:
        b_gate = b_mag = sae.b_enc.detach()
        r = zeros
        threshold = getattr(sae, "threshold", None)
        theta = threshold.detach() if isinstance(threshold, torch.Tensor) else zeros
    return {
        "W_enc": sae.W_enc.detach() * c,
        "W_dec": W_dec / c[:, None],
        "b_gate": b_gate * c,
        "theta": theta * c,
        "r": r,
        "b_mag": b_mag * c,
        "b_dec": sae.b_dec.detach(),
    }


# ---- release export ---------------------------------------------------------------------------
def export(
    source: str | Path,
    out_dir: str | Path,
    release_name: str | None = None,
    activations: Activations | Mapping[str, Activations] | None = None,
    *,
    doubled: bool = False,
    repo_id: str = ".",
    batch_size: int = 4096,
    ids: Mapping[str, str] | None = None,
    weights_dtype: str | None = None,
) -> Path:
    """Write the SAE(s) of ``source`` (a run folder or one SAE folder) as a SAELens release in
    ``out_dir``; returns the path of its ``release.yaml`` entry.

    ``activations`` (a ``[..., d_in]`` tensor, an ``ActivationCache`` or its folder; for SAEs
    at several hooks, a mapping from hook name to those) give ``sparsity.safetensors``; without
    them it is omitted and README/YAML say so. ``doubled`` writes each SA-GSAE as its
    ``to_doubled_jumprelu`` (others as they are). ``repo_id`` goes into the entry: ``"."``
    (this folder, for ``register_releases``) until the folder is uploaded to a hub repo.
    ``release_name`` defaults to the name of ``out_dir``. ``ids`` maps run names to SAE ids
    (default: the hook when one SAE reads it, else ``<hook>/<name>``). ``weights_dtype``
    (e.g. ``"float16"``) stores the weights smaller; the config keeps the SAE's dtype, which
    SAELens loads them as.
    """
    source, out_dir = Path(source), Path(out_dir)
    release_name = release_name or out_dir.resolve().name
    items = _sources(source)
    ids = [ids[name] for name, _, _ in items] if ids is not None else _sae_ids(items)
    saes = []
    for name, folder, _ in items:
        check_inside(
            source, [folder, folder / SAE_CFG_FILENAME, folder / SAE_WEIGHTS_FILENAME], name
        )
        sae = load_sae(folder)
        if doubled and isinstance(sae, SAGSAE):
            sae = to_doubled_jumprelu(sae)
        log.info("exporting %s as %s", name, sae.cfg.architecture())
        saes.append(sae)
    freqs, n_tokens = _sparsity(saes, activations, batch_size)
    store = DTYPES[weights_dtype] if weights_dtype is not None else None
    for i, sae in enumerate(saes):
        state = sae.state_dict()
        sae.process_state_dict_for_saving(state)
        if store is not None:
            state = {k: v.to(store) if v.is_floating_point() else v for k, v in state.items()}
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

    Firing frequencies come from the run's cached held-out activations (its validation harvest,
    else its test harvest; training is streamed, so none is kept of it) when its SAEs read one
    model's one hook and such a harvest is there; otherwise ``sparsity.safetensors`` is omitted.
    """
    run_dir = Path(run_dir)
    reads = {(_model(folder), _hook(folder)) for _, folder, _ in _sources(run_dir)}
    folder = None
    if len(reads) == 1:
        model, hook = reads.pop()
        splits = [activations_dir(run_dir, model, s) / hook for s in HELD_OUT]
        folder = next((f for f in splits if f.is_dir()), None)
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
                raise SignSAEError(
                    f"Activations have width {batch.shape[-1]} but the SAE reads "
                    f"{sae.cfg.metadata.hook_name} with d_in={sae.cfg.d_in}."
                )
            s.update(sae.encode(batch.to(sae.device)))
    n_tokens = stats[0].n_tokens if stats else 0
    if n_tokens == 0:
        raise SignSAEError("No activations to compute firing frequencies from.")
    out = [torch.log10((s.n_pos + s.n_neg) / n_tokens + SPARSITY_EPS).float() for s in stats]
    return out, n_tokens


def _sparsity(
    saes: list[SAE], activations: Activations | Mapping[str, Activations] | None, batch_size: int
) -> tuple[list[torch.Tensor], int]:
    """``log_sparsity`` of each SAE over its hook's activations (([], 0) without any)."""
    if activations is None:
        return [], 0
    if not isinstance(activations, Mapping):
        return log_sparsity(saes, activations, batch_size)
    freqs, counts = [], set()
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        if hook not in activations:
            raise SignSAEError(
                f"No activations given for hook {hook!r}; given: {sorted(activations)}."
            )
        (freq,), n = log_sparsity([sae], activations[hook], batch_size)
        freqs.append(freq)
        counts.add(n)
    return freqs, min(counts)


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
    if not (source / SWEEP_FILE).is_file():
        raise FileNotFoundError(
            f"{source} is neither an SAE folder ({SAE_CFG_FILENAME}) nor a run folder "
            f"({SWEEP_FILE} from sign-sae train)."
        )
    results = source / RESULTS_JSON
    rows = {r["config_hash"]: r for r in read_results(results)} if results.is_file() else {}
    items = [
        (name, source / record["folder"] / "sae", rows.get(record["config_hash"], {}))
        for name, record in trained_runs(source).items()
    ]
    if not items:
        raise FileNotFoundError(f"Run {source} has no trained SAE (no runs/.../{TRAIN_FILE}).")
    return items


def _hook(folder: Path) -> str:
    return (read_cfg(folder).get("metadata") or {}).get("hook_name") or "sae"


def _model(folder: Path) -> str:
    return (read_cfg(folder).get("metadata") or {}).get("model_name") or ""


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
        markdown_table(
            ["sae_id", "architecture", "hook", "d_in", "d_sae"],
            [
                [sae_id, s.cfg.architecture(), s.cfg.metadata.hook_name, s.cfg.d_in, s.cfg.d_sae]
                for sae_id, s in zip(ids, saes, strict=True)
            ],
        ),
    ]
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
        f'sign_sae.releases.register_releases("{RELEASE_FILE}")  # or the hub entry',
        f'sae = SAE.from_pretrained("{release}", "{ids[0]}")',
        "```",
        "",
    ]
    return "\n".join(lines)
