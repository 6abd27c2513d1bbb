"""Builds the release shipped in the package, ``sign-sae-smollm2-135m`` (docs/releases.md):

    OMP_WAIT_POLICY=PASSIVE python -m experiments.release          # train, evaluate, export

SA-GSAE at H and SAELens's Gated SAE at 2H on the three layer-15 hooks of SmolLM2-135M
(MLP-out, resid-mid, attention-out), each with the fair benchmark's tuned CPU recipe (its
validation winners, ``docs/results/cpu/winners.json``: learning rate 3e-3, thresholds / gate
biases at 10x; 300 steps of 1024 tokens) at sparsity coefficient ``COEFFICIENT``. H is 448,
not the benchmark's 576: six SAEs at H = 576 come to 11.9 MB in fp16, over the 10 MB the
package may ship; 448 is the largest multiple of 64 under it.

Stages (resumable, in ``runs/release/``): the fair benchmark's CPU harvest (reused when it is
there), training, evaluation on the validation and test splits, then the export into
``sign_sae/pretrained/<release>/``: fp16 weights, firing frequencies over the training
activations, and a card per SAE (``card.json``: recipe, commit, held-out metrics of the
shipped weights on the test split, and the ``check`` numbers ``tests/test_shipped_release.py``
recomputes offline). ``sign_sae/releases.yaml`` is rewritten to register it.
"""

import json
import logging
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from experiments import fair
from sign_sae import runs
from sign_sae.corpus import load_texts, tokenize
from sign_sae.evaluate import HeldOut, held_out
from sign_sae.export import export
from sign_sae.harvest import ActivationCache
from sign_sae.markdown import markdown_table
from sign_sae.models import load_model
from sign_sae.releases import CARD_FILE, load_pretrained, register_releases
from sign_sae.storage import atomic_write_text

log = logging.getLogger("experiments.release")

RELEASE = "sign-sae-smollm2-135m"
MODEL = "smollm2-135m"
H = 448
COEFFICIENT = 4.0  # the middle of the fair frontier's settings: L0 about 15-45 at these hooks
FAMILIES = ("sa_gsae_H", "gated_2H")
HOOKS = ["mlp_out", "resid_mid", "attn_out"]
PACKAGE = Path(__file__).resolve().parents[1] / "sign_sae"
OUT = PACKAGE / "pretrained" / RELEASE
WINNERS = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu" / "winners.json"
CHECK_ROWS, CHECK_CONTEXT = 32, 128  # the test split's first rows, recomputed by the test


def sweep(split: str = "validation") -> runs.SweepConfig:
    """The fair CPU budget at H = 448, the two families at their validation winners."""
    winners = json.loads(WINNERS.read_text())
    budget = fair.BUDGETS["cpu"]
    grid = [
        fair.FAMILIES[name].entry(
            winners[name]["lr"], winners[name]["mult"], sparsity=[COEFFICIENT], hooks=HOOKS
        )
        for name in FAMILIES
    ]
    return runs.SweepConfig(
        out_dir="runs/release",
        data=fair.data_config(budget, split),
        h_expansion=H / 576,  # d_model of SmolLM2-135M
        train=runs.TrainConfig(**budget.train),
        grid=grid,
    )


def check_metrics(sae: Any, check: HeldOut) -> dict[str, float]:
    """R^2 and L0 on the check rows: what the card records and the test recomputes."""
    result = check.evaluate(sae)
    return {"r2": result.r2, "l0": result.l0}


def check_held_out(model: Any, hooks: list[str]) -> HeldOut:
    """The first ``CHECK_ROWS`` rows of the test split, read from the model now (float32)."""
    tokens = tokenize(model, load_texts(split="test"), CHECK_CONTEXT, CHECK_ROWS * CHECK_CONTEXT)
    return held_out(model, tokens, hooks, ce_rows=2)


