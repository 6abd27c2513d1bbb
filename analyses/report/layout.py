"""Page assembly: a ``Report`` (numbers already computed) becomes one self-contained HTML page.

Nothing here runs a model or computes a statistic: ``gather`` fills in every number (fronts,
concentration, the controls); this module only formats them. Every string that comes from data (SAE names, tokens, column names,
values) is HTML-escaped; token examples go to circuitsvis through ``Components``.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from importlib.resources import files
from string import Template
from typing import Any

import torch

import analyses.report.plots as plots
from analyses.concentration import Concentration
from analyses.logit_lens import LogitLens
from analyses.polarity import PolarityCensus
from analyses.report.circuits import (
    BOOT_JS,
    Components,
    bundle,
    content_security_policy,
    visible_token,
)
from analyses.steering import Dial
from sign_sae.metrics import BIPOLAR_BALANCE
from sign_sae.runs import SUMMARY

BALANCE_THRESHOLDS = [i / 40 for i in range(21)]  # the bipolar curve's x: 0, 0.025, ..., 0.5
MAX_TABLE_ROWS = 2000
# Columns of results.json that the metrics table leaves out (details of the ones it shows).
_DETAIL_COLUMNS = {
    "hook",
    "n_tokens",
    "mse",
    "ce_clean",
    "ce_with_sae",
    "ce_zero_ablation",
    "steps",
}


@dataclass
class Example:
    """A window of tokens around one top activation; ``values`` are the latent's values on
    every token of the window, ``value`` the one at the example's own position."""

    seq: int
    pos: int
    value: float
    tokens: list[str]
    values: list[float]


@dataclass
class Match:
    """The latent of another SAE whose decoder direction best matches +d or -d of a latent;
    ``other_sign`` says which side of a signed other latent matched (None: non-negative)."""

    sign: str  # "+" or "-"
    sae: str
    latent: int
    cos: float
    other_sign: str | None = None


@dataclass
class Card:
    """A latent's dashboard: top examples per sign, logit lens, steering dial, matches."""

    latent: int
    pos: list[Example]
    neg: list[Example]
    lens: LogitLens | None = None
    dial: Dial | None = None
    controls: list[Dial] = field(default_factory=list)  # random directions, same targets
    matches: list[Match] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Controls:
    """One SAE's polarity and concentration statistics beside their controls: the same SAE on
    sign-mirrored inputs (``mirrored_*``; None when not measured) and the sign-flip null."""

    bipolar: float  # share of alive latents with balance >= BIPOLAR_BALANCE
    mass_bipolarity: float  # minority-sign mass / all mass
    balance_curve: list[float]  # bipolar fraction at each of BALANCE_THRESHOLDS
    null_balance: torch.Tensor  # [d_sae] each latent's expected balance under the null
    null_bipolar: float
    top: Concentration  # minority-sign mass in the top latents (top-10 share)
    null_top: Concentration  # the same for the sign-flip null
    mirrored_bipolar: float | None = None
    mirrored_mass_bipolarity: float | None = None
    mirrored_curve: list[float] | None = None


@dataclass
class SAESection:
    """One SAE: its results row, parameter tensors, census, controls and latent dashboards."""

    name: str
    architecture: str
    hook: str
    d_in: int
    d_sae: int
    params: list[tuple[str, tuple[int, ...]]]  # trainable tensors: (name, shape)
    census: PolarityCensus
    controls: Controls
    cards: list[Card]
    n_cut: int = 0  # selected latents left without a dashboard


@dataclass
class Front:
    """The results rows of one architecture on the R^2-vs-L0 figure, and their Pareto front."""

    architecture: str
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]


@dataclass
class Report:
    """Everything one page shows; ``saes`` is empty for a sweep page, ``fronts`` are ``rows``
    by architecture."""

    title: str
    facts: list[tuple[str, str]]
    rows: list[dict[str, Any]]
    saes: list[SAESection] = field(default_factory=list)
    fronts: list[Front] = field(default_factory=list)


