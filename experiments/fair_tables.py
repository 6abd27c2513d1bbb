"""The tables of the fair benchmark (``experiments.fair``), written to docs/results/<budget>/.

Every number is read from the protocol's results table and, for intervals, from the runs'
per-sequence sums (``sign_sae.runs.load_sequences``). What is reported comes from the test
split; the tuning table and the regression margin come from the validation split.
"""

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analyses import gaps
from analyses.frontier import interpolate
from experiments import fair_grid
from sign_sae import runs
from sign_sae.markdown import markdown_table
from sign_sae.storage import atomic_write_text

log = logging.getLogger("experiments.fair")

# (a, b) pairs whose gap a - b is reported, on MLP-out; the other hooks get the first only.
PAIRS = [
    ("sa_gsae_H", "gated_2H"),  # the paper's headline
    ("sa_gsae_H", "onesided_H"),  # sign-awareness at H
    ("onesided_H", "gated_2H"),  # our parametrisation at half width vs SAELens Gated
    ("sa_gsae_2H", "onesided_2H"),  # sign-awareness at 2H
    ("onesided_2H", "gated_2H"),  # our parametrisation vs SAELens Gated at equal width
    ("onesided_H", "onesided_2H"),  # width, in our parametrisation
    ("sa_gsae_H", "gated_H"),
    ("sa_gsae_H", "jumprelu_2H"),
    ("sa_gsae_H", "topk_2H"),
    ("sa_gsae_H", "abstopk_H"),
]
N_BOOT = 1000
MATCHED_L0 = (5.0, 10.0, 20.0, 40.0)
PROFILE_L0 = (3.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)  # where the gap profile is read


def family(label: str) -> str:
    return label.split("_lr")[0]


def out_dir(budget: str) -> Path:
    return Path("docs/results") / budget


def write(budget: str) -> None:
    """Every table the finished stages allow."""
    rows = fair_grid.rows(budget)
    if not rows:
        return
    out = out_dir(budget)
    atomic_write_text(out / "results.csv", runs.to_csv(rows))
    winners, grid = fair_grid.select(rows)
    if len(grid):
        atomic_write_text(out / "tuning.csv", grid.to_csv(index=False))
        atomic_write_text(out / "winners.json", json.dumps(winners, indent=1))
    sections = [("Tuning grid (validation, MLP-out, seed 0)", tuning_table(grid))]
    frontier = [r for r in rows if _in_frontier(r, winners)]
    for split in ("test", "validation"):
        mine = [r for r in frontier if runs.row_split(r) == split]
        if not mine:
            continue
        points = points_table(mine)
        atomic_write_text(out / f"points-{split}.csv", points.to_csv(index=False))
        found = gap_table(budget, mine)
        atomic_write_text(out / f"gaps-{split}.csv", found.to_csv(index=False))
        profile = profile_table(budget, mine)
        atomic_write_text(out / f"gap-profile-{split}.csv", profile.to_csv(index=False))
        dead = dead_table(mine)
        atomic_write_text(out / f"dead-{split}.csv", dead.to_csv(index=False))
        sections += [
            (f"Gaps ({split})", _md(found, GAP_COLUMNS)),
            (f"Gap by L0, log-linear, seed means ({split})", _md(profile, list(profile.columns))),
            (f"Dead latents at matched L0 ({split})", _md(dead, list(dead.columns))),
            (f"Frontier points ({split})", _md(points, POINT_COLUMNS)),
        ]
    longer = convergence_table(budget, rows)
    if len(longer):
        atomic_write_text(out / "convergence.csv", longer.to_csv(index=False))
        sections.append(("Twice the steps (seed 0)", _md(longer, list(longer.columns))))
    text = "\n".join(f"## {title}\n\n{body}\n" for title, body in sections if body)
    atomic_write_text(out / "tables.md", f"# Fair benchmark tables ({budget})\n\n{text}")
    log.info("tables written to %s", out)


def _in_frontier(row: dict[str, Any], winners: dict[str, dict[str, Any]]) -> bool:
    """A run of a family's winning configuration (the tuning runs of the winner included)."""
    f = fair_grid.FAMILIES.get(family(row["label"]))
    if f is None or (f.tuned_as or f.name) not in winners:
        return False
    w = winners[f.tuned_as or f.name]
    return row["label"] == f.entry(w["lr"], w["mult"]).label


