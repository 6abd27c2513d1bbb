"""Regenerate docs/analyses.md's figures: polarity, concentration and steering on SmolLM2-135M
layer 15, each beside a control that would come out different if the effect were absent.

    OMP_WAIT_POLICY=PASSIVE python -m experiments.analyses            # train (cached) + analyse
    OMP_WAIT_POLICY=PASSIVE python -m experiments.analyses --stage train  # only train
    (--stage polarity / steering: one part of the analysis, on the SAEs trained so far)
    python -m experiments.analyses --stage tables  # print the tables from the CSVs

Trained SAEs and activations go under runs/analyses/ (reused on a rerun); the result tables are
written to docs/analyses/*.csv. Recipe: 100k training tokens of the training plays, 8,192
held-out tokens (three other plays) for every census, 600 steps of 1024 rows.
"""

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from analyses import concentration, pairs, polarity, steering
from sign_sae.architectures import make_training_sae
from sign_sae.corpus import load_texts, tokenize
from sign_sae.harvest import harvest
from sign_sae.markdown import markdown_table
from sign_sae.metrics import BIPOLAR_BALANCE, ReconstructionStats
from sign_sae.models import hook_name, load_model, mid_layer
from sign_sae.storage import atomic_write_text, load_sae
from sign_sae.trainer import TensorBatches, TrainConfig, train

ROOT = Path("runs/analyses")
OUT = Path("docs/analyses")
CONTEXT = 128
TRAIN_TOKENS, EVAL_TOKENS = 102_400, 8192
STEPS, BATCH = 600, 1024
SEEDS = (0, 1, 2)
SA_OPTIONS = {"dead_reset_tokens": 65536}
CURVE = [i / 20 for i in range(11)]  # balance cut-offs 0, 0.05, ..., 0.5
N_STEER, PROMPTS, PROMPT_LEN, N_RANDOM = 20, 8, 32, 2
ALPHAS = [-4.0, -2.0, 0.0, 2.0, 4.0]  # in typical firings of the latent
MODES_AND_DIALS = ("signed_add", "pair_add", "signed_clamp", "pair_clamp", "random_add")


def recipe() -> list[dict]:
    """Every SAE of the study, in priority order: the points the claims rest on (coefficient 5,
    3 seeds, Gated 2H beside it, the sign surrogate) first, then attention-out at a second L0,
    the Gaussian surrogate's second seed and a second Gated seed."""

    def spec(arch: str, kind: str, data: str, width: int, sp: float, seed: int) -> dict:
        name = f"{kind}_{data}_{arch}_{width}H_sp{sp:g}_seed{seed}"
        return dict(name=name, arch=arch, kind=kind, data=data, width=width, sp=sp, seed=seed)

    specs = []
    for seed in SEEDS:
        specs += [spec("sa_gsae", kind, "real", 1, 5.0, seed) for kind in ("mlp_out", "attn_out")]
        if seed == 0:
            specs.append(spec("gated", "mlp_out", "real", 2, 5.0, seed))
        specs.append(spec("sa_gsae", "mlp_out", "signflip", 1, 5.0, seed))
        if seed == 0:
            specs.append(spec("sa_gsae", "mlp_out", "gaussian", 1, 5.0, seed))
    # attention-out at coefficients 5 and 8 (L0 ~38 and ~17) brackets MLP-out's L0 at 5 (~22)
    specs += [spec("sa_gsae", "attn_out", "real", 1, 8.0, seed) for seed in (0, 1)]
    specs += [spec("sa_gsae", "mlp_out", "gaussian", 1, 5.0, 1)]
    specs += [spec("gated", "mlp_out", "real", 2, 5.0, 1)]
    return specs