def page(report: Report) -> str:
    """The whole HTML document of ``report``."""
    cv = Components()
    body = [_header(report)]
    if report.rows:
        body.append(_metrics(report.rows))
    if report.saes:
        body.append(_parameters(report.saes))
    body.append(_figures(report))
    if report.saes:
        body.append(_controls(report.saes))
    for k, sec in enumerate(report.saes):
        body.append(_dashboards(k, sec, report.saes, cv))
    template = Template((files("analyses.report") / "template.html").read_text(encoding="utf-8"))
    return template.substitute(
        csp=content_security_policy(),
        title=escape(report.title),
        body="\n".join(body),
        props=cv.props_json(),
        bundle=bundle(),
        boot=BOOT_JS,
    )


def fmt(value: Any, spec: str = "{:.4g}") -> str:
    """A table cell: numbers through ``spec`` (integers with thousands separators), '–' for
    missing or non-finite values, anything else as escaped text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return escape(str(value))
    if isinstance(value, int) and spec == "{:.4g}":
        spec = "{:,}"
    try:
        return escape(spec.format(value))
    except (ValueError, TypeError):
        return escape(str(value))


def show_token(token: str) -> str:
    """A token as visible, escaped text with the examples' markers: line breaks ↵, tabs →, a
    token of other whitespace (spaces, no-break spaces) one ␣ per character; ∅ when empty."""
    text = visible_token(token)
    if text.isspace():
        text = "␣" * len(text)
    return f'<code class="tok">{escape(text) if text else "∅"}</code>'


def _header(report: Report) -> str:
    facts = " · ".join(f"{escape(k)} <b>{escape(v)}</b>" for k, v in report.facts)
    nav = "".join(f'<a href="#sae{k}">{escape(s.name)}</a>' for k, s in enumerate(report.saes))
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return (
        f'<header><h1>{escape(report.title)}</h1><p class="facts">{facts}</p>'
        f'<p class="facts">written {stamp} by <code>sign-sae report</code>; works offline.'
        f'<span class="pos"> Red</span> marks the positive side of a latent,'
        f'<span class="neg"> blue</span> the negative side.</p>'
        f"{f'<nav>Dashboards: {nav}</nav>' if nav else ''}</header>"
    )


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The preferred result columns that are present, then any other (sweep) columns."""
    present = {k for r in rows for k in r}
    cols = [(c, f) for c, f in SUMMARY if c in present]
    known = {c for c, _ in SUMMARY} | _DETAIL_COLUMNS
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in known]
    return cols + [(k, "{:.4g}") for k in extra]


def _metrics(all_rows: list[dict[str, Any]]) -> str:
    rows, n_cut = all_rows[:MAX_TABLE_ROWS], max(len(all_rows) - MAX_TABLE_ROWS, 0)
    cols = _columns(rows)
    align = {c: _align(rows, c) for c, _ in cols}
    head = "".join(f"<th{align[c]}>{escape(c)}</th>" for c, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td{align[c]}>{fmt(r.get(c), f)}</td>" for c, f in cols) + "</tr>"
        for r in rows
    )
    cut = (
        f'<p class="cut">{n_cut:,} more rows are not shown (the table stops at '
        f"{len(rows):,}); the plots use every row.</p>"
        if n_cut
        else ""
    )
    return (
        f'<section id="metrics"><h2>Held-out metrics</h2><div class="scroll"><table><tr>{head}</tr>'
        f'{body}</table></div>{cut}<p class="note">r2: explained variance; l0: mean active '
        "latents per token (f != 0, either sign); bipolar_fraction: alive latents with polarity "
        "balance >= 0.1; ce_loss_recovered and kl_with_sae: the SAE spliced into the model.</p>"
        "</section>"
    )


def _align(rows: Sequence[dict[str, Any]], col: str) -> str:
    """A left-align class attribute for text columns."""
    return ' class="l"' if any(isinstance(r.get(col), str) for r in rows) else ""


