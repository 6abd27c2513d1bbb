"""The SAELens contract: the generic per-architecture checks SAELens's own SAEs pass, run on
``sa_gsae`` with SAELens's ``standard``, ``gated`` and ``jumprelu`` as controls in the same
parametrisation. Where a convention cannot hold for signed latents (feature_acts >= 0), the
signed version of the property is asserted instead: exactly zero where inactive, both signs
present, and folding keeps each latent's support and sign.
"""

import math

import datasets
import pytest
import torch
from sae_lens import SAE, HookedSAETransformer, TrainingSAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformerConfig

import sign_sae  # noqa: F401  (registers sa_gsae)
from sign_sae.storage import load_sae

ARCHS = ["sa_gsae", "standard", "gated", "jumprelu"]
D_IN, D_SAE, HOOK = 16, 32, "blocks.0.hook_resid_post"


def make(arch: str, seed: int = 0, **cfg) -> TrainingSAE:
    """A training SAE of ``arch`` with random (not initial) parameters, hooked at ``HOOK``."""
    torch.manual_seed(seed)
    cls, cfg_cls = get_sae_training_class(arch)
    config = cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg)
    config.metadata.hook_name = HOOK
    sae = cls(config)
    state = sae.state_dict()
    scale = float(state.get("threshold_lr_scale", 1.0))  # SA-GSAE learns threshold / scale
    for name, p in state.items():
        if p.ndim == 1:
            p.copy_(0.2 * torch.randn_like(p))
        if "threshold" in name:
            p.abs_()
        if name.startswith("raw_"):
            p.div_(scale)
        if name == "W_dec":
            p.mul_(1 + torch.rand(D_SAE, 1))  # non-unit rows for the fold checks
    sae.load_state_dict(state)
    return sae


def x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def signed(arch: str) -> bool:
    return arch == "sa_gsae"


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trips_through_its_dict(arch):
    sae = make(arch)
    cfg_cls = type(sae.cfg)
    assert cfg_cls.from_dict(sae.cfg.to_dict()) == sae.cfg
    inf_cfg = sae.cfg.get_inference_config_class().from_dict(sae.cfg.get_inference_sae_cfg_dict())
    assert inf_cfg.d_in == D_IN and inf_cfg.d_sae == D_SAE and inf_cfg.metadata.hook_name == HOOK


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_sign_convention(arch):
    f = make(arch).encode(x())
    assert (f == 0).any() and (f > 0).any()  # sparse, with exact zeros
    assert (f < 0).any() == signed(arch)  # SAELens's f >= 0; SA-GSAE's both signs


