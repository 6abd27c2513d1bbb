"""Gather what a report shows from a run folder or a release: results, parameter tensors, a
polarity census per SAE on held-out text, and per selected latent its top examples, logit lens
and steering dial.

Each hook is read once (one forward pass over the eval tokens to the hook's layer); every SAE on
that hook is encoded from the same activations.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from analyses import concentration, logit_lens, polarity, steering
from analyses.frontier import pareto
from analyses.pairs import matching_pair
from analyses.report.layout import (
    BALANCE_THRESHOLDS,
    Card,
    Controls,
    Example,
    Front,
    Match,
    Report,
    SAESection,
)
from analyses.report.options import LatentSelection, ReportOptions
from analyses.stream import hook_activations
from sign_sae.corpus import load_texts, tokenize
from sign_sae.errors import SignSAEError
from sign_sae.evaluate import EvalResult
from sign_sae.models import load_model
from sign_sae.releases import CARD_FILE, find_release, load_pretrained
from sign_sae.runs import RESULTS_JSON, SWEEP_FILE, load_sweep, trained_runs
from sign_sae.storage import load_sae, read_json, read_table

MAX_CARDS = 32  # dashboards per SAE; more selected latents are counted, not drawn
WINDOW = (12, 4)  # tokens shown before and after each top activation
LENS_TOKENS = 8
N_CONTROLS = 2  # norm-matched random directions steered beside each latent
DISTINCT_COSINE = 0.5  # default picks: |cos| of decoder directions at most this, pairwise
NULL_SEED = 0  # the sign-flip null's seed: every control on the page draws the same null

# The columns of a run's results rows that the report's table reads.
_ROW_KEYS = [f.name for f in fields(EvalResult)] + ["train_s", "steps"]


def collect(run_dir: str | Path, options: ReportOptions | None = None) -> Report:
    """The ``Report`` of a run folder (``options.saes``: names of its SAEs, default all)."""
    options = options or ReportOptions()
    run = Path(run_dir)
    if not (run / SWEEP_FILE).is_file():
        raise FileNotFoundError(
            f"{run} is not a run folder: no {SWEEP_FILE} (see `sign-sae train`)."
        )
    data = load_sweep(run).data
    found = _trained(run, options.saes)
    loaded = {name: load_sae(run / record["folder"] / "sae") for name, record in found.items()}
    source = ReportSource(
        title=f"sign-sae report: {run.resolve().name}",
        model_name=next(iter(found.values()))["model"],
        text=data.text,
        split=data.eval_split,
        context_size=data.context_size,
        rows=_result_rows(run, found),
    )
    return _collect(source, loaded, options)


def collect_release(
    release: str,
    options: ReportOptions | None = None,
    text: str = "shakespeare",
    split: str = "validation",
    context_size: int = 128,
) -> Report:
    """The ``Report`` of SAEs of a registered release (``options.saes``: its SAE ids, default
    all), analysed on ``split`` of ``text``; the metrics table shows the held-out metrics of
    each SAE's card (``card.json`` beside a local release's weights) where it has one."""
    options = options or ReportOptions()
    ids = list(options.saes) if options.saes else list(find_release(release).saes_map)
    loaded = {sae_id: load_pretrained(release, sae_id) for sae_id in ids}
    names = {sae.cfg.metadata.model_name for sae in loaded.values()}
    if len(names) != 1 or None in names:
        raise SignSAEError(f"A report reads one model; the SAEs {ids} name models {names}.")
    source = ReportSource(
        title=f"sign-sae report: {release}",
        model_name=names.pop(),
        text=text,
        split=split,
        context_size=context_size,
        rows=[row for sae_id in ids if (row := _card_row(release, sae_id)) is not None],
    )
    return _collect(source, loaded, options)


@dataclass
class ReportSource:
    """Where a report's SAEs come from: its title, their model, the held-out text and the rows
    of its metrics table."""

    title: str
    model_name: str
    text: str
    split: str
    context_size: int
    rows: list[dict[str, Any]]


def fronts(rows: Sequence[dict[str, Any]]) -> list[Front]:
    """The rows with a finite R^2 and L0, per architecture, each with its Pareto front."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _is_num(r.get("r2")) and _is_num(r.get("l0")):
            groups.setdefault(str(r.get("architecture", r.get("arch", "all"))), []).append(r)
    return [
        Front(arch, rs, pareto(rs, key=lambda r: (r["l0"], r["r2"]))) for arch, rs in groups.items()
    ]