def activations(model) -> dict:
    """{split: {kind: [tokens, d] activations}} and the token rows of each split."""
    layer = mid_layer(model)
    hooks = {k: hook_name(k, layer) for k in ("mlp_out", "attn_out")}
    out, toks = {}, {}
    for split, n in (("train", TRAIN_TOKENS), ("validation", EVAL_TOKENS)):
        toks[split] = tokenize(model, load_texts(split=split), CONTEXT, n)
        caches = harvest(model, toks[split], list(hooks.values()), ROOT / "activations" / split)
        out[split] = {k: caches[h].load() for k, h in hooks.items()}
    return out, toks, hooks


def surrogate(acts: torch.Tensor, data: str, seed: int) -> torch.Tensor:
    """The real activations, or their Gaussian / sign-flipped surrogate (analyses.polarity)."""
    if data == "real":
        return acts
    fn = polarity.gaussian_surrogate if data == "gaussian" else polarity.sign_surrogate
    return fn(acts, seed=seed)


def train_all(model, acts, hooks) -> None:
    """Train every SAE of ``recipe()`` not yet on disk; logs wall time per SAE."""
    d_in = model.cfg.d_model
    for s in recipe():
        folder = ROOT / "saes" / s["name"]
        if (folder / "sae").is_dir():
            continue
        t0 = time.time()
        torch.manual_seed(s["seed"])
        opts = SA_OPTIONS if s["arch"] == "sa_gsae" else {}
        sae = make_training_sae(
            s["arch"],
            d_in,
            d_in * s["width"],
            s["sp"],
            warm_up_steps=STEPS // 10,
            metadata={"model_name": model.cfg.model_name, "hook_name": hooks[s["kind"]]},
            **opts,
        )
        x = surrogate(acts["train"][s["kind"]], s["data"], seed=100 + s["seed"])
        cfg = TrainConfig(
            total_steps=STEPS,
            batch_size=BATCH,
            lr=1e-3,
            lr_warm_up_steps=30,
            lr_decay_steps=120,
            dead_window_tokens=65536,
            seed=s["seed"],
        )
        train(sae, TensorBatches(x, BATCH, seed=s["seed"]), cfg, progress=False)
        sae.save_inference_model(folder / "sae")
        (folder / "spec.json").write_text(json.dumps({**s, "train_s": time.time() - t0}))
        print(f"trained {s['name']} in {time.time() - t0:.0f}s", flush=True)


def load(name: str):
    return load_sae(ROOT / "saes" / name / "sae")


def trained() -> list[dict]:
    """The specs of ``recipe()`` trained so far (the others are named as missing)."""
    done = [s for s in recipe() if (ROOT / "saes" / s["name"] / "sae").is_dir()]
    missing = [s["name"] for s in recipe() if s not in done]
    if missing:
        print(f"not trained yet, left out: {missing}", flush=True)
    return done


def eval_census(sae, x: torch.Tensor) -> tuple[polarity.PolarityCensus, float]:
    """The census and R^2 of ``sae`` on held-out activations ``x`` [tokens, d]."""
    rec = ReconstructionStats()
    with torch.inference_mode():
        for chunk in x.split(2048):
            rec.update(chunk, sae.decode(sae.encode(chunk)))
    return polarity.census_from_activations(sae, x.split(2048)), rec.explained_variance


