"""Latent sharding on CPU gloo ranks: a sharded SA-GSAE is the 1-process SAE, step for step."""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import load_file, save_file
from test_distributed import one_thread, run_ranks

from sign_sae import distributed
from sign_sae.architectures import make_training_sae
from sign_sae.errors import SignSAEError
from sign_sae.sharding import Mesh, clip_gradients, gather_state, gathered, shard
from sign_sae.storage import save_sae
from sign_sae.trainer import TensorBatches, TrainConfig, Trainer, train

D_IN, WIDTH, STEPS, PAUSE, SPARSITY = 16, 48, 20, 11, 10.0
# name -> (SAE options, fused step, sparse decode); strong sparsity and a short reset window
# make threshold resets fire within the 20 steps, and grad_clip 0.5 binds at every step
CASES = {
    "tied": ({}, True, False),
    "untied": ({"tied": False}, True, False),
    "tied_reference": ({}, False, False),
    "untied_sparse_decode": ({"tied": False}, False, True),
}
WORLD, SHARDS = 4, (2, 4)  # one spawn of 4 ranks: meshes of 2 data x 2 latent shards, 1 x 4


def _data() -> torch.Tensor:
    return torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


def _sae(case: str, width: int = WIDTH):
    options, fused, _ = CASES[case]
    torch.manual_seed(0)
    sae = make_training_sae("sa_gsae", D_IN, width, SPARSITY, 4, dead_reset_tokens=512, **options)
    sae.fused = fused
    return sae


def _cfg(case: str, shards: int) -> TrainConfig:
    return TrainConfig(
        total_steps=STEPS, batch_size=256, lr=1e-2, lr_warm_up_steps=4, grad_clip=0.5,
        log_every=5, checkpoint_every=5, latent_shards=shards, sparse_decode=CASES[case][2],
    )  # fmt: skip


def _train(case: str, shards: int, width: int = WIDTH, **kw) -> tuple[dict, torch.Tensor]:
    """(final state, history rows) of one 20-step run."""
    sae = _sae(case, width)
    data = TensorBatches(_data(), 256, seed=1)
    res = train(sae, data, _cfg(case, shards), progress=False, **kw)
    return sae.state_dict(), torch.tensor([list(r.values()) for r in res.history])


def _step(case: str, shards: int) -> dict[str, torch.Tensor]:
    """One forward and backward on a batch: losses, latents, gradients and the clipped
    gradients, gathered to their 1-process form."""
    sae = _sae(case)
    mesh = Mesh.of(shards)
    local = shard(sae, mesh) if mesh.sharded else sae
    local.sparse_decode = CASES[case][2]
    x = _data()[:256]
    dead = torch.zeros(local.cfg.d_sae, dtype=torch.bool)
    out = local.training_forward_pass(TrainStepInput(x, {"sparsity": SPARSITY}, dead, 0, False))
    out.loss.backward()
    grads = {f"grad/{n}": p.grad.clone() for n, p in local.named_parameters()}
    clip_gradients(local, 0.01, mesh)
    clipped = {f"clipped/{n}": p.grad for n, p in local.named_parameters()}
    found = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.losses.items()}}
    found["feature_acts"] = gathered(out.feature_acts, 1, mesh)
    found["sae_out"] = out.sae_out.detach()
    return {**found, **gather_state({**grads, **clipped}, mesh)}


def _error(fn) -> str:
    try:
        fn()
    except SignSAEError as e:
        return str(e)
    return "no error"


def _errors(tmp: Path) -> dict[str, str]:
    """The one-line errors of bad sharding input, on every rank alike."""
    data = TensorBatches(_data(), 256)
    cfg = _cfg("tied", 2)
    return {
        "mesh": _error(lambda: Trainer(_sae("tied"), data, _cfg("tied", 3))),
        "width": _error(lambda: Trainer(_sae("tied", width=50), data, _cfg("tied", 4))),
        "arch": _error(lambda: Trainer(make_training_sae("gated", D_IN, WIDTH, 1.0), data, cfg)),
        "checkpoint": _error(
            lambda: Trainer(_sae("tied", width=64), data, cfg, run_dir=tmp / "paused_by_2").run(
                resume=True
            )
        ),
    }


