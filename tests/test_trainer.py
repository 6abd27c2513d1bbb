"""The trainer: exact resume, schedules, the SAE protocol (learning-rate groups, constraints
after the optimiser step, one dead-latent clock), bad batches."""

import pytest
import torch

from sign_sae.architectures import ARCHITECTURES, make_training_sae, parameter_count
from sign_sae.storage import read_weights
from sign_sae.trainer import (
    Constrained,
    TensorBatches,
    TrainConfig,
    Trainer,
    _lr_at,
    _param_groups,
    estimate_scaling_factor,
    train,
)

D_IN = 24


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4096, D_IN, generator=g) * 3.0 + 1.0


def cfg(**kw) -> TrainConfig:
    base = dict(total_steps=30, batch_size=256, lr=3e-3, lr_warm_up_steps=5, lr_decay_steps=10)
    return TrainConfig(**{**base, **kw})


CONTROLS = dict(lr_scales={"raw_threshold_*": 3.0, "b_gate": 2.0}, normalize=True)


@pytest.mark.parametrize(
    "arch, sparsity, controls",
    [("sa_gsae", 0.5, {}), ("gated", 0.5, {}), ("topk", 8, {}), ("sa_gsae", 0.5, CONTROLS)],
)
def test_resume_gives_the_same_weights(arch, sparsity, controls, data, tmp_path):
    def fresh():
        torch.manual_seed(0)
        return make_training_sae(arch, D_IN, 64, sparsity, warm_up_steps=5)

    straight = fresh()
    train(straight, TensorBatches(data, 256, seed=1), cfg(**controls), progress=False)
    paused = fresh()
    first = train(
        paused,
        TensorBatches(data, 256, seed=1),
        cfg(**controls),
        run_dir=tmp_path,
        progress=False,
        stop_at=13,
    )
    assert first.steps == 13
    resumed = fresh()  # a new process would start from scratch and read the checkpoint
    train(
        resumed,
        TensorBatches(data, 256, seed=1),
        cfg(**controls),
        run_dir=tmp_path,
        resume=True,
        progress=False,
    )
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_scaling_is_folded_so_the_sae_takes_raw_inputs(data):
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", D_IN, 64, 0.1)
    res = train(sae, TensorBatches(data, 256), cfg(total_steps=200), progress=False)
    assert res.scaling_factor == pytest.approx(
        (D_IN / data.pow(2).sum(-1).mean()).sqrt().item(), rel=0.05
    )
    x = data[:512]
    r2 = 1 - (sae.decode(sae.encode(x)) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert r2 > 0.5  # would be far off if the scale were not folded back


def test_scaling_factor_does_not_depend_on_the_seed(data):
    factors = {estimate_scaling_factor(TensorBatches(data, 256, seed=s), D_IN) for s in range(3)}
    assert len(factors) == 1
    assert factors.pop() == pytest.approx((D_IN / data.pow(2).sum(-1).mean()).sqrt().item())


def test_lr_scales_give_matched_parameters_their_own_learning_rate():
    sae = make_training_sae("sa_gsae", D_IN, 32, 1.0)
    groups = _param_groups(sae, {"raw_threshold_*": 10.0, "b_gate": 0.5})
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scales[id(sae.raw_threshold_pos)] == scales[id(sae.raw_threshold_neg)] == 10.0
    assert scales[id(sae.b_gate)] == 0.5 and scales[id(sae.W_enc)] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(sae.parameters()))
    with pytest.raises(ValueError, match=r"\['thresh'\] match no parameter"):
        _param_groups(sae, {"thresh": 2.0})


def test_constraints_and_resets_run_after_the_optimiser_step(data, tmp_path):
    """SA-GSAE's dead latents are reset by the trainer, on its one clock (its thresholds stay
    >= 0); the clock restarts for reset latents and is saved in the trainer's own file."""
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", D_IN, 64, 0.5, dead_reset_tokens=512)
    with torch.no_grad():
        sae.raw_threshold_pos[:4] = 1e3  # these latents cannot fire until reset
        sae.raw_threshold_neg[:4] = 1e3
    trainer = Trainer(sae, TensorBatches(data, 256), cfg(total_steps=3), run_dir=tmp_path)
    trainer.run(stop_at=1)
    assert trainer.tokens_since_fired[:4].tolist() == [256] * 4  # one step: not yet dead
    assert (sae.threshold_pos[:4] > 100).all()
    trainer.run(resume=True, stop_at=2)  # the second step makes them dead: reset at once
    assert trainer.tokens_since_fired[:4].tolist() == [0] * 4
    assert sae.threshold_pos[:4].tolist() == pytest.approx([sae.cfg.threshold_init] * 4)
    assert (sae.threshold_pos >= 0).all() and (sae.threshold_neg >= 0).all()
    saved = read_weights(tmp_path / "checkpoint" / "step_000000002" / "trainer.safetensors")
    assert torch.equal(saved["tokens_since_fired"], trainer.tokens_since_fired)


def test_saelens_baselines_need_no_protocol(data):
    sae = make_training_sae("gated", D_IN, 32, 0.1)
    trainer = Trainer(sae, TensorBatches(data, 256), cfg(total_steps=2))
    assert not trainer.constrained and isinstance(
        make_training_sae("sa_gsae", D_IN, 8, 1), Constrained
    )
    trainer.run()
    assert trainer.step == 2 and len(trainer.opt.param_groups) == 1


def test_lr_schedule_warms_up_and_decays():
    c = cfg(total_steps=100, lr=1.0, lr_warm_up_steps=10, lr_decay_steps=20, lr_end=0.0)
    assert _lr_at(c, 0) == pytest.approx(0.1)
    assert _lr_at(c, 50) == 1.0
    assert _lr_at(c, 99) == pytest.approx(0.0)
    assert _lr_at(c, 89) == pytest.approx(0.5)


def test_nan_batch_names_the_step(data):
    bad = data.clone()
    bad[:, 3] = float("nan")
    sae = make_training_sae("gated", D_IN, 32, 0.1)
    with pytest.raises(ValueError, match="Step 0: the batch holds 256 NaN"):
        train(sae, TensorBatches(bad, 256), cfg(), progress=False)


def test_every_architecture_builds_and_counts_parameters():
    for arch in ARCHITECTURES:
        sae = make_training_sae(arch, D_IN, 48, 4)
        assert parameter_count(sae) > 2 * D_IN * 48
    with pytest.raises(ValueError, match="Unknown architecture"):
        make_training_sae("relu", D_IN, 48, 1)


def test_bad_train_config():
    with pytest.raises(ValueError, match="total_steps must be positive"):
        TrainConfig(total_steps=0)
    with pytest.raises(ValueError, match="lr_scales must be positive"):
        TrainConfig(lr_scales={"W_enc": 0.0})
