"""The method study's tables and plots (docs/method-study.md) from its sweep.

    sign-sae sweep study                                   # trains and evaluates every run
    python experiments/method_study.py runs/study --out docs/method-study

Writes ``study.md`` (the variant screen against the previous default's, the chosen default's
and Gated 2H's frontiers; the frontier comparisons per hook; step costs for the equal-compute
comparison; convergence over training; the polarity census at initialisation and from a
one-signed start), ``frontier_<hook>_{r2,dead}.svg``, ``convergence_{l0,r2}.svg`` and a copy of
the results table. The census controls train one extra SAE per hook (``--skip-controls`` leaves
them out). Curves are picked by label; a row's ``ablation_of`` is not used.
"""

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from analyses.report import plots
from analyses.sweep import dead_plot, polarity_columns, r2_plot, standalone
from sign_sae.architectures import make_training_sae
from sign_sae.frontier import CellReport, Curve, compare, curves, geomean_dead, interpolate
from sign_sae.harvest import ActivationCache
from sign_sae.metrics import explained_variance, l0
from sign_sae.storage import atomic_write_text
from sign_sae.sweep import load_sweep, read_results, train_config
from sign_sae.training import TensorBatches, estimate_scaling_factor, train

# the previous default, the chosen one, the baseline, and twice the steps of the last two
REFERENCE, CHOSEN, BASELINE = "default", "theta_lr_x10", "gated_2H"
CHOSEN_2X, BASELINE_2X = "theta_lr_x10_2x_steps", "gated_2H_2x_steps"
CURVES = (REFERENCE, CHOSEN, BASELINE, CHOSEN_2X, BASELINE_2X)
HOOKS = ("mlp_out", "resid_mid", "attn_out")
CONTROL_HOOKS = ("mlp_out", "attn_out")
STUDY_RESET_WINDOW = 65536
SKEW = 20  # the one-signed start: the negative side opens 20 times less often


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("sweep_dir", type=Path, help="the study sweep's out_dir (runs/study)")
    p.add_argument("--out", type=Path, default=Path("docs/method-study"))
    p.add_argument("--skip-controls", action="store_true", help="no census controls")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = read_results(a.sweep_dir / "results.csv")
    shutil.copyfile(a.sweep_dir / "results.csv", a.out / "results.csv")
    parts = [
        "# Method study: generated tables\n",
        "Written by `python experiments/method_study.py runs/study` from the study sweep "
        "(`sign-sae sweep study`); docs/method-study.md reads them.\n",
        screen(rows),
        frontiers(rows, a.out),
        step_costs(rows),
        convergence(rows, a.sweep_dir, a.out),
    ]
    if not a.skip_controls:
        parts.append(census_controls(rows, a.sweep_dir))
    atomic_write_text(a.out / "study.md", "\n".join(parts))
    print((a.out / "study.md").read_text())


# ---- the variant screen ------------------------------------------------------------------
def _curve(rows: Sequence[dict], hook: str, label: str) -> Curve | None:
    picked = [r for r in rows if r["hook_kind"] == hook and r["label"] == label and r["l0"] > 0]
    return curves(picked).get(label)


def gap(curve: Curve | None, l0: float, r2: float) -> float | None:
    """R^2 minus the curve's frontier R^2 at the same L0 (None outside its L0 range)."""
    if curve is None or len(curve.frontier) < 2:
        return None
    f = curve.frontier
    if not f[0].l0 <= l0 <= f[-1].l0:
        return None
    return r2 - interpolate([p.l0 for p in f], [p.r2 for p in f], l0)


def screen(rows: Sequence[dict]) -> str:
    """Every MLP-out run against the three reference frontiers at its own L0."""
    refs = [_curve(rows, "mlp_out", label) for label in (REFERENCE, CHOSEN, BASELINE)]
    head = [
        "label", "switch", "coef", "steps", "L0", "R^2", "dR^2 vs default",
        f"dR^2 vs {CHOSEN}", "dR^2 vs Gated 2H", "dead", "CE rec.", "KL", "bipolar", "null",
    ]  # fmt: skip
    body = []
    for r in sorted(
        (r for r in rows if r["hook_kind"] == "mlp_out"),
        key=lambda r: (r["label"] not in CURVES, r["label"], r["sparsity"]),
    ):
        switch = {**json.loads(r["options"]), **json.loads(r.get("train") or "{}")}
        if switch.get("dead_reset_tokens") == STUDY_RESET_WINDOW:  # every run's, unless off
            del switch["dead_reset_tokens"]
        gaps = [gap(c, r["l0"], r["r2"]) if c and c.label != r["label"] else None for c in refs]
        body.append(
            [
                r["label"], _switch(switch), r["sparsity"], r["steps"], r["l0"], r["r2"], *gaps,
                r["dead_fraction"], r["ce_loss_recovered"], r["kl_with_sae"],
                r.get("census_bipolar_fraction"), r.get("null_bipolar_fraction"),
            ]
        )  # fmt: skip
    return (
        "## Variant screen (MLP-out)\n\n"
        "dR^2 = the run's held-out R^2 minus the frontier's R^2 interpolated (linear in log L0) "
        "at the run's L0; blank outside that frontier's L0 range. bipolar = share of alive "
        "latents with balance >= 0.1; null = the same after the sign-flip null.\n\n"
        + _table(head, body)
    )