def _parameters(saes: list[SAESection]) -> str:
    base = sum(math.prod(s) for _, s in saes[0].params)
    rows = []
    for sec in saes:
        total = sum(math.prod(s) for _, s in sec.params)
        tensors = ", ".join(
            f"{escape(n)} [{'×'.join(map(str, s))}] {math.prod(s):,}" for n, s in sec.params
        )
        rows.append(
            f'<tr><td class="l">{escape(sec.name)}</td><td class="l">{escape(sec.architecture)}</td>'
            f"<td>{sec.d_in:,}</td><td>{sec.d_sae:,}</td><td>{total:,}</td>"
            f"<td>{fmt(total / max(sec.d_sae, 1), '{:,.0f}')}</td>"
            f"<td>{fmt(total / base if base else float('nan'), '{:.2f}')}×</td>"
            f'<td class="w">{tensors}</td></tr>'
        )
    return (
        '<section id="parameters"><h2>Parameter accounting</h2><div class="scroll"><table><tr>'
        '<th class="l">SAE</th><th class="l">architecture</th><th>d_in</th><th>d_sae</th>'
        f"<th>parameters</th><th>per latent</th><th>vs {escape(saes[0].name)}</th>"
        f'<th class="l">trainable tensors</th></tr>{"".join(rows)}</table></div>'
        '<p class="note">Trainable parameters only (buffers such as running statistics are not '
        "counted). A signed latent spends one decoder row on both directions.</p></section>"
    )


def _figures(report: Report) -> str:
    figs = [f for f in (_frontier(report.fronts),) if f]
    if report.saes:
        figs += [_balance_hist(s, k) for k, s in enumerate(report.saes)]
        figs += [_bipolar_curve(report.saes), _concentration(report.saes)]
    if not figs:
        return ""
    return (
        f'<section id="figures"><h2>Figures</h2><div class="figs">{"".join(figs)}</div></section>'
    )


def _frontier(fronts: list[Front]) -> str | None:
    """R^2 against L0 per architecture, with each architecture's Pareto front as a line."""
    usable = [r for f in fronts for r in f.rows]
    if len(usable) < 2:
        return None
    series = []
    for k, group in enumerate(fronts):
        arch, rs, front = group.architecture, group.rows, group.front
        col = plots.color(k)
        titles = [f"{r.get('name', '')} ({arch}): L0 {r['l0']:.4g}, R² {r['r2']:.4g}" for r in rs]
        labels = [str(r.get("name", "")) for r in rs] if len(usable) <= 12 else None
        series.append(
            plots.Series(
                arch,
                [r["l0"] for r in rs],
                [r["r2"] for r in rs],
                col,
                "points",
                titles=titles,
                labels=labels,
            )
        )
        if len(front) > 1:
            series.append(plots.Series("", [r["l0"] for r in front], [r["r2"] for r in front], col))
    xlog = all(r["l0"] > 0 for r in usable) and max(r["l0"] for r in usable) > 20 * min(
        r["l0"] for r in usable
    )
    return plots.chart(
        series, "R² vs L0 (held out)", "L0 (active latents per token)", "R²", xlog=xlog
    )


def _balance_hist(sec: SAESection, k: int) -> str:
    """Polarity balance of alive latents, against the sign-flip null's expected balance."""
    alive = sec.census.alive
    title = f"Polarity balance: {sec.name}"
    n = int(alive.sum())
    if n == 0:
        return plots.empty(title, "no latent fired")
    width = 0.025
    edges = [i * width for i in range(20)]
    obs = _histogram(sec.census.balance[alive].tolist(), width, n)
    null = _histogram(sec.controls.null_balance[alive].tolist(), width, n)
    return plots.chart(
        [
            plots.Series(
                f"{sec.name} ({n:,} alive)", edges, obs, plots.color(k), "bars", width=width
            ),
            plots.Series("sign-flip null (expected)", edges, null, "#555", "step", True, width),
        ],
        title,
        "balance = min(n+, n-) / (n+ + n-)",
        "share of alive latents",
        xlim=(0.0, 0.5),
    )


def _histogram(values: list[float], width: float, n: int) -> list[float]:
    counts = [0] * 20
    for v in values:
        counts[min(max(int(v / width), 0), 19)] += 1
    return [c / n for c in counts]