def tuning_table(grid: pd.DataFrame) -> str:
    if not len(grid):
        return ""
    body = [
        [
            r.family,
            f"{r.lr:g}",
            "-"
            if r.mult is None or (isinstance(r.mult, float) and math.isnan(r.mult))
            else f"{r.mult:g}",  # fmt: skip
            " / ".join(f"{x:.1f}" for x in r.l0),
            " / ".join(f"{x:.3f}" for x in r.r2),
            f"{r.score:.3f}",
            "**winner**" if r.winner else "",
        ]
        for r in grid.itertuples()
    ]
    head = ["family", "lr", "multiplier", "L0", "R^2", f"R^2 at L0 {fair_grid.TARGET_L0:g}", ""]
    return markdown_table(head, body)


POINT_COLUMNS = ["hook_kind", "family", "sparsity", "seeds", "l0", "r2", "r2_sd",
                 "dead_fraction", "bipolar_fraction", "null_bipolar_fraction", "top10_share"]  # fmt: skip


def points_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per hook, family and sparsity: means over seeds (and R^2's seed SD)."""
    df = pd.DataFrame(rows)
    df["family"] = df["label"].map(family)
    df["bipolar_fraction"] = df.get("census_bipolar_fraction", df["bipolar_fraction"])
    keys = ["hook_kind", "family", "sparsity"]
    agg = df.groupby(keys, sort=False).agg(
        seeds=("seed", "count"),
        d_sae=("d_sae", "first"),
        l0=("l0", "mean"),
        r2=("r2", "mean"),
        r2_sd=("r2", "std"),
        dead_fraction=("dead_fraction", "mean"),
        bipolar_fraction=("bipolar_fraction", "mean"),
        null_bipolar_fraction=("null_bipolar_fraction", "mean"),
        top10_share=("top10_share", "mean"),
    )
    return agg.reset_index().sort_values(keys)


GAP_COLUMNS = ["hook_kind", "a", "b", "interpolation", "overlap", "points_in_overlap", "seeds",
               "min_gap", "min_gap_ci", "mean_gap", "mean_gap_ci", "max_gap", "max_gap_ci",
               "verdict"]  # fmt: skip


def curves(budget: str, rows: list[dict[str, Any]]) -> dict[tuple[str, str], gaps.SettingRuns]:
    """{(hook kind, family): {sparsity: [SequenceStats per seed]}} of one split's rows."""
    root = fair_grid.run_dir(budget)
    found: dict[tuple[str, str], dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(rows, key=lambda r: r["seed"]):
        folder = root / r["folder"]
        if (folder / runs.sequences_file(runs.row_split(r))).is_file():
            stats = runs.load_sequences(folder, runs.row_split(r))
            found[(r["hook_kind"], family(r["label"]))][float(r["sparsity"])].append(stats)
    return found


def gap_table(budget: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Every reported pair's gap under both interpolations, with its bootstrap intervals."""
    cs = curves(budget, rows)
    out = []
    for hook in dict.fromkeys(r["hook_kind"] for r in rows):
        pairs = PAIRS if hook == fair_grid.MAIN_HOOK else PAIRS[:1]
        for a, b in pairs:
            if (hook, a) not in cs or (hook, b) not in cs:
                continue
            ca, cb = cs[(hook, a)], cs[(hook, b)]
            for interpolation in gaps.INTERPOLATIONS:
                g = gaps.bootstrap_gap(ca, cb, (a, b), interpolation, n_boot=N_BOOT)
                inside = _inside(g.overlap, ca, cb)
                out.append(
                    dict(
                        hook_kind=hook,
                        a=a,
                        b=b,
                        interpolation=interpolation,
                        overlap=_span(g.overlap),
                        points_in_overlap=inside,
                        seeds=f"{_seeds(ca)} / {_seeds(cb)}",
                        min_gap=g.min_gap,
                        min_gap_ci=_ci(g.min_gap_ci),
                        mean_gap=g.mean_gap,
                        mean_gap_ci=_ci(g.mean_gap_ci),
                        max_gap=g.max_gap,
                        max_gap_ci=_ci(g.max_gap_ci),
                        verdict=g.verdict,
                    )  # fmt: skip
                )
    return pd.DataFrame(out, columns=GAP_COLUMNS)


def profile_table(budget: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """R^2 of a minus R^2 of b at ``PROFILE_L0`` (inside both frontiers), per reported pair."""
    cs = curves(budget, rows)
    out = []
    for hook in dict.fromkeys(r["hook_kind"] for r in rows):
        for a, b in PAIRS if hook == fair_grid.MAIN_HOOK else PAIRS[:1]:
            if (hook, a) not in cs or (hook, b) not in cs:
                continue
            fa, fb = (gaps.frontier_points(cs[(hook, n)]) for n in (a, b))
            lo, hi = max(fa[0][0], fb[0][0]), min(fa[-1][0], fb[-1][0])
            row: dict[str, Any] = {"hook_kind": hook, "a": a, "b": b}
            for l0 in PROFILE_L0:
                x = np.array([l0])
                inside = lo <= l0 <= hi
                d = gaps.r2_at(fa, x, "log_linear") - gaps.r2_at(fb, x, "log_linear")
                row[f"L0={l0:g}"] = f"{d[0]:+.3f}" if inside else "-"
            out.append(row)
    return pd.DataFrame(out)


def convergence_table(budget: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The key families' 2x-steps runs beside their 300-step runs at the same settings (seed
    0), and how far each moved off the 300-step frontier (seed means): R^2 of the longer run
    minus the frontier's R^2 at the longer run's L0."""
    winners, _ = fair_grid.select(rows)
    out = []
    for split in ("validation", "test"):
        mine = [
            r for r in rows if runs.row_split(r) == split and r["hook_kind"] == fair_grid.MAIN_HOOK
        ]
        by_label = {(r["label"], r["sparsity"], r["seed"]): r for r in mine}
        cs = curves(budget, [r for r in mine if _in_frontier(r, winners)])
        for r in mine:
            if not r["label"].endswith(fair_grid.LONGER):
                continue
            base = by_label.get((r["label"].removesuffix(fair_grid.LONGER), r["sparsity"], 0))
            name = family(r["label"])
            if base is None or (fair_grid.MAIN_HOOK, name) not in cs:
                continue
            front = gaps.frontier_points(cs[(fair_grid.MAIN_HOOK, name)])
            inside = front[0][0] <= r["l0"] <= front[-1][0]
            off = r["r2"] - gaps.r2_at(front, np.array([r["l0"]]), "log_linear")[0]
            out.append(
                dict(
                    split=split,
                    family=name,
                    sparsity=r["sparsity"],
                    l0=f"{base['l0']:.1f} -> {r['l0']:.1f}",
                    r2=f"{base['r2']:.3f} -> {r['r2']:.3f}",
                    off_frontier=f"{off:+.3f}" if inside else "-",
                )  # fmt: skip
            )
    return pd.DataFrame(out)


def _inside(overlap: tuple[float, float] | None, *cs: gaps.SettingRuns) -> str:
    if overlap is None:
        return "0 / 0"
    lo, hi = overlap
    counts = [sum(lo <= x <= hi for x, _ in gaps.frontier_points(c)) for c in cs]
    return " / ".join(map(str, counts))


def _seeds(c: gaps.SettingRuns) -> str:
    return "/".join(str(n) for n in sorted({len(v) for v in c.values()}))


def _span(overlap: tuple[float, float] | None) -> str:
    return "none" if overlap is None else f"{overlap[0]:.1f}-{overlap[1]:.1f}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def dead_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Dead fraction of SA-GSAE H and Gated 2H interpolated (linearly in log L0 over the
    seed-mean sweep points) at matched L0, and their geomean ratio over the sweep; per hook."""
    pts = points_table(rows)
    out = []
    for hook, part in pts.groupby("hook_kind", sort=False):
        by = {f: p.sort_values("l0") for f, p in part.groupby("family")}
        if "sa_gsae_H" not in by or "gated_2H" not in by:
            continue
        row: dict[str, Any] = {"hook_kind": hook}
        for l0 in MATCHED_L0:
            vals = [_at(by[f], l0) for f in ("sa_gsae_H", "gated_2H")]
            row[f"L0={l0:g}"] = "-" if None in vals else f"{vals[0]:.3f} / {vals[1]:.3f}"
        floor = 0.5 / by["gated_2H"]["d_sae"].max()  # a zero counts as half a latent of 2H
        ratio = [
            np.exp(np.mean(np.log(np.maximum(by[f]["dead_fraction"], floor))))
            for f in ("sa_gsae_H", "gated_2H")
        ]
        row["geomean SA / Gated"] = f"{ratio[0]:.4f} / {ratio[1]:.4f}"
        out.append(row)
    return pd.DataFrame(out)


def _at(points: pd.DataFrame, l0: float) -> float | None:
    """The dead fraction at ``l0`` over the seed-mean points; None outside their L0 range."""
    dead = interpolate(points["l0"].tolist(), points["dead_fraction"].tolist(), l0)
    return None if math.isnan(dead) else dead


def _md(df: pd.DataFrame, columns: list[str]) -> str:
    if not len(df):
        return ""
    cells = [[_fmt(v) for v in r] for r in df[columns].itertuples(index=False)]
    return markdown_table(columns, cells)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
