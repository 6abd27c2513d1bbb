"""SAEBench (``sae-bench`` 0.6.0) core and absorption evals, offline, on the SAEs of the shipped
release ``sign-sae-smollm2-135m`` (the default: its weights are in the package, so a fresh clone
runs it) or, with ``--runs``, on the fair benchmark's SAEs.

Needs the separate venv ``.venv-saebench`` (``make saebench`` builds it and runs this; sae-bench
pins numpy<2, datasets<4); sae-bench is imported where it is used. From a run folder: one SAE
per family at one matched sparsity point (seed 0, tuned labels), see ``FAMILIES``; from the
release: every SAE at ``--hook``. docs/saebench.md explains the choices and the results.

- core: SAEBench's ``core.run_evals`` on held-out plays (test split), natively for every SAE;
- signed latents (sa_gsae, abstopk): SAEBench counts a latent as firing when ``f > 0``, so their
  feature density and absorption come from an exact doubled export with ``2 x d_sae`` latents
  ``f >= 0`` (``to_doubled_jumprelu``; AbsTopK as a TopK SAE), on which core runs again
  without the CE / KL passes;
- absorption (first letter): SAEBench's eval with the offline model, a letter-stratified word
  subsample, and its activations read at the SAE's hook (the eval hard-codes
  ``blocks.{layer}.hook_resid_post``; ``_HookModel`` substitutes the SAE's hook).

    .venv-saebench/bin/python -m benchmarks.saebench --out docs/results/saebench/release
    .venv-saebench/bin/python -m benchmarks.saebench --runs runs/fair-cpu --out docs/results/saebench
"""

import argparse
import contextlib
import copy
import csv
import logging
import math
import random
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pandas as pd
import torch
from datasets import Dataset
from sae_lens import SAE
from sae_lens.saes.abstopk_sae import AbsTopKSAE
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.training.activations_store import ActivationsStore
from tqdm import tqdm

from benchmarks.common import machine, set_threads
from sign_sae import SAGSAE
from sign_sae.corpus import load_texts, tokenize
from sign_sae.export import to_doubled_jumprelu
from sign_sae.markdown import markdown_table
from sign_sae.models import load_model
from sign_sae.releases import CARD_FILE, find_release, load_pretrained
from sign_sae.runs import RESULTS_JSON
from sign_sae.storage import load_sae, read_json, read_table

log = logging.getLogger("saebench")