def _commit() -> str:
    """The commit that builds the release ("-dirty" when the code differs from it)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "sign_sae", "experiments")
    return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")


def build() -> None:
    commit, cfg, test = _commit(), sweep(), sweep("test")
    runs.run_sweep(cfg)  # harvest (or reuse), train, evaluate on validation
    runs.evaluate_runs(test)
    model = load_model(MODEL)
    trained = {r.config_hash: r for r in runs.resolve(cfg, cfg.data.models[0], model)}
    ids = {  # SA-GSAE answers to the bare hook, Gated to <hook>/gated_2H
        h: r.hook if r.point.entry.arch == "sa_gsae" else f"{r.hook}/gated_2H"
        for h, r in trained.items()
    }
    hooks = sorted({r.hook for r in trained.values()})
    train_acts = {
        hook: ActivationCache.open(runs.activations_dir(cfg.out_dir, MODEL, "train") / hook)
        for hook in hooks
    }
    names = {name: ids[rec["config_hash"]] for name, rec in runs.trained_runs(cfg.out_dir).items()}
    export(cfg.out_dir, OUT, RELEASE, train_acts, ids=names, weights_dtype="float16")
    _register_shipped()
    # the cards: metrics of the shipped (fp16) weights, loaded the way a user loads them
    register_releases(PACKAGE / "releases.yaml", replace=True)
    tokens = runs.Inputs(test.data, {MODEL: model}).tokens(model, "test")
    held = runs.held_out_split(test, MODEL, model, tokens, hooks)
    check = check_held_out(model, hooks)
    validation = {
        row["config_hash"]: row
        for row in runs.read_results(Path(cfg.out_dir) / runs.RESULTS_JSON)
        if runs.row_split(row) == "validation"
    }
    cards = []
    for config_hash, r in trained.items():
        sae = load_pretrained(RELEASE, ids[config_hash])
        card = {
            "release": RELEASE,
            "sae_id": ids[config_hash],
            "architecture": sae.cfg.architecture(),
            "hook": r.hook,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "commit": commit,
            "rebuild": "OMP_WAIT_POLICY=PASSIVE python -m experiments.release",
            "recipe": {
                "label": r.point.entry.label,
                "sae_options": r.point.entry.options,
                "sparsity_coefficient": COEFFICIENT,
                "train": asdict(r.train),
                "data": f"{MODEL}, Shakespeare training plays (sign_sae.corpus)",
                "validation": {k: validation[config_hash][k] for k in ("r2", "l0")},
            },
            "held_out": {"split": "test", **held.evaluate(sae, r.hook).to_dict()},
            "check": {
                "split": "test",
                "rows": CHECK_ROWS,
                "context": CHECK_CONTEXT,
                **check_metrics(sae, check),
            },
        }
        path = OUT / ids[config_hash] / CARD_FILE
        atomic_write_text(path, json.dumps(card, indent=1, default=str) + "\n")
        cards.append(card)
        log.info("%s: R^2 %.4f, L0 %.2f", ids[config_hash], card["held_out"]["r2"],
                 card["held_out"]["l0"])  # fmt: skip
    _add_cards_to_readme(cards)


def _add_cards_to_readme(cards: list[dict[str, Any]]) -> None:
    """The README's card section: held-out metrics of every entry, the recipe, the rebuild."""
    rows = [
        [c["sae_id"], c["architecture"], c["d_sae"]]
        + [round(c["held_out"][k], 4) for k in ("r2", "l0", "dead_fraction", "ce_loss_recovered")]
        for c in cards
    ]
    table = markdown_table(["sae_id", "arch", "d_sae", "R^2", "L0", "dead", "CE rec."], rows)
    text = (OUT / "README.md").read_text() + (
        f"\n## Card\n\nHeld-out metrics of the shipped (fp16) weights on the test plays "
        f"({cards[0]['held_out']['n_tokens']:,} tokens; L0 and dead count f != 0, "
        f"docs/metrics.md):\n\n{table}\n\nRecipe: the fair benchmark's CPU recipe at its "
        f"validation winners, sparsity coefficient {COEFFICIENT:g}, H = {H}; built at commit "
        f"{cards[0]['commit']}; each SAE's `{CARD_FILE}` has the details. Rebuild: "
        f"`{cards[0]['rebuild']}`.\n"
    )
    atomic_write_text(OUT / "README.md", text)


def _register_shipped() -> None:
    """Point ``sign_sae/releases.yaml`` (its comment header kept) at the exported release."""
    path = PACKAGE / "releases.yaml"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    entry = yaml.safe_load((OUT / "release.yaml").read_text())[RELEASE]
    entry["repo_id"] = f"./{OUT.relative_to(PACKAGE).as_posix()}"
    body = yaml.safe_dump({RELEASE: entry}, sort_keys=False)
    atomic_write_text(path, "\n".join(header) + "\n" + body)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    build()