@pytest.mark.parametrize("arch", ARCHS)
def test_training_form_saves_and_loads(arch, tmp_path):
    sae = make(arch)
    sae.save_model(tmp_path)
    back = TrainingSAE.load_from_disk(tmp_path)
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for name, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    torch.testing.assert_close(back.encode(x()), sae.encode(x()))


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_form_computes_the_training_function(arch, tmp_path):
    sae = make(arch)
    sae.save_inference_model(tmp_path)
    inf = SAE.load_from_disk(tmp_path)
    assert not isinstance(inf, TrainingSAE)
    torch.testing.assert_close(inf.encode(x()), sae.encode(x()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf(x()), sae.decode(sae.encode(x())), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_decoder_norms_keeps_the_reconstruction(arch, tmp_path):
    sae = make(arch)
    f, out = sae.encode(x()), sae.decode(sae.encode(x()))
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.decode(sae.encode(x())), out, atol=1e-5, rtol=1e-5)
    # latents rescale by the old norms: same support, same signs
    assert torch.equal(torch.sign(sae.encode(x())), torch.sign(f))


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_an_activation_scale_keeps_the_function(arch):
    sae = make(arch)
    expected = sae.decode(sae.encode(x() * 2.5)) / 2.5
    sae.fold_activation_norm_scaling_factor(2.5)
    torch.testing.assert_close(sae.decode(sae.encode(x())), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_dtype_moves_keep_the_function(arch):
    sae = make(arch)
    out = sae.decode(sae.encode(x()))
    sae64 = sae.to(torch.float64)
    # (SAELens's JumpReLU training SAE keeps its threshold in float32: the weights are checked)
    assert sae64.W_enc.dtype == sae64.W_dec.dtype == sae64.b_dec.dtype == torch.float64
    torch.testing.assert_close(sae64.decode(sae64.encode(x().double())).float(), out, atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_points_see_every_stage(arch):
    sae = make(arch)
    _, cache = sae.run_with_cache(x())
    names = {"hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons"}
    assert names <= set(cache.keys())
    torch.testing.assert_close(cache["hook_sae_acts_post"], sae.encode(x()))


@pytest.fixture(scope="module")
def tiny() -> HookedSAETransformer:
    """A random one-layer model (hook plumbing only, never evidence about the method)."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_IN, n_ctx=12, d_head=8, n_heads=2, d_mlp=32, d_vocab=40, act_fn="gelu"
    )
    return HookedSAETransformer(cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_sae_transformer_splices_with_and_without_the_error_term(arch, tiny, tmp_path):
    make(arch).save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    clean = tiny(tokens)
    sae.use_error_term = True
    torch.testing.assert_close(tiny.run_with_saes(tokens, saes=[sae]), clean, atol=1e-4, rtol=1e-4)
    sae.use_error_term = False
    spliced, cache = tiny.run_with_cache_with_saes(tokens, saes=[sae])
    assert not torch.allclose(spliced, clean, atol=1e-3)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (2, 12, D_SAE) and (acts < 0).any() == signed(arch)
    assert tiny.acts_to_saes == {}  # run_with_saes leaves the model as it was


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_trainer_steps_and_checkpoints(arch, tmp_path):
    sae = make(arch)
    data = torch.randn(4096, D_IN, generator=torch.Generator().manual_seed(4)) * 2 + 0.5
    batches = iter(data.split(128))
    cfg = SAETrainerConfig(
        total_training_samples=1024,
        train_batch_size_samples=128,
        lr=3e-3,
        lr_end=3e-3,
        checkpoint_path=str(tmp_path),
        save_final_checkpoint=True,
        logger=LoggingConfig(log_to_wandb=False),
    )
    before = sae.training_forward_pass(_step_input(sae, data[:512])).losses["mse_loss"].item()
    trained = SAETrainer(cfg, sae, batches).fit()
    after = trained.training_forward_pass(_step_input(trained, data[:512])).losses["mse_loss"]
    assert after.item() < before
    (final,) = [p for p in tmp_path.iterdir() if p.name.startswith("final_")]
    back = TrainingSAE.load_from_disk(final)
    torch.testing.assert_close(back.encode(data[:64]), trained.encode(data[:64]))


def _step_input(sae: TrainingSAE, batch: torch.Tensor) -> TrainStepInput:
    coefficients = {k: getattr(c, "value", c) for k, c in sae.get_coefficients().items()}
    return TrainStepInput(
        sae_in=batch,
        coefficients=coefficients,
        dead_neuron_mask=torch.zeros(D_SAE, dtype=torch.bool),
        n_training_steps=0,
        is_logging_step=False,
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_run_evals(arch, tiny, tmp_path):
    """SAELens's own evaluator runs on each SAE (its L0 counts f > 0, so for SA-GSAE it leaves
    out the negative firings; sign_sae.evaluate is the one that counts f != 0)."""
    sae = make(arch)
    sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = 12, False
    sae.save_inference_model(tmp_path)
    sae = SAE.load_from_disk(tmp_path)
    tokens = torch.randint(0, 40, (64, 12), generator=torch.Generator().manual_seed(0))
    store = ActivationsStore.from_sae(
        tiny, sae, datasets.Dataset.from_dict({"tokens": tokens.tolist()}), streaming=False,
        store_batch_size_prompts=8, n_batches_in_buffer=2, train_batch_size_tokens=64,
    )  # fmt: skip
    config = EvalConfig(
        n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_kl=True,
        compute_ce_loss=True,
    )  # fmt: skip
    metrics, _ = run_evals(
        sae, store, tiny, ActivationScaler(), config, exclude_special_tokens=False
    )
    values = [
        metrics["model_behavior_preservation"]["kl_div_with_sae"],
        metrics["model_performance_preservation"]["ce_loss_with_sae"],
        metrics["reconstruction_quality"]["explained_variance"],
        metrics["sparsity"]["l0"],
    ]
    assert all(math.isfinite(v) for v in values), metrics
    assert 0 < metrics["sparsity"]["l0"] < D_SAE


@pytest.mark.parametrize("arch", ARCHS)
def test_either_form_loads_with_either_loader(arch, tmp_path):
    """A training checkpoint loads as an inference SAE, and an inference folder (a release)
    loads as a training SAE to continue training; both compute the saved function, and a round
    trip training -> inference -> training keeps it."""
    sae = make(arch)
    out = sae.decode(sae.encode(x()))
    sae.save_model(tmp_path / "training")
    sae.save_inference_model(tmp_path / "inference")
    inf = SAE.load_from_disk(tmp_path / "training")
    safe = load_sae(tmp_path / "training")  # sign-sae's checked loader takes it too
    train = TrainingSAE.load_from_disk(tmp_path / "inference")
    assert not isinstance(inf, TrainingSAE) and isinstance(train, TrainingSAE)
    for other in (inf, safe, train):
        torch.testing.assert_close(other.decode(other.encode(x())), out, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.sign(other.encode(x())), torch.sign(sae.encode(x())))
    loss = train.training_forward_pass(_step_input(train, x())).loss
    assert torch.isfinite(loss)  # and it trains from there
    train.save_inference_model(tmp_path / "again")
    again = SAE.load_from_disk(tmp_path / "again")
    torch.testing.assert_close(again(x()), out, atol=1e-5, rtol=1e-5)
