"""Train one SAE on the synthetic signed ground truth and print its recovery figures.

python experiments/synthetic.py --arch sa_gsae --coef 0.3
python experiments/synthetic.py --arch sa_gsae --coef 2.0 --aux 0
python experiments/synthetic.py --arch gated --coef 1.0 --width 144
"""

import argparse
import json

import torch
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig
from sign_sae.metrics import LatentStats, ReconstructionStats
from sign_sae.synthetic import SyntheticData, SyntheticSpec, fraction_recovered, signed_coverage
from sign_sae.trainer import TensorBatches, TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=["sa_gsae", "gated"], default="sa_gsae")
    p.add_argument("--width", type=int, default=72)
    p.add_argument("--coef", type=float, default=0.3)
    p.add_argument("--aux", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    data = SyntheticData(SyntheticSpec())
    x_train = data.sample(120_000, torch.Generator().manual_seed(1))[0]
    x_eval = data.sample(20_000, torch.Generator().manual_seed(2))[0]
    torch.manual_seed(a.seed)
    warm = a.steps // 10
    if a.arch == "gated":
        sae = GatedTrainingSAE(
            GatedTrainingSAEConfig(
                d_in=96, d_sae=a.width, l1_coefficient=a.coef, l1_warm_up_steps=warm
            )
        )
    else:
        sae = SAGSAETrainingSAE(
            SAGSAETrainingSAEConfig(
                d_in=96,
                d_sae=a.width,
                sparsity_coefficient=a.coef,
                sparsity_warm_up_steps=warm,
                aux_coefficient=a.aux,
            )
        )
    cfg = TrainConfig(total_steps=a.steps, batch_size=1024, lr=3e-3, normalize=False, seed=a.seed)
    train(sae, TensorBatches(x_train, 1024, seed=a.seed), cfg)
    with torch.no_grad():
        f = sae.encode(x_eval)
        x_hat = sae.decode(f)
    lat, rec = LatentStats(a.width), ReconstructionStats()
    lat.update(f)
    rec.update(x_eval, x_hat)
    dirs, signs = data.signed_directions
    W = sae.W_dec.detach()
    print(
        json.dumps(
            {
                **vars(a),
                "r2": round(rec.explained_variance, 4),
                "l0": round(lat.l0, 2),
                "dead": round(lat.dead_fraction, 3),
                "signed_coverage": round(signed_coverage(W, lat.n_pos, lat.n_neg, dirs, signs), 3),
                "recovered": round(fraction_recovered(W, data.directions), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