def polarity_rows(acts) -> list[dict]:
    """Every SA-GSAE on its own held-out data (real, or the matching surrogate of it)."""
    rows = []
    for s in trained():
        if s["arch"] != "sa_gsae":
            continue
        x = surrogate(acts["validation"][s["kind"]], s["data"], seed=200 + s["seed"])
        sae = load(s["name"])
        c, r2 = eval_census(sae, x)
        mirrored = polarity.census_from_activations(
            sae, polarity.sign_surrogate(x, seed=300 + s["seed"]).split(2048)
        )
        conc = concentration.top_latents(c, [1, 10])
        null = c.sign_flip_null()
        null_conc = concentration.top_latents(null, [1, 10])
        rows.append(
            {
                **{k: s[k] for k in ("name", "kind", "data", "sp", "seed")},
                "l0": c.l0,
                "r2": r2,
                "dead": c.dead_fraction,
                "bipolar": c.bipolar_fraction(),
                "null_bipolar": null.bipolar_fraction(),
                "mirrored_bipolar": mirrored.bipolar_fraction(),
                "mirrored_mass_bipolarity": mirrored.mass_weighted_bipolarity(),
                "mass_bipolarity": c.mass_weighted_bipolarity(),
                **{f"curve_{t:.2f}": v for t, v in zip(CURVE, c.balance_curve(CURVE), strict=True)},
                "top1_share": conc.share[0],
                "top10_share": conc.share[1],
                "gini": conc.gini,
                "null_top10_share": null_conc.share[1],
                "null_gini": null_conc.gini,
            }
        )
        print(f"census {s['name']}: L0 {c.l0:.1f} bipolar {rows[-1]['bipolar']:.3f}", flush=True)
    return rows


def correspondence_rows(acts) -> list[dict]:
    """Bipolar SA-GSAE latents against the Gated 2H of the same hook and seed; controls: the
    same SAE's one-signed latents and as many random directions."""
    rows = []
    for s in trained():
        if s["arch"] != "gated":
            continue
        signed = f"{s['kind']}_real_sa_gsae_1H_sp5_seed{s['seed']}"
        sae, gated = load(signed), load(s["name"])
        x = acts["validation"][s["kind"]]
        c, _ = eval_census(sae, x)
        bip = (c.balance >= BIPOLAR_BALANCE) & c.alive
        uni = c.alive & ~bip
        groups = {
            "bipolar": sae.W_dec[bip],
            "one-signed": sae.W_dec[uni],
            "random": pairs.random_directions(int(bip.sum()), x.shape[1], seed=s["seed"]),
        }
        for group, dirs in groups.items():
            m = pairs.correspondence(dirs.detach(), gated, x.split(2048))
            rows.append(
                {
                    "kind": s["kind"],
                    "seed": s["seed"],
                    "signed": signed,
                    "gated": s["name"],
                    "group": group,
                    "n": int(dirs.shape[0]),
                    "share_with_pair": m.share,
                    "median_cos_pos": float(m.cos_pos.median()),
                    "median_cos_neg": float(m.cos_neg.median()),
                    "median_cofire": float(m.cofire.nanmedian()),
                }
            )
            print(f"correspondence {signed} {group}: {m.share:.3f}", flush=True)
    return rows


def steering_rows(model, acts, toks) -> list[dict]:
    """The N_STEER latents of the MLP-out SA-GSAE (coefficient 5, seed 0) with the most minority-sign
    mass on the training split, steered on held-out prompts toward targets fixed from the
    training split; controls: 2 norm-matched random directions and Gated 2H's matching pair.
    Rows are written to docs/analyses/steering.csv after every latent."""
    sae = load("mlp_out_real_sa_gsae_1H_sp5_seed0")
    gated = load("mlp_out_real_gated_2H_sp5_seed0")
    train_x = acts["train"]["mlp_out"]
    rows_t = toks["train"]
    n_rows = train_x.shape[0] // (CONTEXT - 1)
    seq = train_x[: n_rows * (CONTEXT - 1)].view(n_rows, CONTEXT - 1, -1)
    padded = torch.cat([torch.zeros_like(seq[:, :1]), seq], dim=1)  # BOS slot back: positions
    c = polarity.census_from_activations(sae, padded.split(64), exclude_bos=True, top_examples=100)
    prompts = toks["validation"][:PROMPTS, :PROMPT_LEN]
    out = []
    for latent in c.minority_mass.argsort(descending=True).tolist():
        if len(out) >= N_STEER * len(MODES_AND_DIALS):
            break
        try:
            targets = steering.context_targets(c, rows_t, latent, k=10)
        except ValueError:
            continue
        scale = steering.typical_scale(c, sae, latent)
        dials = {}
        for mode in ("add", "clamp"):
            spec = steering.DialSpec(ALPHAS, prompts, mode, scale, targets)
            cmp = steering.compare_dial(model, sae, latent, gated, spec)
            dials[f"signed_{mode}"], dials[f"pair_{mode}"] = [cmp.signed], [cmp.paired]
        spec = steering.DialSpec(ALPHAS, prompts, scale=scale, targets=targets)
        dials["random_add"] = steering.random_dials(model, sae, spec, n=N_RANDOM, seed=latent)
        for name, ds in dials.items():
            out.append(_dial_row(latent, name, ds, c, scale))
        write_csv(out, "steering.csv")  # after every latent: a partial run keeps its rows
        print(f"steered latent {latent} ({len(out) // len(dials)}/{N_STEER})", flush=True)
    return out


