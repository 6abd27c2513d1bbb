"""The fair benchmark's protocol (experiments/fair.py, experiments/fair_grid.py): equal grids,
selection on validation only."""

import math
from collections import Counter

import pytest

from experiments import fair, fair_grid
from sign_sae import runs


def tuning_rows(split: str, best: dict[str, tuple[float, float | None]], bonus: float) -> list:
    """Rows for every tuning run on ``split``: R^2 rises with L0; each family's ``best`` config
    gets ``bonus`` more R^2."""
    rows = []
    for e in fair_grid.tuning_grid():
        f = fair_grid.FAMILIES[e.label.split("_lr")[0]]
        lr = e.train["lr"]
        mult = e.options.get(
            "threshold_lr_scale", next(iter(e.train.get("lr_scales", {}).values()), None)
        )
        for sp in e.sparsity:
            l0 = 200.0 / sp if f.arch not in ("topk", "abstopk") else sp
            r2 = 0.2 + 0.1 * math.log(l0) + (bonus if best[f.name] == (lr, mult) else 0.0)
            rows.append(dict(label=e.label, hook_kind="mlp_out", seed=0, sparsity=sp,
                             split=split, l0=l0, r2=r2))  # fmt: skip
    return rows


def test_every_architecture_gets_the_same_grid():
    grid = fair_grid.tuning_grid()
    per_family = Counter(e.label.split("_lr")[0] for e in grid)
    tuned = [f for f in fair_grid.FAMILIES.values() if f.tune_at]
    assert {f.name for f in tuned} == {"sa_gsae_H", "onesided_H", "gated_2H", "jumprelu_2H",
                                       "topk_2H", "abstopk_H"}  # fmt: skip
    for f in tuned:
        assert per_family[f.name] == len(fair_grid.LRS) * (
            len(fair_grid.MULTIPLIERS) if f.rate else 1
        )
    assert all(e.hooks == ["mlp_out"] and e.seeds == [0] for e in grid)
    # the multiplier reaches the thresholds / gate biases of each architecture
    gated = next(e for e in grid if e.label == "gated_2H_lr0.001_x10")
    assert gated.train == {"lr": 0.001, "lr_scales": {"b_gate": 10.0}}
    sa = next(e for e in grid if e.label == "sa_gsae_H_lr0.003_x1")
    assert sa.options == {"threshold_lr_scale": 1.0} and sa.train == {"lr": 0.003}
    one = next(e for e in grid if e.label == "onesided_H_lr0.0003_x10")
    assert one.options == {"two_sided": False, "threshold_lr_scale": 10.0}


def test_the_tuning_score_extends_the_line_through_the_two_settings():
    pts = [(10.0, 0.5), (40.0, 0.7)]
    assert fair_grid.score_at(pts) == pytest.approx(0.6)  # TARGET_L0 = 20: the log-midpoint
    assert fair_grid.score_at([(40.0, 0.5), (160.0, 0.7)]) == pytest.approx(0.4)  # extended
    assert fair_grid.score_at([(16.0, 0.3)]) == 0.3


def test_selection_reads_only_validation_rows():
    val_best = {f.name: (1e-3, 10.0 if f.rate else None) for f in fair_grid.FAMILIES.values()}
    test_best = {f.name: (3e-3, 1.0 if f.rate else None) for f in fair_grid.FAMILIES.values()}
    validation = tuning_rows("validation", val_best, 0.05)
    winners, grid = fair_grid.select(validation)
    assert {n: (w["lr"], w["mult"]) for n, w in winners.items()} == {
        n: val_best[n] for n in winners
    }
    assert grid["winner"].sum() == len(winners) == 6
    # test rows that would crown other configurations change nothing
    poisoned = validation + tuning_rows("test", test_best, 0.5)
    assert fair_grid.select(poisoned)[0] == winners
    # nor do test rows alone select anything
    assert fair_grid.select(tuning_rows("test", test_best, 0.5))[0] == {}


def test_the_frontier_gives_every_family_five_settings_and_the_key_ones_three_seeds():
    winners = {f.name: {"lr": 1e-3, "mult": 10.0 if f.rate else None}
               for f in fair_grid.FAMILIES.values() if f.tune_at}  # fmt: skip
    cfg = fair.sweep("cpu", fair.frontier_grid(winners))
    seeds: dict = {}
    for p in runs.plan(cfg):
        seeds.setdefault((p.entry.label, p.hook, p.sparsity), set()).add(p.seed)
    labels = {p.entry.label.split("_lr")[0] for p in runs.plan(cfg)}
    assert labels == set(fair_grid.FAMILIES)
    for (label, hook, _), s in seeds.items():
        key = label.split("_lr")[0] in fair_grid.KEY and hook == "mlp_out"
        assert s == ({0, 1, 2} if key else {0}), (label, hook)
    for name in fair_grid.FAMILIES:
        n = {sp for (lab, hook, sp) in seeds if lab.startswith(name + "_lr") and hook == "mlp_out"}
        assert len(n) == 5, name
    # the tuning runs of a winner are frontier runs (same label, settings and recipe)
    tune = {(e.label, sp) for e in fair_grid.tuning_grid() for sp in e.sparsity}
    assert tune & {(lab, sp) for (lab, _, sp) in seeds}