def _bipolar_curve(saes: list[SAESection]) -> str:
    """Observed balance curve per SAE, dashed: the same SAE on sign-mirrored inputs (the
    control: what it gives when every direction of the data is symmetric)."""
    series = []
    for k, sec in enumerate(saes):
        col = plots.color(k)
        x, mirrored = BALANCE_THRESHOLDS, sec.controls.mirrored_curve
        series.append(plots.Series(sec.name, x, sec.controls.balance_curve, col))
        if mirrored is not None:
            series.append(plots.Series(f"{sec.name} mirrored", x, mirrored, col, dashed=True))
    return plots.chart(
        series,
        "Bipolar fraction vs threshold",
        "balance threshold t",
        "alive latents with balance ≥ t",
        xlim=(0.0, 0.5),
        ylim=(0.0, 1.02),
    )


def _concentration(saes: list[SAESection]) -> str:
    """Cumulative share of minority-sign mass held by the top-r latents, per SAE and hook."""
    title = "Minority-sign mass in the top latents"
    series, skipped = [], []
    for k, sec in enumerate(saes):
        curve = sec.controls.top.curve.tolist()
        if not curve or not math.isfinite(curve[0]):
            skipped.append(sec.name)
            continue
        ranks = list(range(1, len(curve) + 1))
        series.append(plots.Series(f"{sec.name} @ {sec.hook}", ranks, curve, plots.color(k)))
        null = sec.controls.null_top.curve.tolist()
        series.append(
            plots.Series(f"{sec.name} sign-flip null", ranks, null, plots.color(k), dashed=True)
        )
    if not series:
        return plots.empty(title, "no SAE has minority-sign mass (all non-negative)")
    fig = plots.chart(
        series,
        title,
        "rank r (latents by minority mass)",
        "share held by top r",
        xlog=True,
        ylim=(0.0, 1.02),
    )
    if skipped:
        note = f"<br>No minority-sign mass (non-negative): {escape(', '.join(skipped))}."
        fig = fig.replace("</figcaption>", f"{note}</figcaption>")
    return fig


def _controls(saes: list[SAESection]) -> str:
    """Each polarity and concentration statistic beside the control it must beat."""
    rows = []
    for sec in saes:
        c = sec.controls
        rows.append(
            f"<tr><td class=l>{escape(sec.name)}</td><td>{fmt(sec.census.l0, '{:.3g}')}</td>"
            f"<td>{fmt(c.bipolar, '{:.3f}')}</td><td>{fmt(c.mirrored_bipolar, '{:.3f}')}</td>"
            f"<td>{fmt(c.null_bipolar, '{:.3f}')}</td><td>{fmt(c.mass_bipolarity, '{:.3f}')}</td>"
            f"<td>{fmt(c.mirrored_mass_bipolarity, '{:.3f}')}</td>"
            f"<td>{fmt(c.top.share[0], '{:.3f}')}</td>"
            f"<td>{fmt(c.null_top.share[0], '{:.3f}')}</td></tr>"
        )
    head = (
        "<tr><th class=l>SAE</th><th>L0</th><th>bipolar</th><th>mirrored</th>"
        "<th>sign-flip null</th><th>mass bipolarity</th><th>mirrored</th>"
        "<th>top-10 share</th><th>sign-flip null</th></tr>"
    )
    return (
        '<section id="controls"><h2>Polarity and concentration against their controls</h2>'
        f"<table>{head}{''.join(rows)}</table><p class=note>bipolar: share of alive latents "
        f"with balance ≥ {BIPOLAR_BALANCE}; mass bipolarity: minority-sign mass / all mass. "
        "Mirrored: the same SAE on the held-out activations reflected through their mean on a "
        "random half of the tokens (every direction symmetric): bipolarity that reflects "
        "one-signed structure in the data sits below it. Sign-flip null: each firing's sign a "
        "fair coin; it is near 1 for any latent that fires often, so it cannot fail as a "
        "bipolarity control, and it is shown for concentration: minority mass spread as the "
        "latents' total mass is. Top-10 share: minority-sign mass held by the 10 latents with "
        "the most of it.</p></section>"
    )