def _dial_row(latent: int, name: str, ds: list, c, scale: float) -> dict:
    """Specificity at +-max alpha (mean over ``ds`` with the widest of their intervals)."""
    row = {"latent": latent, "dial": name, "balance": float(c.balance[latent]), "scale": scale}
    for alpha in (max(ALPHAS), min(ALPHAS)):
        eff = [d.at(alpha).specificity() for d in ds]
        key = "plus" if alpha > 0 else "minus"
        row[f"spec_{key}"] = sum(e[0] for e in eff) / len(eff)
        row[f"spec_{key}_lo"] = min(e[1] for e in eff)
        row[f"spec_{key}_hi"] = max(e[2] for e in eff)
        row[f"kl_{key}"] = sum(d.at(alpha).kl for d in ds) / len(ds)
    row["monotonicity"] = sum(d.monotonicity for d in ds) / len(ds)
    row["antisymmetry"] = sum(d.antisymmetry for d in ds) / len(ds)
    row["latents"] = " ".join(str(i) for i in ds[0].latents)
    return row


def _mean_range(values: pd.Series, spec: str = "{:.3f}") -> str:
    """mean [min, max] over seeds (just the value for one seed)."""
    if len(values) == 1:
        return spec.format(values.iloc[0])
    return (
        f"{spec.format(values.mean())} [{spec.format(values.min())}, {spec.format(values.max())}]"
    )


def tables() -> str:
    """docs/analyses.md's result tables, from docs/analyses/*.csv."""
    pol = pd.read_csv(OUT / "polarity.csv")
    out = ["Polarity against its controls (held-out census; mean [min, max] over seeds):", ""]
    rows = []
    for (kind, data, sp), g in pol.groupby(["kind", "data", "sp"], sort=False):
        rows.append(
            [kind, data, f"{sp:g}", len(g), _mean_range(g.l0, "{:.1f}"), _mean_range(g.r2)]
            + [_mean_range(g[c]) for c in ("bipolar", "mirrored_bipolar", "null_bipolar")]
            + [_mean_range(g[c]) for c in ("mass_bipolarity", "mirrored_mass_bipolarity")]
        )
    head = ["hook", "trained on", "coef", "seeds", "L0", "R^2", "bipolar", "mirrored", "null"]
    out += [markdown_table(head + ["mass bipolarity", "mirrored"], rows), ""]
    cuts = ["0.05", "0.10", "0.20", "0.30", "0.40"]
    rows = [
        [kind, data, f"{sp:g}"] + [f"{g[f'curve_{c}'].mean():.3f}" for c in cuts]
        for (kind, data, sp), g in pol.groupby(["kind", "data", "sp"], sort=False)
    ]
    out += ["Balance curve (share of alive latents with balance >= b, seed mean):", ""]
    out += [markdown_table(["hook", "trained on", "coef"] + [f"b = {c}" for c in cuts], rows), ""]
    real = pol[pol.data == "real"]
    rows = [
        [kind, f"{sp:g}", len(g), _mean_range(g.l0, "{:.1f}")]
        + [_mean_range(g[c]) for c in ("top1_share", "top10_share", "null_top10_share")]
        + [_mean_range(g[c]) for c in ("gini", "null_gini")]
        for (kind, sp), g in real.groupby(["kind", "sp"], sort=False)
    ]
    head = ["hook", "coef", "seeds", "L0", "top-1", "top-10", "null top-10", "Gini", "null Gini"]
    out += ["Concentration of minority-sign mass (real activations):", ""]
    out += [markdown_table(head, rows), ""]
    cor = pd.read_csv(OUT / "correspondence.csv")
    rows = [
        [kind, group, len(g), _mean_range(g.n, "{:.0f}"), _mean_range(g.share_with_pair)]
        + [_mean_range(g[c]) for c in ("median_cos_pos", "median_cos_neg", "median_cofire")]
        for (kind, group), g in cor.groupby(["kind", "group"], sort=False)
    ]
    head = ["hook", "directions", "seeds", "n", "share with a pair", "median cos +d"]
    out += ["SA-GSAE latents against Gated 2H (coefficient 5 both, same seed):", ""]
    out += [markdown_table(head + ["median cos -d", "median cofire"], rows), ""]
    out += [steering_table(pd.read_csv(OUT / "steering.csv"))]
    return "\n".join(out)


