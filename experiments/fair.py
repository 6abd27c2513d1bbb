"""The fair benchmark: does sign-awareness itself beat a tuned Gated SAE? (docs/results.md)

    OMP_WAIT_POLICY=PASSIVE python -m experiments.fair                   # every stage, CPU budget
    OMP_WAIT_POLICY=PASSIVE python -m experiments.fair --stage tune      # one stage
    python -m experiments.fair --budget gpu                              # the GPU budget

Stages, each resumable (finished runs are kept in ``runs/fair-<budget>/`` and skipped on a
rerun; the result tables are written to ``docs/results/<budget>/`` after every stage):

1. ``harvest``: the activations of every training token of the training plays and of the first
   ``eval_tokens`` of each held-out split, at every hook, one forward pass per split.
2. ``tune``: every architecture gets the same grid on MLP-out, scored on the validation split:
   base learning rate in ``LRS`` x (where it has thresholds or gate biases) their learning-rate
   multiplier in ``MULTIPLIERS``, at the two sparsity settings ``tune_at``, seed 0. The score
   is R^2 at L0 = ``TARGET_L0``, interpolated linearly in log L0 between the two settings
   (extended along that line when they do not bracket it); TopK and AbsTopK, whose k fixes L0,
   train one setting (k = 16) and score its R^2. ``select`` reads validation rows only (the
   families, the grid and the selection are ``experiments.fair_grid``).
3. ``frontier``: each architecture with its winner at five sparsity settings; three seeds on
   the points the claims rest on (``KEY``), one elsewhere; the other hooks after MLP-out.
4. ``test``: the frontier runs evaluated on the test split (the only numbers reported).
5. ``convergence``: the key families' tuning settings at twice the steps.

``--stage tables`` rewrites the tables (``experiments.fair_tables``) from the runs so far.
"""

import argparse
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from analyses.sweep import polarity_columns
from analyses.sweep import run as sweep_with_polarity
from experiments import fair_tables
from experiments.fair_grid import (
    FAMILIES,
    KEY,
    LONGER,
    MAIN_HOOK,
    OTHER_HOOKS,
    SEEDS,
    rows,
    run_dir,
    select,
    tuning_grid,
)
from sign_sae import runs
from sign_sae.models import load_model

log = logging.getLogger("experiments.fair")

# Dead latents: a latent of the wider SAE (2H) firing at a tenth of the mean rate L0 / d_sae is
# expected to fire DEAD_FIRINGS times in the window: window >= 10 * DEAD_FIRINGS * d_sae / L0.
DEAD_FIRINGS = 10


@dataclass(frozen=True)
class Budget:
    """How big a run of the protocol is."""

    h_expansion: float  # H = h_expansion x d_model
    train: dict[str, Any]  # TrainConfig fields
    eval_tokens: int  # per held-out split; also the dead-latent window
    ce_tokens: int
    device: str
    harvest_batch_size: int = 32


BUDGETS = {
    # 300 steps of 1024: each run sees 307k of the 1.28M training tokens once (no repeats).
    "cpu": Budget(
        h_expansion=1.0,
        train=dict(
            total_steps=300,
            batch_size=1024,
            lr_warm_up_steps=15,
            lr_decay_steps=60,
            dead_window_tokens=65536,
            autocast_dtype="bfloat16",
            checkpoint_every=100,
            log_every=50,
        ),
        eval_tokens=65536,
        ce_tokens=1024,
        device="cpu",
    ),
    # H = 8 d_model; every training token seen about once (320 steps of 4096). Its frontier of
    # the key families runs on the GPU host through benchmarks/gpu/science.yaml (docs/gpu.md).
    "gpu": Budget(
        h_expansion=8.0,
        train=dict(
            total_steps=320,
            batch_size=4096,
            lr_warm_up_steps=16,
            lr_decay_steps=64,
            dead_window_tokens=262144,
            autocast_dtype="bfloat16",
            checkpoint_every=0,
            log_every=50,
        ),
        eval_tokens=65536,
        ce_tokens=4096,
        device="cuda",
        harvest_batch_size=64,
    ),
}


def data_config(budget: Budget, split: str = "validation") -> runs.DataConfig:
    return runs.DataConfig(
        models=["smollm2-135m"],
        hooks=[MAIN_HOOK, *OTHER_HOOKS],
        text="shakespeare",
        context_size=128,
        train_tokens=2_000_000,  # every token of the training plays (1.28M)
        eval_tokens=budget.eval_tokens,
        ce_tokens=budget.ce_tokens,
        eval_split=split,
        harvest_dtype="bfloat16",
        forward_dtype="bfloat16",
        harvest_batch_size=budget.harvest_batch_size,
        device=budget.device,
        epochs=2,  # the GPU budget's 320 x 4096 rows are a little over one pass
        cache=True,
    )