def _dashboards(k: int, sec: SAESection, saes: list[SAESection], cv: Components) -> str:
    anchors = {(s.name, c.latent) for s in saes for c in s.cards}
    index = {s.name: j for j, s in enumerate(saes)}
    cards = "".join(_card(k, sec, c, cv, anchors, index) for c in sec.cards)
    cut = (
        f'<p class="cut">{sec.n_cut:,} more selected latents have no dashboard (the page stops '
        f"at {len(sec.cards):,}).</p>"
        if sec.n_cut
        else ""
    )
    opposites = (
        "<p class=note>Whether the two sides of a latent are recognisable opposites is not "
        "measured (no blind rating was run): read the top positive and negative contexts side "
        "by side.</p>"
        if int(sec.census.n_neg.sum()) > 0
        else ""
    )
    return (
        f'<section id="sae{k}"><h2>Latents of {escape(sec.name)} '
        f"<small>({escape(sec.architecture)}, {sec.d_sae:,} latents, {escape(sec.hook)})</small>"
        f"</h2>{opposites}{cards or '<p class=note>No latents selected.</p>'}{cut}</section>"
    )


def _card(
    k: int,
    sec: SAESection,
    card: Card,
    cv: Components,
    anchors: set[tuple[str, int]],
    index: dict[str, int],
) -> str:
    c, i = sec.census, card.latent
    n_pos, n_neg = int(c.n_pos[i]), int(c.n_neg[i])
    stats = (
        f'fired <span class="pos">+ {n_pos:,}</span> / <span class="neg">− {n_neg:,}</span> '
        f"of {c.n_tokens:,} tokens · balance {fmt(float(c.balance[i]), '{:.3f}')} "
        f"(sign-flip null {fmt(float(sec.controls.null_balance[i]), '{:.3f}')}) · mass "
        f'<span class="pos">+ {fmt(float(c.mass_pos[i]), "{:.4g}")}</span> / '
        f'<span class="neg">− {fmt(float(c.mass_neg[i]), "{:.4g}")}</span>'
    )
    matches = " · ".join(_match(m, anchors, index) for m in card.matches)
    limit = max([abs(v) for e in card.pos + card.neg for v in e.values] or [1.0])
    sides = "".join(
        _examples(label, css, exs, total, cv, limit)
        for label, css, exs, total in (
            ("positive", "pos", card.pos, n_pos),
            ("negative", "neg", card.neg, n_neg),
        )
    )
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in card.notes)
    return (
        f'<article class="card" id="sae{k}-latent{i}"><h3>{escape(sec.name)} · latent {i}</h3>'
        f'<p class="stats">{stats}</p>'
        f"{f'<p class=note>Closest decoder directions: {matches}</p>' if matches else ''}"
        f'<div class="cols">{sides}</div><div class="cols"><section>{_lens(card.lens)}</section>'
        f"<section>{_dial(i, card.dial, card.controls)}</section></div>{notes}</article>"
    )


def _match(m: Match, anchors: set[tuple[str, int]], index: dict[str, int]) -> str:
    side = '<span class="pos">+d</span>' if m.sign == "+" else '<span class="neg">−d</span>'
    target = f"{escape(m.sae)} #{m.latent}"
    if m.other_sign is not None:
        target += " (+d)" if m.other_sign == "+" else " (−d)"
    if (m.sae, m.latent) in anchors:
        target = f'<a href="#sae{index[m.sae]}-latent{m.latent}">{target}</a>'
    return f"{side} ≈ {target} (cos {m.cos:.2f})"


def _examples(
    label: str, css: str, exs: list[Example], total: int, cv: Components, limit: float
) -> str:
    head = f'<h4 class="{css}">Top {label} activations</h4>'
    if not exs:
        return f'<section>{head}<p class="note">Never fired {label} on these tokens.</p></section>'
    rows = "".join(
        f'<div class="ex"><span class="v {css}">{e.value:+.3g}</span>'
        f"{cv.colored_tokens(e.tokens, e.values, limit)}</div>"
        for e in exs
    )
    cut = f"showing the top {len(exs):,} of {total:,} {label} firings"
    return f'<section>{head}{rows}<p class="cut">{cut}</p></section>'