def _switch(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "-"


# ---- frontiers ----------------------------------------------------------------------------
PAIRS = (
    (REFERENCE, BASELINE), (CHOSEN, BASELINE), (CHOSEN, REFERENCE),
    (CHOSEN_2X, BASELINE), (CHOSEN_2X, BASELINE_2X), (CHOSEN_2X, CHOSEN), (BASELINE_2X, BASELINE),
)  # fmt: skip


def frontiers(rows: Sequence[dict], out: Path) -> str:
    """Each pair of curves compared per hook (and the R^2 and dead-fraction plots)."""
    head = [
        "hook", "curve A", "curve B", "L0 overlap", "A dominates", "min dR^2", "max dR^2",
        "dead B / dead A (geomean)",
    ]  # fmt: skip
    body = []
    for hook in HOOKS:
        cs = {label: c for label in CURVES if (c := _curve(rows, hook, label)) is not None}
        for a, b in PAIRS:
            if a in cs and b in cs:
                c = compare(cs[a], cs[b])
                span = f"{c.overlap[0]:.1f}-{c.overlap[1]:.1f}" if c.overlap else "none"
                ratio = _dead_ratio(rows, hook, a, b, max(cs[a].d_sae, cs[b].d_sae))
                body.append([hook, a, b, span, c.dominates, c.min_gap, c.max_gap, ratio])
        cell = CellReport(rows[0]["model"], hook, CHOSEN, cs, [])
        atomic_write_text(out / f"frontier_{hook}_r2.svg", r2_plot(cell))
        atomic_write_text(out / f"frontier_{hook}_dead.svg", dead_plot(cell))
    return (
        "## Frontiers\n\n"
        "dR^2 = frontier A minus frontier B over their overlapping L0 range (linear in log L0); "
        "A dominates = above B everywhere there. Dead ratio: geometric mean of the dead "
        "fractions over each curve's runs, zeros floored at half a latent of the wider SAE. "
        "Plots: frontier_<hook>_r2.svg, frontier_<hook>_dead.svg.\n\n" + _table(head, body)
    )


def _dead_ratio(rows: Sequence[dict], hook: str, a: str, b: str, d_sae: int) -> float:
    def of(label: str) -> list[dict]:
        return [r for r in rows if r["hook_kind"] == hook and r["label"] == label]

    floor = 0.5 / d_sae
    return geomean_dead(of(b), floor) / geomean_dead(of(a), floor)


def step_costs(rows: Sequence[dict]) -> str:
    """Training seconds per step by label and hook, and the ratio to Gated 2H."""
    head = ["hook", "label", "runs", "s / step", "Gated 2H / this"]
    body = []
    for hook in HOOKS:
        per = {}
        for label in CURVES:
            rs = [r for r in rows if r["hook_kind"] == hook and r["label"] == label]
            if rs:
                per[label] = (len(rs), _median([r["train_s"] / r["steps"] for r in rs]))
        for label, (n, s) in per.items():
            ratio = per[BASELINE][1] / s if BASELINE in per else None
            body.append([hook, label, n, s, ratio])
    return (
        "## Step cost\n\nMedian training wall time per step over the runs (2 CPU threads; "
        "the other runs of the sweep were the only load).\n\n" + _table(head, body)
    )


# ---- convergence --------------------------------------------------------------------------
def convergence(rows: Sequence[dict], sweep_dir: Path, out: Path) -> str:
    """Training-batch L0 and R^2 over steps for the MLP-out frontier runs, as a table of
    quarters and two SVG plots."""
    head = ["label", "coef", "steps", "L0 at 1/4, 1/2, 3/4, end", "R^2 at 1/4, 1/2, 3/4, end"]
    body, series = [], {"l0": [], "r2": []}
    picked = [
        r
        for r in rows
        if r["hook_kind"] == "mlp_out" and r["label"] in CURVES[1:] and r["sparsity"] <= 15
    ]
    picked.sort(key=lambda r: (r["label"], r["sparsity"]))
    for i, r in enumerate(picked):
        hist = json.loads((sweep_dir / r["folder"] / "train.json").read_text())["history"]
        steps = [h["step"] for h in hist]
        quarters = [hist[max(0, round(len(hist) * q) - 1)] for q in (0.25, 0.5, 0.75, 1.0)]
        body.append(
            [
                r["label"], r["sparsity"], r["steps"],
                " / ".join(f"{h['l0']:.1f}" for h in quarters),
                " / ".join(f"{h['r2']:.3f}" for h in quarters),
            ]
        )  # fmt: skip
        name = f"{r['label']} {r['sparsity']:g}"
        for key in series:
            series[key].append(
                plots.Series(
                    name,
                    steps,
                    [h[key] for h in hist],
                    plots.color(i),
                    dashed=r["label"].startswith(BASELINE),
                )
            )
    labels = [s.label for s in series["r2"]]
    for key, ylabel in (("l0", "L0 (training batch)"), ("r2", "R^2 (training batch)")):
        svg = standalone(
            series[key], f"MLP-out: {key} over training", "step", ylabel, labels, False
        )
        atomic_write_text(out / f"convergence_{key}.svg", svg)
    return (
        "## Convergence (MLP-out)\n\nL0 and R^2 of the training batch at each quarter of the "
        "run (plots: convergence_l0.svg, convergence_r2.svg).\n\n" + _table(head, body)
    )


# ---- polarity controls --------------------------------------------------------------------
def census_controls(rows: Sequence[dict], sweep_dir: Path) -> str:
    """The census of the chosen SA-GSAE at initialisation, with small and calibrated
    thresholds, and after training from a one-signed start (each latent's positive side
    calibrated to open on 64 / d_sae of the first batch's tokens, its negative side SKEW times
    less often: balance about 1 / (SKEW + 1), below the 0.1 line)."""
    cfg = load_sweep(sweep_dir / "sweep.yaml")
    entry = next(e for e in cfg.grid if e.label == CHOSEN)
    tcfg = train_config(cfg, entry, 0)
    warm_up = tcfg.total_steps // 10
    acts_dir = sweep_dir / "activations" / cfg.models[0].name
    head = ["hook", "SAE", "L0", "bipolar", "null", "R^2"]
    body = []
    for hook in CONTROL_HOOKS:
        name = next(r["hook"] for r in rows if r["hook_kind"] == hook)
        train_acts = ActivationCache.open(acts_dir / "train" / name).load()
        held = ActivationCache.open(acts_dir / "eval" / name).load().float()
        batches = TensorBatches(train_acts, tcfg.batch_size)
        scale = estimate_scaling_factor(batches, train_acts.shape[1])
        first = batches.batch(0) * scale
        for title, extra in (("init, threshold 1e-3", {}), ("init, L0 64", {"l0": 64})):
            sae = _sae(entry, train_acts.shape[1], warm_up, extra.get("l0"))
            sae.initialize_from_activations(first)
            sae.fold_activation_norm_scaling_factor(scale)
            body.append([hook, title, *_census(sae, held)])
        sae = _sae(entry, train_acts.shape[1], warm_up, None)
        with torch.no_grad():  # each side calibrated on its own sign: + on 64/d_sae of tokens
            pi = sae.process_sae_in(first) @ sae.W_enc + sae.b_gate
            rate = 64 / sae.cfg.d_sae
            sae.threshold_pos.copy_(torch.quantile(pi, 1 - rate, dim=0))
            sae.threshold_neg.copy_(torch.quantile(-pi, 1 - rate / SKEW, dim=0))
        start = _census(_folded(sae, scale), held)
        body.append([hook, f"one-signed start (negative {SKEW}x rarer)", *start])
        train(sae, batches, tcfg, progress=True)
        body.append([hook, f"trained from it, coef {entry.sparsity[1]:g}", *_census(sae, held)])
    return (
        "## Polarity census controls\n\nHeld-out census (balance >= 0.1 among alive latents) "
        f"of {CHOSEN} at initialisation, and of one trained from a start where every "
        f"latent opens its negative side {SKEW} times less often than its positive side "
        f"(balance about 1/{SKEW + 1}, below the 0.1 line).\n\n" + _table(head, body)
    )


def _sae(entry: Any, d_in: int, warm_up: int, threshold_init_l0: float | None) -> Any:
    """The chosen SA-GSAE at H, as the sweep builds it (seed 0, its coefficient 5)."""
    torch.manual_seed(0)
    options = {**entry.options, "threshold_init_l0": threshold_init_l0}
    return make_training_sae("sa_gsae", d_in, d_in, entry.sparsity[1], warm_up, **options)


def _folded(sae: Any, scale: float) -> Any:
    copy = make_training_sae("sa_gsae", sae.cfg.d_in, sae.cfg.d_sae, 1.0)
    copy.load_state_dict(sae.state_dict())
    copy.fold_activation_norm_scaling_factor(scale)
    return copy


@torch.no_grad()
def _census(sae: Any, held: torch.Tensor) -> list[float]:
    """[L0, bipolar fraction, the same under the sign-flip null, R^2] on the held-out rows."""
    cols = polarity_columns(sae, held)
    f = sae.encode(held)
    return [
        l0(f),
        cols["census_bipolar_fraction"],
        cols["null_bipolar_fraction"],
        explained_variance(held, sae.decode(f)),
    ]


# ---- formatting ---------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def _table(head: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 100 or v == 0 else f"{v:.3f}"
    return str(v)


if __name__ == "__main__":
    main()