def steering_table(st: pd.DataFrame) -> str:
    """Per dial kind over the steered latents: median specificity and KL at alpha = +-4, and
    how many latents are two-way dials beyond their random controls: intervals at both +4 and
    -4 above the random directions' (targets move as alpha points) or both below (reversed)."""
    rnd = st[st.dial == "random_add"].set_index("latent")
    rows = []
    for dial, g in st.groupby("dial", sort=False):
        g = g.set_index("latent")
        r = rnd.loc[g.index]
        up = (g.spec_plus_lo > r.spec_plus_hi) & (g.spec_minus_lo > r.spec_minus_hi)
        down = (g.spec_plus_hi < r.spec_plus_lo) & (g.spec_minus_hi < r.spec_minus_lo)
        rows.append(
            [
                dial,
                len(g),
                f"{g.spec_plus.median():+.2f}",
                f"{g.spec_minus.median():+.2f}",
                f"{g.spec_plus.abs().median():.2f}",
                f"{g.kl_plus.median():.4f}",
                f"{g.monotonicity.abs().median():.2f}",
                f"{g.antisymmetry.median():.2f}",
                "–" if dial == "random_add" else int(up.sum()),
                "–" if dial == "random_add" else int(down.sum()),
            ]
        )
    head = ["dial", "latents", "spec +4", "spec -4", "abs spec +4", "KL +4", "abs monotonicity"]
    head += ["antisymmetry", "beyond random, as alpha points", "beyond random, reversed"]
    return "Steering (medians over latents; spec = specificity):\n\n" + markdown_table(head, rows)


def write_csv(rows: list[dict], name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / name, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--stage", choices=["all", "train", "polarity", "steering", "tables"], default="all"
    )
    a = p.parse_args()
    if a.stage == "tables":
        print(tables())
        return
    torch.set_num_threads(2)
    t0 = time.time()
    model = load_model()
    acts, toks, hooks = activations(model)
    print(f"activations ready in {time.time() - t0:.0f}s", flush=True)
    if a.stage in ("all", "train"):
        train_all(model, acts, hooks)
    torch.set_grad_enabled(False)
    if a.stage in ("all", "polarity"):
        write_csv(polarity_rows(acts), "polarity.csv")
        print(f"polarity done at {time.time() - t0:.0f}s", flush=True)
        write_csv(correspondence_rows(acts), "correspondence.csv")
        print(f"correspondence done at {time.time() - t0:.0f}s", flush=True)
    if a.stage in ("all", "steering"):
        steering_rows(model, acts, toks)
    if a.stage == "all":
        print(tables())
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