def _lens(lens: LogitLens | None) -> str:
    head = "<h4>Logit lens: tokens each direction promotes</h4>"
    if lens is None:
        return f'{head}<p class="note">Not available for this SAE.</p>'
    rows = "".join(
        f'<tr><td>{r}</td><td class="l">{show_token(pt)}</td><td>{pl:.2f}</td>'
        f'<td class="l">{show_token(nt)}</td><td>{nl:.2f}</td></tr>'
        for r, (pt, pl, nt, nl) in enumerate(
            zip(lens.pos_tokens, lens.pos_logits, lens.neg_tokens, lens.neg_logits, strict=True),
            start=1,
        )
    )
    return (
        f'{head}<table><tr><th>rank</th><th class="l pos">+d</th><th>logit</th>'
        f'<th class="l neg">−d</th><th>logit</th></tr>{rows}</table>'
    )


def _dial(latent: int, dial: Dial | None, controls: Sequence[Dial] = ()) -> str:
    head = "<h4>Steering dial</h4>"
    if dial is None or not dial.points:
        return f'{head}<p class="note">No steering sweep for this latent.</p>'
    alphas = [p.alpha for p in dial.points]
    unit = "hook-space norm" if dial.scale == 1.0 else f"typical firings (× {dial.scale:.3g})"
    series = [
        plots.Series(
            "effect = shift(T+) − shift(T−)", alphas, [p.effect for p in dial.points], "#333"
        ),
        plots.Series(
            "KL(clean ‖ steered)", alphas, [p.kl for p in dial.points], "#999", dashed=True
        ),
    ]
    if controls:
        mean = [
            sum(c.points[j].effect for c in controls) / len(controls) for j in range(len(alphas))
        ]
        series.append(plots.Series("effect, random directions", alphas, mean, "#c33", dashed=True))
    fig = plots.chart(
        series,
        f"Steering latent {latent} ({dial.mode})",
        f"alpha ({unit})",
        "nats",
        size=(420, 240),
    )
    lo, hi = dial.points[alphas.index(min(alphas))], dial.points[alphas.index(max(alphas))]
    promoted = "".join(
        f'<p class="note">α = {p.alpha:+g} promotes '
        f"{' '.join(show_token(t) for t, _ in p.promoted[:6])}</p>"
        for p in (hi, lo)
        if p.promoted
    )
    return (
        f'{head}{fig}<p class="note">monotonicity {fmt(dial.monotonicity, "{:.2f}")} · '
        f"antisymmetry {fmt(dial.antisymmetry, '{:.2f}')} (1 = a perfect two-way dial)</p>"
        f"{_specificity(dial, controls, hi.alpha, lo.alpha)}{promoted}"
    )


def _specificity(dial: Dial, controls: Sequence[Dial], *alphas: float) -> str:
    """Specificity (on-target shift / sqrt(KL)) of the latent and of its random controls at
    the extreme alphas, with 95% intervals over prompts."""
    if not controls or not all(dial.at(a).effect_prompts for a in alphas if a != 0):
        return ""

    def show(v: tuple[float, float, float]) -> str:
        return f"{fmt(v[0], '{:+.2f}')} [{fmt(v[1], '{:+.2f}')}, {fmt(v[2], '{:+.2f}')}]"

    parts = []
    for a in (a for a in alphas if a != 0):
        own = dial.at(a).specificity()
        ctl = [c.at(a).specificity() for c in controls]
        mean = sum(v[0] for v in ctl) / len(ctl)
        band = (mean, min(v[1] for v in ctl), max(v[2] for v in ctl))
        parts.append(f"α = {a:+g}: latent {show(own)} · random directions {show(band)}")
    return (
        '<p class="note">Specificity = sign(α) × on-target shift / √KL, 95% interval over '
        f"prompts; targets fixed from other rows: {' · '.join(parts)}</p>"
    )