def controls(census: polarity.PolarityCensus, mirrored: polarity.PolarityCensus | None) -> Controls:
    """One SAE's polarity and concentration statistics beside the controls they must beat: the
    census on sign-mirrored inputs (``mirrored``) and the sign-flip null."""
    null = census.sign_flip_null(NULL_SEED)
    return Controls(
        bipolar=census.bipolar_fraction(),
        mass_bipolarity=census.mass_weighted_bipolarity(),
        balance_curve=census.balance_curve(BALANCE_THRESHOLDS),
        null_balance=census.expected_null_balance(),
        null_bipolar=null.bipolar_fraction(),
        top=concentration.top_latents(census, [10]),
        null_top=concentration.top_latents(null, [10]),
        mirrored_bipolar=mirrored.bipolar_fraction() if mirrored else None,
        mirrored_mass_bipolarity=mirrored.mass_weighted_bipolarity() if mirrored else None,
        mirrored_curve=mirrored.balance_curve(BALANCE_THRESHOLDS) if mirrored else None,
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _card_row(release: str, sae_id: str) -> dict[str, Any] | None:
    """The held-out metrics of a local release SAE's ``card.json``, as a table row."""
    lookup = find_release(release)
    card = Path(lookup.repo_id) / lookup.saes_map[sae_id] / CARD_FILE
    if not card.is_file():
        return None
    held = read_json(card).get("held_out") or {}
    return {"name": sae_id, **{k: held[k] for k in _ROW_KEYS if k in held}}


def _collect(source: ReportSource, loaded: dict[str, Any], options: ReportOptions) -> Report:
    """The report of the ``loaded`` SAEs (by name) on ``source``'s held-out text."""
    batch_size = options.batch_size
    hooks = {name: sae.cfg.metadata.hook_name for name, sae in loaded.items()}
    unhooked = [name for name, hook in hooks.items() if not hook]
    if unhooked:
        raise SignSAEError(f"SAEs {unhooked} name no hook in their cfg.json metadata.hook_name.")
    model = options.model if options.model is not None else load_model(source.model_name)
    text = load_texts(source.text, source.split)
    tokens = tokenize(model, text, source.context_size, options.n_tokens)
    n_batches = math.ceil(tokens.shape[0] / batch_size)
    acts = {
        hook: torch.cat(
            list(
                tqdm(
                    hook_activations(model, tokens, hook, batch_size),
                    total=n_batches,
                    desc=f"report: {hook}",
                    unit="batch",
                )
            )
        )
        for hook in dict.fromkeys(hooks.values())
    }
    censuses = {
        name: polarity.census_from_activations(
            sae,
            acts[hooks[name]].split(batch_size),
            exclude_bos=True,
            top_examples=options.n_examples,
            hook_name=hooks[name],
        )
        for name, sae in loaded.items()
    }
    mirrored = {
        name: polarity.census_from_activations(
            sae, polarity.sign_surrogate(acts[hooks[name]][:, 1:].flatten(0, 1)).split(4096)
        )
        for name, sae in loaded.items()
    }
    signed = {name: int(c.n_neg.sum()) > 0 for name, c in censuses.items()}
    chosen = _selection(loaded, censuses, hooks, signed, options.latents, options.n_latents)
    prompts = tokens[: options.n_prompts, : options.prompt_len]
    reads = _Reads(model, tokens, acts, prompts, options.alphas, loaded, hooks, signed)
    sections = [
        _section(reads, name, censuses[name], mirrored[name], chosen[name]) for name in loaded
    ]
    facts = [
        ("model", source.model_name),
        ("hooks", ", ".join(dict.fromkeys(hooks.values()))),
        ("held-out text", f"{source.text} ({source.split} split)"),
        ("tokens analysed", f"{sections[0].census.n_tokens:,} (BOS excluded)"),
    ]
    if options.alphas:
        facts.append(("steering prompts", f"{prompts.shape[0]} × {prompts.shape[1]} tokens"))
    if not source.rows:
        facts.append(("metrics", "none recorded for these SAEs (`sign-sae eval` writes a run's)"))
    return Report(
        title=source.title, facts=facts, rows=source.rows, saes=sections, fronts=fronts(source.rows)
    )


@dataclass
class _Reads:
    """What every section of one report reads: the model, the held-out tokens and their
    activations per hook, the steering prompts and alphas, and the SAEs by name with their
    hooks and whether they are signed; ``words`` caches token strings."""

    model: Any
    tokens: torch.Tensor
    acts: dict[str, torch.Tensor]
    prompts: torch.Tensor
    alphas: Sequence[float]
    loaded: dict[str, Any]
    hooks: dict[str, str]
    signed: dict[str, bool]
    words: dict[int, str] = field(default_factory=dict)


def _section(
    reads: _Reads,
    name: str,
    census: polarity.PolarityCensus,
    mirrored: polarity.PolarityCensus,
    ids: list[int],
) -> SAESection:
    """One SAE's section: its census beside its controls and a card per chosen latent, with
    the latent's matches in the other SAEs on the same hook."""
    sae, hook, loaded = reads.loaded[name], reads.hooks[name], reads.loaded
    others = [o for o in loaded if o != name and reads.hooks[o] == hook]
    signed = reads.signed
    cards = []
    for i in tqdm(ids[:MAX_CARDS], desc=f"report: {name} dashboards", unit="latent"):
        card = _card(reads, name, census, i)
        card.matches = [
            m for o in others for m in _matches(sae, i, signed[name], o, loaded[o], signed[o])
        ]
        cards.append(card)
    return SAESection(
        name=name,
        architecture=sae.cfg.architecture(),
        hook=hook,
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        params=[(n, tuple(p.shape)) for n, p in sae.named_parameters()],
        census=census,
        controls=controls(census, mirrored),
        cards=cards,
        n_cut=max(len(ids) - MAX_CARDS, 0),
    )


def _result_rows(run: Path, found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The results-table rows of the report's SAEs (none without results.json)."""
    results = run / RESULTS_JSON
    by_hash = {r["config_hash"]: r for r in read_table(results)} if results.is_file() else {}
    return [
        {"name": name, **{k: row[k] for k in _ROW_KEYS if k in row}}
        for name, record in found.items()
        if (row := by_hash.get(record["config_hash"])) is not None
    ]


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Result rows of a results table (``sign_sae.storage.read_table``: JSON or CSV, numbers
    parsed, empty cells None); a JSON object holding ``rows`` is accepted too."""
    path = Path(path)
    rows: Any = read_json(path) if path.suffix.lower() == ".json" else read_table(path)
    if isinstance(rows, dict):
        rows = rows.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SignSAEError(f"{path} must hold a list of result rows (objects with r2, l0, ...).")
    return rows


def _trained(run: Path, wanted: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """The run records of the SAEs to report, by name (``sign_sae.runs.trained_runs``): all
    trained ones or ``wanted``, all of one model."""
    trained = trained_runs(run)
    if wanted is not None:
        missing = [n for n in wanted if n not in trained]
        if missing:
            raise SignSAEError(
                f"No trained SAE named {missing} in {run}; trained: {list(trained)}."
            )
        trained = {n: trained[n] for n in wanted}
    if not trained:
        raise FileNotFoundError(f"{run} holds no trained SAE (runs/.../train.json); train first.")
    models = sorted({r["model"] for r in trained.values()})
    if len(models) > 1:
        raise SignSAEError(
            f"A report reads one model; {run} has SAEs of {models}: choose them with saes=[...]."
        )
    return trained


def _selection(
    loaded: dict[str, Any],
    censuses: dict[str, polarity.PolarityCensus],
    hooks: dict[str, str],
    signed: dict[str, bool],
    latents: LatentSelection | None,
    n_latents: int,
) -> dict[str, list[int]]:
    """Latent ids per SAE: as given, else the top ``n_latents`` by minority-sign mass (then
    total mass). A non-negative SAE beside a signed one on the same hook shows, by default, the
    latents matching the signed SAE's +d and -d directions, so the two can be read side by side."""
    given: dict[str, Sequence[int]] = {}
    if isinstance(latents, Mapping):
        unknown = sorted(set(latents) - set(loaded))
        if unknown:
            raise SignSAEError(
                f"latents names unknown SAEs {unknown}; the report has {list(loaded)}."
            )
        given = dict(latents)
    elif latents is not None:
        given = dict.fromkeys(loaded, latents)
    chosen: dict[str, list[int]] = {}
    for name, ids in given.items():
        d_sae = loaded[name].cfg.d_sae
        bad = [i for i in ids if not 0 <= int(i) < d_sae]
        if bad:
            raise SignSAEError(f"Latents {bad} are out of range for {name!r} (d_sae = {d_sae}).")
        chosen[name] = [int(i) for i in dict.fromkeys(ids)]
    for name in loaded:
        if name not in chosen and signed[name]:
            chosen[name] = _top(censuses[name], n_latents, loaded[name].W_dec)
    for name in loaded:
        if name in chosen:
            continue
        partner = next((s for s in loaded if signed[s] and hooks[s] == hooks[name]), None)
        if partner is None:
            chosen[name] = _top(censuses[name], n_latents, loaded[name].W_dec)
            continue
        pairs = [matching_pair(loaded[partner], i, loaded[name]) for i in chosen[partner]]
        chosen[name] = list(dict.fromkeys(j for ab in pairs for j in ab))[:n_latents]
    return chosen


def _top(census: polarity.PolarityCensus, n: int, W_dec: torch.Tensor) -> list[int]:
    """Alive latents by minority-sign mass, ties broken by total mass, then id, skipping any
    whose decoder direction is within ``DISTINCT_COSINE`` (|cos|: d and -d are one axis) of one
    already picked, so that the dashboards show n different axes rather than one n times."""
    total = census.mass_pos + census.mass_neg
    order = total.argsort(descending=True, stable=True)
    order = order[census.minority_mass[order].argsort(descending=True, stable=True)]
    directions = torch.nn.functional.normalize(W_dec.detach().float(), dim=-1)
    picked: list[int] = []
    for i in (int(i) for i in order if census.alive[i]):
        if len(picked) == n:
            break
        if not picked or (directions[picked] @ directions[i]).abs().max() <= DISTINCT_COSINE:
            picked.append(i)
    return picked


def _card(reads: _Reads, name: str, census: polarity.PolarityCensus, latent: int) -> Card:
    """One latent's dashboard: examples of both signs, logit lens, and (with alphas) a
    steering dial in typical firings of the latent, scored on targets fixed from the rows that
    are not steering prompts, beside norm-matched random directions on the same targets."""
    model, sae, prompts, alphas = reads.model, reads.loaded[name], reads.prompts, reads.alphas
    notes = []
    lens = None
    try:
        lens = logit_lens.logit_lens(model, sae.W_dec[latent], k=LENS_TOKENS)
    except ValueError as e:
        notes.append(f"Logit lens skipped: {e}")
    dial, random = None, []
    if alphas and int(census.n_fired[latent]) > 0:
        scale = steering.typical_scale(census, sae, latent)
        try:
            targets = steering.context_targets(
                census, reads.tokens, latent, LENS_TOKENS, exclude_rows=prompts.shape[0]
            )
        except ValueError:
            targets = None
            notes.append(
                "Steering targets are the logit-lens tokens of the latent's own direction (it has "
                "no next-token examples of both signs outside the prompts): any direction scores "
                "well on its own lens tokens, so this dial has no control."
            )
        spec = steering.DialSpec(
            alphas, prompts, scale=scale, targets=targets, k_tokens=LENS_TOKENS
        )
        dial = steering.dial(model, sae, latent, spec)
        if targets is not None:
            random = steering.random_dials(model, sae, spec, n=N_CONTROLS, seed=latent)
    elif alphas:
        notes.append("No steering dial: the latent never fired on these tokens.")
    return Card(
        latent=latent,
        pos=_examples(reads, name, census.examples(latent, "+"), latent),
        neg=_examples(reads, name, census.examples(latent, "-"), latent),
        lens=lens,
        dial=dial,
        controls=random,
        notes=notes,
    )


def _examples(
    reads: _Reads, name: str, tops: list[tuple[int, int, float]], latent: int
) -> list[Example]:
    """A window of tokens around each top activation, with the latent's value on each token."""
    sae, acts, tokens, words = (
        reads.loaded[name],
        reads.acts[reads.hooks[name]],
        reads.tokens,
        reads.words,
    )
    before, after = WINDOW
    out = []
    for seq, pos, value in tops:
        start, end = max(1, pos - before), min(tokens.shape[1], pos + after + 1)
        with torch.inference_mode():
            f = sae.encode(acts[seq, start:end].to(sae.device))
        ids = tokens[seq, start:end].tolist()
        for t in ids:
            if t not in words:
                words[t] = logit_lens.token_strings(reads.model, [t])[0]
        out.append(
            Example(
                seq=seq,
                pos=pos,
                value=value,
                tokens=[words[t] for t in ids],
                values=[float(v) for v in f[:, latent].float().cpu()],
            )
        )
    return out


def _matches(
    sae: Any, latent: int, signed: bool, other_name: str, other: Any, other_signed: bool
) -> list[Match]:
    """The other SAE's latents whose decoder directions best match +d (and -d, for a signed
    latent). A signed other latent matches with either of its sides."""
    if other.W_dec.shape[1] != sae.W_dec.shape[1]:
        return []
    u = steering.unit_direction(sae, latent).float()
    W = other.W_dec.detach().float()
    cos = (W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)) @ u
    out = []
    for side in ("+", "-") if signed else ("+",):
        c = cos if side == "+" else -cos
        j = int((c.abs() if other_signed else c).argmax())
        value = float(c[j])
        other_side = ("+" if value > 0 else "-") if other_signed else None
        out.append(Match(side, other_name, j, abs(value) if other_signed else value, other_side))
    return [m for m in out if math.isfinite(m.cos)]
