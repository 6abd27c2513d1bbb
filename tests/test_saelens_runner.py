"""SA-GSAE through SAELens's own training runner, on real SmolLM2 activations.

The same SA-GSAE (same config, same initial weights) trains with SAELens's
``LanguageModelSAETrainingRunner`` and with sign-sae's trainer on the same cached activations
(SAELens's cached-activation format, written from sign-sae's harvest; the runner is also
given the token rows they came from, which its activation store insists on): their held-out R^2 and
L0 must agree within data-order noise, which holds only because ``threshold_lr_scale`` is
part of SA-GSAE's parametrisation (SAELens's trainer has no learning-rate groups). Folders the
runner writes load with either loader, and a finished sign-sae SAE continues training in the
runner through ``from_pretrained_path``.
"""

from pathlib import Path

import datasets
import pytest
import torch
from sae_lens import SAE, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TrainingSAE
from sae_lens.config import LoggingConfig

from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig
from sign_sae.corpus import load_texts, tokenize
from sign_sae.metrics import LatentStats
from sign_sae.storage import load_sae
from sign_sae.trainer import TensorBatches, TrainConfig, train

CONTEXT = 127  # the harvest's 128-token rows without BOS
BATCH, LR, COEFFICIENT = 512, 3e-3, 4.0
HOOK = "blocks.15.hook_mlp_out"


@pytest.fixture(scope="module")
def tokens(model) -> datasets.Dataset:
    """The token rows ``mlp_out_activations`` was harvested from, BOS dropped as there."""
    rows = tokenize(model, load_texts(split="train"), CONTEXT + 1, 32 * 1024)[:, 1:]
    return datasets.Dataset.from_dict({"input_ids": rows.tolist()})


@pytest.fixture(scope="module")
def data(mlp_out_activations, tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """(training rows, held-out rows, SAELens cache folder), scaled once to E||x||^2 = d_in
    so that neither trainer rescales (each would estimate its own factor)."""
    train_acts, held = mlp_out_activations
    d_in = train_acts.shape[1]
    scale = (d_in / train_acts.float().pow(2).sum(-1).mean()).sqrt()
    train_acts, held = train_acts.float() * scale, held * scale
    n = train_acts.shape[0] // CONTEXT * CONTEXT
    train_acts = train_acts[:n]
    folder = tmp_path_factory.mktemp("saelens_cache")
    features = datasets.Features({HOOK: datasets.Array2D((CONTEXT, d_in), "float32")})
    rows = train_acts.reshape(-1, CONTEXT, d_in).numpy()
    datasets.Dataset.from_dict({HOOK: rows}, features=features).save_to_disk(str(folder))
    return train_acts, held, folder


def fresh_sae(d_in: int, **options) -> SAGSAETrainingSAE:
    torch.manual_seed(0)
    cfg = SAGSAETrainingSAEConfig(
        d_in=d_in, d_sae=d_in, sparsity_coefficient=COEFFICIENT, **options
    )
    cfg.metadata.hook_name = HOOK
    return SAGSAETrainingSAE(cfg)


def runner_config(cache: Path, out: Path, tokens: int, **kwargs) -> LanguageModelSAERunnerConfig:
    return LanguageModelSAERunnerConfig(
        sae=kwargs.pop("sae", None) or SAGSAETrainingSAEConfig(d_in=576, d_sae=576),
        model_name="SmolLM2-135M-Instruct",
        hook_name=HOOK,
        use_cached_activations=True,
        cached_activations_path=str(cache),
        context_size=CONTEXT,
        training_tokens=tokens,
        train_batch_size_tokens=BATCH,
        n_batches_in_buffer=32,  # rows buffered for mixing: 32 x CONTEXT
        store_batch_size_prompts=8,
        lr=LR,
        lr_end=LR,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        output_path=str(out),
        checkpoint_path=str(out / "checkpoints"),
        logger=LoggingConfig(log_to_wandb=False),
        **kwargs,
    )


def held_out(sae: TrainingSAE | SAE, held: torch.Tensor) -> tuple[float, float]:
    """(R^2, signed L0) on the held-out rows."""
    with torch.no_grad():
        f = sae.encode(held)
        recon = sae.decode(f)
    stats = LatentStats(f.shape[-1])
    stats.update(f)
    r2 = 1 - (recon - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
    return r2.item(), float((f != 0).sum(-1).float().mean())


def run(model, tokens: datasets.Dataset, cfg: LanguageModelSAERunnerConfig, **kw) -> TrainingSAE:
    """SAELens's runner on the offline model and tokens (``kw``: an ``override_sae``)."""
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=tokens, **kw
    )
    return runner.run()


def test_saelens_runner_trains_the_same_sa_gsae_as_sign_sae(model, tokens, data, tmp_path):
    train_acts, held, cache = data
    steps = train_acts.shape[0] // BATCH
    ours = fresh_sae(train_acts.shape[1])
    recipe = TrainConfig(total_steps=steps, batch_size=BATCH, lr=LR, normalize=False)
    train(ours, TensorBatches(train_acts, BATCH), recipe, progress=False)
    theirs = fresh_sae(train_acts.shape[1])
    run(
        model,
        tokens,
        runner_config(cache, tmp_path, steps * BATCH, sae=theirs.cfg),
        override_sae=theirs,
    )
    (r2_ours, l0_ours), (r2_theirs, l0_theirs) = held_out(ours, held), held_out(theirs, held)
    assert 0.3 < r2_ours < 0.99 and 2 < l0_ours < 200  # a real, sparse SAE
    assert abs(r2_theirs - r2_ours) < 0.02, (r2_ours, r2_theirs)
    assert abs(l0_theirs / l0_ours - 1) < 0.15, (l0_ours, l0_theirs)
    # what the runner wrote loads with either loader and computes what it trained
    for loaded in (SAE.load_from_disk(tmp_path), load_sae(tmp_path)):
        assert held_out(loaded, held) == pytest.approx((r2_theirs, l0_theirs), rel=1e-4)


def test_a_sign_sae_run_continues_in_the_saelens_runner(model, tokens, data, tmp_path):
    """A finished sign-sae SAE, saved in inference form, is the runner's starting point
    (``from_pretrained_path``); its training checkpoint loads with either loader."""
    train_acts, held, cache = data
    ours = fresh_sae(train_acts.shape[1])
    recipe = TrainConfig(total_steps=16, batch_size=BATCH, lr=LR, normalize=False)
    train(ours, TensorBatches(train_acts, BATCH), recipe, progress=False)
    ours.save_inference_model(tmp_path / "released")
    start = TrainingSAE.load_from_disk(tmp_path / "released")
    assert held_out(start, held) == pytest.approx(held_out(ours, held), rel=1e-4)
    cfg = runner_config(
        cache,
        tmp_path / "continued",
        16 * BATCH,
        sae=start.cfg,
        from_pretrained_path=str(tmp_path / "released"),
        n_checkpoints=1,
    )
    continued = run(model, tokens, cfg)
    assert isinstance(continued, SAGSAETrainingSAE)
    assert held_out(continued, held)[0] > held_out(ours, held)[0] - 0.02  # continued, not reset
    (checkpoint,) = [p for p in (tmp_path / "continued" / "checkpoints").rglob("cfg.json")][:1]
    for loaded in (SAE.load_from_disk(checkpoint.parent), load_sae(checkpoint.parent)):
        assert not isinstance(loaded, TrainingSAE)
        assert held_out(loaded, held)[1] > 0