def sweep(budget: str, grid: list[runs.GridEntry], split: str = "validation") -> runs.SweepConfig:
    b = BUDGETS[budget]
    return runs.SweepConfig(
        out_dir=str(run_dir(budget)),
        data=data_config(b, split),
        h_expansion=b.h_expansion,
        train=runs.TrainConfig(**b.train),
        grid=grid,
    )


# ---- the grids ----------------------------------------------------------------------------
def frontier_grid(winners: dict[str, dict[str, Any]]) -> list[runs.GridEntry]:
    """The winners at every sparsity, in priority order: the key families' seed 0, their
    siblings, the key families' other seeds, the other baselines, then the other hooks."""

    def entry(name: str, seeds: list[int], hooks: list[str]) -> runs.GridEntry:
        w = winners[FAMILIES[name].tuned_as or name]
        return FAMILIES[name].entry(w["lr"], w["mult"], seeds=seeds, hooks=hooks)

    main = [MAIN_HOOK]
    grid = [entry(n, [0], main) for n in KEY]
    grid += [entry(n, [0], main) for n in ("sa_gsae_2H", "onesided_2H", "gated_H")]
    grid += [entry(n, list(SEEDS[1:]), main) for n in KEY]
    grid += [entry(n, [0], main) for n in ("jumprelu_2H", "topk_2H", "abstopk_H")]
    grid += [entry(n, [0], OTHER_HOOKS) for n in ("sa_gsae_H", "gated_2H")]
    return grid


def convergence_grid(winners: dict[str, dict[str, Any]], budget: str) -> list[runs.GridEntry]:
    """The key families' tuning settings at twice the steps (each token still seen at most
    once): does the comparison still move when training runs longer?"""
    grid = []
    for name in KEY:
        f, w = FAMILIES[name], winners[name]
        e = f.entry(w["lr"], w["mult"], sparsity=list(f.tune_at), hooks=[MAIN_HOOK])
        steps = {k: 2 * v for k, v in BUDGETS[budget].train.items() if k in _STEP_KEYS}
        grid.append(replace(e, label=e.label + LONGER, train={**e.train, **steps}))
    return grid


_STEP_KEYS = ("total_steps", "lr_warm_up_steps", "lr_decay_steps")


# ---- stages -------------------------------------------------------------------------------
def stage_harvest(budget: str) -> None:
    """One harvest per split at every hook (the later stages reuse it)."""
    cfg = sweep(budget, tuning_grid())
    model = load_model("smollm2-135m", device=cfg.data.device)
    source = runs.Inputs(cfg.data, {"smollm2-135m": model})
    names = [runs.resolve_hook(model, h, cfg.data.layer) for h in cfg.data.hooks]
    for split in ("train", "validation", "test"):
        start = time.perf_counter()
        tokens = source.tokens(model, split)
        caches = runs.harvest_split(cfg, "smollm2-135m", model, tokens, names, split)
        n = next(iter(caches.values())).n_tokens
        log.info("harvest %s: %d tokens x %d hooks in %.0f s", split, n, len(names),
                 time.perf_counter() - start)  # fmt: skip


def stage_tune(budget: str) -> None:
    sweep_with_polarity(sweep(budget, tuning_grid()))


def winners_of(budget: str) -> dict[str, dict[str, Any]]:
    winners, _ = select(rows(budget))
    missing = sorted({f.tuned_as or f.name for f in FAMILIES.values()} - set(winners))
    if missing:
        raise SystemExit(f"tuning is not finished for {missing}: run --stage tune first.")
    return winners


def stage_frontier(budget: str) -> None:
    sweep_with_polarity(sweep(budget, frontier_grid(winners_of(budget))))


def stage_test(budget: str) -> None:
    cfg = sweep(budget, frontier_grid(winners_of(budget)), split="test")
    runs.evaluate_runs(cfg, columns=polarity_columns)


def stage_convergence(budget: str) -> None:
    grid = convergence_grid(winners_of(budget), budget)
    sweep_with_polarity(sweep(budget, grid))
    runs.evaluate_runs(sweep(budget, grid, split="test"), columns=polarity_columns)


STAGES = {
    "harvest": stage_harvest,
    "tune": stage_tune,
    "frontier": stage_frontier,
    "test": stage_test,
    "convergence": stage_convergence,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--stage", choices=[*STAGES, "tables", "all"], default="all")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    todo = list(STAGES) if args.stage == "all" else [args.stage] if args.stage != "tables" else []
    for stage in todo:
        start = time.perf_counter()
        STAGES[stage](args.budget)
        log.info("stage %s done in %.0f s", stage, time.perf_counter() - start)
        fair_tables.write(args.budget)
    if args.stage == "tables":
        if not rows(args.budget):
            raise SystemExit(
                f"runs/fair-{args.budget}/{runs.RESULTS_JSON} is missing: make the runs with "
                f"`OMP_WAIT_POLICY=PASSIVE python -m experiments.fair --budget {args.budget}`."
            )
        fair_tables.write(args.budget)


if __name__ == "__main__":
    main()