MODEL = "smollm2-135m"
RELEASE = "sign-sae-smollm2-135m"  # shipped in the package: the SAEs a fresh clone has
FAIR = "OMP_WAIT_POLICY=PASSIVE python -m experiments.fair"  # makes FAIR_RUNS (hours)
FAIR_RUNS = Path("runs/fair-cpu")
CONTEXT = 128
BATCH_PROMPTS = 8
# label -> sparsity (L1 / sparsity coefficient), or None: the sparsity whose held-out L0 in the
# sweep's results is closest (in log ratio) to the reference's.
FAMILIES: dict[str, float | None] = {
    "sa_gsae_H_lr0.003_x10": 4.0,
    "gated_H_lr0.003_x10": 4.0,
    "gated_2H_lr0.003_x10": 4.0,
    "jumprelu_2H_lr0.003_x10": None,
    "topk_2H_lr0.003": None,
    "abstopk_H_lr0.003": None,
}
REFERENCE = "sa_gsae_H_lr0.003_x10"
# Markdown columns: (header, CSV key, format).
TABLE = [
    ("SAE", "name", "{}"),
    ("variant", "variant", "{}"),
    ("d_sae", "d_sae", "{}"),
    ("L0", "l0", "{:.1f}"),
    ("expl. var.", "explained_variance", "{:.3f}"),
    ("cossim", "cossim", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    ("KL score", "kl_div_score", "{:.3f}"),
    ("l2 ratio", "l2_ratio", "{:.3f}"),
    ("frac alive", "frac_alive", "{:.3f}"),
    ("pairs alive", "frac_alive_pairs", "{:.3f}"),
    ("freq > 1%", "freq_over_1_percent", "{:.3f}"),
    ("freq > 10%", "freq_over_10_percent", "{:.3f}"),
    ("max dec cos", "average_max_decoder_cosine_sim", "{:.3f}"),
    ("absorption", "mean_absorption_fraction_score", "{:.3f}"),
    ("full abs.", "mean_full_absorption_score", "{:.3f}"),
    ("split feats", "mean_num_split_features", "{:.2f}"),
    ("letters", "n_letters", "{}"),
]
# Values SAEBench computes with ``f > 0``: not shown for the native form of a signed SAE.
POSITIVE_ONLY = {
    "frac_alive",
    "freq_over_1_percent",
    "freq_over_10_percent",
    "mean_absorption_fraction_score",
    "mean_full_absorption_score",
    "mean_num_split_features",
    "n_letters",
}


def select(runs: Path, hook: str, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The results rows (validation split) of the SAEs to evaluate, and the missing labels;
    each row's ``load`` loads its SAE."""
    path = runs / RESULTS_JSON
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: --runs needs the fair benchmark's trained runs, which are not in "
            f"git; make them with `{FAIR}` (hours on 2 CPU cores), or leave out --runs to run on "
            f"the shipped release {RELEASE}."
        )
    rows = [
        {**r, "load": lambda folder=r["folder"]: load_sae(runs / folder / "sae")}
        for r in read_table(path)
        if r["split"] == "validation" and r["hook"] == hook and r["seed"] == seed
    ]
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    ref = [r["l0"] for r in by_label[REFERENCE] if r["sparsity"] == FAMILIES[REFERENCE]]
    if not ref:
        raise SystemExit(f"No {REFERENCE} run at sparsity {FAMILIES[REFERENCE]} for {hook}.")
    chosen, missing = [], []
    for label, sparsity in FAMILIES.items():
        candidates = [r for r in by_label[label] if sparsity is None or r["sparsity"] == sparsity]
        if not candidates:
            missing.append(label)
            continue
        chosen.append(min(candidates, key=lambda r: abs(math.log(r["l0"] / ref[0]))))
    return chosen, missing


def from_release(release: str, hook: str) -> list[dict[str, Any]]:
    """A row per SAE of ``release`` at ``hook`` (name, arch, validation L0 from its card) whose
    ``load`` loads it."""
    lookup = find_release(release)
    ids = [i for i in lookup.saes_map if i == hook or i.startswith(f"{hook}/")]
    if not ids:
        raise SystemExit(f"Release {release} has no SAE at {hook}; it has {list(lookup.saes_map)}.")
    rows = []
    for sae_id in ids:
        card = read_json(Path(lookup.repo_id) / lookup.saes_map[sae_id] / CARD_FILE, dict)
        rows.append(
            {
                "name": sae_id,
                "arch": card["architecture"],
                "l0": card["recipe"]["validation"]["l0"],
                "load": lambda sae_id=sae_id: load_pretrained(release, sae_id),
            }
        )
    return rows


@torch.no_grad()
def doubled_abstopk(sae: AbsTopKSAE) -> TopKSAE:
    """A TopK SAE with latents ``[z, -z]`` and decoder ``[D, -D]``: the top k of ``[z, -z]``
    are the top k of ``|z|``, so it computes the same reconstruction with ``f >= 0``."""
    cfg = sae.cfg
    doubled = TopKSAE(
        TopKSAEConfig(
            d_in=cfg.d_in,
            d_sae=2 * cfg.d_sae,
            k=cfg.k,
            rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm,
            dtype=cfg.dtype,
            device=cfg.device,
            apply_b_dec_to_input=cfg.apply_b_dec_to_input,
            normalize_activations=cfg.normalize_activations,
            metadata=copy.deepcopy(cfg.metadata),
        )
    )
    doubled.load_state_dict(
        {
            "W_enc": torch.cat([sae.W_enc, -sae.W_enc], dim=1),
            "b_enc": torch.cat([sae.b_enc, -sae.b_enc]),
            "W_dec": torch.cat([sae.W_dec, -sae.W_dec]),
            "b_dec": sae.b_dec,
        }
    )
    return doubled


def doubled(sae: SAE) -> SAE | None:
    """The exact non-negative export of a signed SAE (checked on random inputs), else None."""
    if isinstance(sae, SAGSAE):
        out = to_doubled_jumprelu(sae)
    elif isinstance(sae, AbsTopKSAE):
        out = doubled_abstopk(sae)
    else:
        return None
    x = torch.randn(256, sae.cfg.d_in, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        torch.testing.assert_close(out(x), sae(x), atol=1e-4, rtol=1e-4)
    return out


def run_core(
    sae: SAE, model: Any, tokens: torch.Tensor, batches: int, downstream: bool
) -> tuple[dict[str, float], torch.Tensor]:
    """SAEBench's core metrics, flattened, and the feature densities (``f > 0``);
    ``downstream`` adds the CE / KL passes."""
    import sae_bench.evals.core.main as core
    from sae_bench.evals.core.eval_config import CoreEvalConfig

    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        context_size=CONTEXT,
        store_batch_size_prompts=BATCH_PROMPTS,
        n_batches_in_buffer=2,
        device="cpu",
    )
    cfg = CoreEvalConfig(
        model_name=MODEL,
        batch_size_prompts=BATCH_PROMPTS,
        n_eval_reconstruction_batches=batches,
        n_eval_sparsity_variance_batches=batches,
        dataset="local",
        context_size=CONTEXT,
        compute_kl=downstream,
        compute_ce_loss=downstream,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )
    t = model.tokenizer
    special = {t.pad_token_id, t.eos_token_id, t.bos_token_id} - {None}
    metrics, features = core.run_evals(sae, store, model, cfg, ignore_tokens=special)
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    flat |= core.calculate_misc_metrics(features)
    return flat, torch.tensor(features["feature_density"])


class _HookModel:
    """The model as SAEBench's absorption eval sees it. The eval always caches
    ``blocks.{layer}.hook_resid_post``; here ``run_with_cache`` returns the activations at
    ``hook`` under that name (stopping after its block; prompts start with BOS, as the SAEs'
    training rows do, which this model's tokenizer does not add), and ``cfg.model_name`` names
    the hook, so the probe cache (``probes/<model_name>/layer_<L>``) is this hook's."""

    def __init__(self, model: Any, hook: str, layer: int) -> None:
        self._model, self._hook, self._layer = model, hook, layer
        self.cfg = copy.copy(model.cfg)
        self.cfg.model_name = f"{model.cfg.model_name}-{hook}"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def run_with_cache(self, *args: Any, names_filter: list[str], **kwargs: Any) -> tuple:
        out, cache = self._model.run_with_cache(
            *args,
            names_filter=[self._hook],
            stop_at_layer=self._layer + 1,
            prepend_bos=True,
            **kwargs,
        )
        return out, {name: cache[self._hook] for name in names_filter}


def stratified_words(tokenizer: Any, per_letter: int) -> list[str]:
    """At most ``per_letter`` of SAEBench's alphabetic vocabulary tokens per first letter."""
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    by_letter: dict[str, list[str]] = defaultdict(list)
    for word in sorted(set(get_alpha_tokens(tokenizer))):
        by_letter[word.strip()[0].lower()].append(word)
    rng = random.Random(0)
    return [
        w for _, ws in sorted(by_letter.items()) for w in rng.sample(ws, min(per_letter, len(ws)))
    ]


def run_absorption(
    name: str, sae: SAE, model: _HookModel, words: list[str], work: Path
) -> dict[str, float]:
    """SAEBench's first-letter absorption metrics, the number of letters it scored (ground-truth
    probe F1 > 0.6) and the mean F1 of those probes over all 26 letters."""
    import sae_bench.evals.absorption.common as absorption_common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption
    import sae_bench.evals.absorption.main as absorption
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

    cfg = AbsorptionEvalConfig(
        model_name=MODEL,
        llm_batch_size=16,
        llm_dtype="float32",
        min_feats_for_eval=2,
        precalc_k_sparse_probe_sae_acts=True,
    )
    loader = SimpleNamespace(from_pretrained_no_processing=lambda *a, **k: model)
    # The eval draws its probe split, ICL examples and probe batches from unseeded RNGs.
    random.seed(cfg.random_seed)
    torch.manual_seed(cfg.random_seed)
    with (
        contextlib.chdir(work),  # the eval writes artifacts/absorption/ under the cwd
        patch.object(absorption, "HookedTransformer", loader),
        patch.object(absorption_common, "get_alpha_tokens", lambda *a, **k: words),
        patch.object(feature_absorption, "get_alpha_tokens", lambda *a, **k: words),
    ):
        results = absorption.run_eval(
            cfg, [(name, sae)], device="cpu", output_path=str(work), force_rerun=True
        )
        probes = pd.read_json(f"artifacts/absorption/{name}_custom_sae_k_sparse_probing.json")
    torch.set_grad_enabled(False)  # run_eval turns gradients on globally
    out = {"gt_probe_f1": probes["f1_probe"].mean()}
    if not results:  # fewer than min_feats_for_eval letters with a good probe
        return out | {"n_letters": int((probes["f1_probe"] > cfg.min_GT_probe_f1).sum())}
    result = next(iter(results.values()))
    return (
        out
        | result["eval_result_metrics"]["mean"]
        | {"n_letters": len(result["eval_result_details"])}
    )


def write(out: Path, rows: list[dict[str, Any]], header: str) -> None:
    """``saebench.csv`` (every value) and ``saebench.md`` (``TABLE``) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "saebench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        signed_native = row["signed"] and row["variant"] == "native"
        if row.get(key) is None or (signed_native and key in POSITIVE_ONLY):
            return "-"
        return fmt.format(row[key])

    table = markdown_table(
        [h for h, _, _ in TABLE], ([cell(r, k, f) for _, k, f in TABLE] for r in rows)
    )
    (out / "saebench.md").write_text(f"{header}\n\n{table}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        type=Path,
        default=None,
        help=f"a fair-benchmark run folder (runs/fair-cpu, from `{FAIR}`) instead of the release",
    )
    parser.add_argument("--release", default=RELEASE, help=f"release to run on (default {RELEASE})")
    parser.add_argument("--out", type=Path, default=Path("docs/results/saebench/release"))
    parser.add_argument("--hook", default="blocks.15.hook_mlp_out")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (--runs)")
    parser.add_argument("--batches", type=int, default=16, help="core batches of 8 x 128 tokens")
    parser.add_argument("--words-per-letter", type=int, default=60)
    parser.add_argument("--no-absorption", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def chosen_saes(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the SAEs to evaluate (from ``--runs`` or the release) and missing labels."""
    if args.runs is not None:
        return select(args.runs, args.hook, args.seed)
    if not (FAIR_RUNS / RESULTS_JSON).is_file():
        log.info("on release %s; the fair benchmark's SAEs (--runs %s) are not here: `%s` makes "
                 "them (hours)", args.release, FAIR_RUNS, FAIR)  # fmt: skip
    return from_release(args.release, args.hook), []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    chosen, missing = chosen_saes(args)  # before anything slow: a missing input is one line
    import sae_bench.evals.absorption.common as absorption_common
    from sae_bench.sae_bench_utils.general_utils import _standardize_sae_cfg
    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)  # letters absent in a split
    set_threads(args.threads)
    torch.set_grad_enabled(False)

    for label in missing:
        log.warning("no %s run at %s, seed %d: left out", label, args.hook, args.seed)
    log.info("selected: %s", ", ".join(r["name"] for r in chosen))
    model = load_model(MODEL)
    tokens = tokenize(
        model, load_texts(split="test"), CONTEXT, args.batches * BATCH_PROMPTS * CONTEXT
    )
    log.info("core: %d batches of %d x %d test tokens", args.batches, BATCH_PROMPTS, CONTEXT)

    rows: list[dict[str, Any]] = []
    absorb: list[tuple[dict[str, Any], SAE]] = []  # the form of each SAE absorption runs on
    for r in tqdm(chosen, desc="core"):
        sae = r["load"]()
        sae.fold_W_dec_norm()  # as SAEBench does to the SAEs it loads; the function is unchanged
        export = doubled(sae)
        forms = [("native", sae)] + ([("doubled", export)] if export is not None else [])
        for variant, form in forms:
            _standardize_sae_cfg(form.cfg)
            start = time.perf_counter()
            metrics, density = run_core(form, model, tokens, args.batches, variant == "native")
            row = {
                "name": r["name"],
                "arch": r["arch"],
                "signed": export is not None,
                "variant": variant,
                "d_sae": form.cfg.d_sae,
                "sweep_l0": r["l0"],
                **metrics,
                "core_s": round(time.perf_counter() - start, 1),
            }
            if form.cfg.d_sae == 2 * sae.cfg.d_sae:  # a signed latent is alive if a half is
                pairs = density.view(2, -1).sum(0)
                row["frac_alive_pairs"] = (pairs > 0).float().mean().item()
            log.info("%s (%s): core %.0f s", r["name"], variant, row["core_s"])
            rows.append(row)
        absorb.append((rows[-1], forms[-1][1]))

    source = f"`{args.runs}`, seed {args.seed}" if args.runs else f"release `{args.release}`"
    lines = [
        f"SAEBench {version('sae-bench')} on {MODEL} `{args.hook}`, from {source} "
        f"({time.strftime('%Y-%m-%d')}).",
        f"Machine: {machine()}.",
        f"Core: {args.batches} batches x {BATCH_PROMPTS} x {CONTEXT} = "
        f"{args.batches * BATCH_PROMPTS * CONTEXT} held-out test tokens (the same tokens for the "
        "CE / KL and the sparsity / variance passes; BOS / EOS left out of the metrics).",
        "Missing families: " + (", ".join(missing) or "none") + ".",
    ]
    if not args.no_absorption:
        words = stratified_words(model.tokenizer, args.words_per_letter)
        hook_model = _HookModel(model, args.hook, int(args.hook.split(".")[1]))
        # Probes are trained once per invocation (on the first SAE) and reused for the others.
        shutil.rmtree(absorption_common.PROBES_DIR / hook_model.cfg.model_name, ignore_errors=True)
        with tempfile.TemporaryDirectory() as work:
            for row, form in tqdm(absorb, desc="absorption"):
                start = time.perf_counter()
                row |= run_absorption(row["name"], form, hook_model, words, Path(work))
                row["absorption_s"] = round(time.perf_counter() - start, 1)
                log.info(
                    "%s (%s): absorption %.0f s", row["name"], row["variant"], row["absorption_s"]
                )
        probe = absorb[0][0]  # the ground-truth probes are the same for every SAE
        lines.append(
            f"Absorption: {len(words)} words (<= {args.words_per_letter} per first letter), "
            "probes and SAE inputs at the SAE's hook; ground-truth probe F1 (test words) "
            f"{probe['gt_probe_f1']:.3f} on average over 26 letters, {probe['n_letters']} "
            "letters above SAEBench's 0.6 and scored."
        )
    header = "\n".join(lines)
    write(args.out, rows, header)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