def _worker(rank: int, world: int, tmp: str) -> None:
    out, tensors = Path(tmp), {}
    for shards in SHARDS:
        for case in CASES:
            state, history = _train(case, shards)
            tensors.update({f"{shards}/{case}/{k}": v for k, v in state.items()})
            tensors[f"{shards}/{case}/history"] = history
            step = _step(case, shards)
            tensors.update({f"{shards}/{case}/step/{k}": v for k, v in step.items()})
    _train("tied", 2, run_dir=out / "paused_by_2", stop_at=PAUSE)  # resumed by 1 process
    state, _ = _train("tied", 4, run_dir=out / "paused_by_1", resume=True)
    tensors.update({f"resumed_by_4/{k}": v for k, v in state.items()})
    sae = _sae("tied")
    train(sae, TensorBatches(_data(), 256, seed=1), _cfg("tied", 2), progress=False)
    errors = _errors(out)
    if distributed.is_main():
        save_sae(sae, out / "sae_by_2")
        save_file(tensors, out / "ranks.safetensors")
        (out / "errors.json").write_text(json.dumps(errors))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """1-process references, then the same runs on 4 gloo ranks, sharded 2 x 2 and 1 x 4."""
    tmp = tmp_path_factory.mktemp("shard")
    with one_thread():
        single = {case: (*_train(case, 1), _step(case, 1)) for case in CASES}
        _train("tied", 1, run_dir=tmp / "paused_by_1", stop_at=PAUSE)  # resumed by 4 ranks
        sae = _sae("tied")
        train(sae, TensorBatches(_data(), 256, seed=1), _cfg("tied", 1), progress=False)
        save_sae(sae, tmp / "sae_by_1")
    run_ranks(_worker, WORLD, str(tmp))
    return single, load_file(tmp / "ranks.safetensors"), tmp


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shards", SHARDS)
def test_sharded_training_gives_the_one_process_weights(case, shards, runs):
    single, got, _ = runs
    state, history, _ = single[case]
    for key, value in state.items():
        _close(got[f"{shards}/{case}/{key}"], value, key)
    # the logged loss terms, L0 and R^2 are over every shard and data rank
    torch.testing.assert_close(got[f"{shards}/{case}/history"], history, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shards", SHARDS)
def test_sharded_step_gives_the_one_process_latents_and_gradients(case, shards, runs):
    single, ranks, _ = runs
    step = single[case][2]
    assert step["feature_acts"].count_nonzero() > 0
    norm = torch.nn.utils.get_total_norm([v for k, v in step.items() if k.startswith("grad/")])
    assert norm > 0.01  # so the clip to 0.01 (over every shard's norm) really scales
    for key, value in step.items():
        _close(ranks[f"{shards}/{case}/step/{key}"], value, key)


def test_threshold_resets_and_clipping_happen(runs):
    """The runs compared above are not trivial: thresholds were reset and clipping bound."""
    single, _, _ = runs
    init = 1e-3 / 10.0  # threshold_init / threshold_lr_scale, the raw value after a reset
    for case, (state, _, _) in single.items():
        assert (state["raw_threshold_pos"] == init).any(), case


def test_checkpoints_reshard_onto_another_number_of_ranks(runs):
    single, ranks, tmp = runs
    straight = single["tied"][0]
    with one_thread():
        resumed, _ = _train("tied", 1, run_dir=tmp / "paused_by_2", resume=True)
    for key, value in straight.items():
        _close(resumed[key], value, f"2 shards -> 1 process: {key}")
        _close(ranks[f"resumed_by_4/{key}"], value, f"1 process -> 4 shards: {key}")


def test_a_sharded_run_saves_one_saelens_folder(runs):
    _, _, tmp = runs
    one, two = SAE.load_from_disk(tmp / "sae_by_1"), SAE.load_from_disk(tmp / "sae_by_2")
    assert two.cfg.d_sae == WIDTH and type(two) is type(one)
    x = _data()[:64]
    with torch.no_grad():
        _close(two.encode(x), one.encode(x), "encode")
        _close(two(x), one(x), "reconstruction")


def test_bad_sharding_input_gets_one_line_errors(runs):
    _, _, tmp = runs
    errors = json.loads((tmp / "errors.json").read_text())
    assert "latent_shards=3 does not divide the world of 4" in errors["mesh"]
    assert "d_sae=50 latents do not split into train.latent_shards=4" in errors["width"]
    assert "shards SA-GSAE only" in errors["arch"]
    assert "was written with another config" in errors["checkpoint"]
    assert "d_sae: 48 -> 64" in errors["checkpoint"]
    assert all("\n" not in e for e in errors.values())
    with pytest.raises(SignSAEError, match="does not divide the world of 1"):
        Mesh.of(2)


def test_sparse_decode_equals_the_dense_product():
    from sign_sae.sa_gsae import active_product

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(64, 512, generator=g) * (torch.rand(64, 512, generator=g) < 0.05)
    acts[3] = 0  # a row with nothing active
    W = torch.randn(512, 24, generator=g)
    a1, W1 = acts.clone().requires_grad_(), W.clone().requires_grad_()
    a2, W2 = acts.clone().requires_grad_(), W.clone().requires_grad_()
    grad = torch.randn(64, 24, generator=g)
    (active_product(a1, W1) * grad).sum().backward()
    ((a2 @ W2) * grad).sum().backward()
    _close(active_product(acts, W), acts @ W, "product")
    _close(W1.grad, W2.grad, "grad W_dec")
    # only active entries get a gradient: the decoder rows of inactive latents are untouched
    _close(a1.grad, a2.grad * (acts != 0), "grad acts")
    unused = (acts != 0).sum(0) == 0
    assert unused.any() and bool((W1.grad[unused] == 0).all())


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_sparse_decode_step_equals_the_dense_step(case):
    """One SA-GSAE step (losses, latents, every gradient) with the decoder products over the
    active latents only, against the dense reference ops and the fused step."""
    found = {}
    for fused, sparse in ((True, False), (False, False), (False, True)):
        sae = _sae(case)
        sae.fused, sae.sparse_decode = fused, sparse
        x = _data()[:256]
        out = sae.training_forward_pass(TrainStepInput(x, {"sparsity": SPARSITY}, None, 0, False))
        out.loss.backward()
        found[fused, sparse] = {
            "f": out.feature_acts.detach(),
            **{k: v.detach() for k, v in out.losses.items()},
            **{n: p.grad for n, p in sae.named_parameters()},
        }
    dense, reference, sparse = found.values()
    assert dense["f"].count_nonzero() > 0 and "auxiliary_reconstruction_loss" in dense
    for key, value in dense.items():
        _close(sparse[key], value, f"sparse vs fused: {key}")
        _close(sparse[key], reference[key], f"sparse vs reference: {key}")
