"""Data-parallel training on torch.distributed: 2 gloo processes give the 1-process weights."""

import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from sae_lens import HookedSAETransformer
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig

from sign_sae import distributed
from sign_sae.architectures import make_training_sae
from sign_sae.runs import Inputs, SweepConfig, run_sweep, train_runs, trained_runs
from sign_sae.runs.execute import training_stream
from sign_sae.trainer import TensorBatches, TrainConfig, train

D_IN, WIDTH, STEPS, PAUSE = 16, 48, 24, 11
# name -> (architecture, sparsity, SAE options, TrainConfig overrides)
RUNS = {
    # strong sparsity and a short reset window: SA-GSAE threshold resets fire from step ~17 on
    "sa_gsae": ("sa_gsae", 10.0, {"dead_reset_tokens": 512}, {}),
    # an odd global batch: shards of 128 and 127 rows
    "gated": ("gated", 0.5, {}, {"batch_size": 255}),
    # a short dead window: the TopK aux loss uses the (global) dead-latent mask
    "topk": ("topk", 4, {}, {"dead_window_tokens": 512}),
}


def _data() -> torch.Tensor:
    return torch.randn(2048, D_IN, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


def _train(name: str, **kw) -> tuple[dict[str, torch.Tensor], list[dict], list[int]]:
    """(final state, loss history, threshold resets per step) of one small run."""
    arch, sparsity, options, overrides = RUNS[name]
    torch.manual_seed(0)
    sae = make_training_sae(arch, D_IN, WIDTH, sparsity, warm_up_steps=4, **options)
    resets: list[int] = []
    if hasattr(sae, "constrain"):
        inner = sae.constrain

        def counted(tokens_since_fired: torch.Tensor) -> torch.Tensor:
            reset = inner(tokens_since_fired)
            resets.append(int(reset.sum()))
            return reset

        sae.constrain = counted
    base = dict(total_steps=STEPS, batch_size=256, lr=1e-2, lr_warm_up_steps=4, lr_decay_steps=8)
    cfg = TrainConfig(**{**base, "log_every": 8, "checkpoint_every": 5, **overrides})
    res = train(sae, TensorBatches(_data(), cfg.batch_size, seed=1), cfg, progress=False, **kw)
    return sae.state_dict(), res.history, resets


class _Tiny(Inputs):
    """A random 2-layer model and random token rows."""

    def model(self, name: str) -> HookedSAETransformer:
        torch.manual_seed(0)
        return HookedSAETransformer(
            HookedTransformerConfig(
                n_layers=2, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_mlp=32, d_vocab=50,
                act_fn="gelu", model_name=name,
            )
        )  # fmt: skip

    def tokens(self, model: HookedSAETransformer, split: str) -> torch.Tensor:
        n = self.data.train_tokens if split == "train" else self.data.eval_tokens
        g = torch.Generator().manual_seed(1 if split == "train" else 2)
        return torch.randint(1, 50, (n // 16, 16), generator=g)


def _tiny_sweep(out: Path) -> SweepConfig:
    """Three runs from one stream: 4 chunks of 16 sequences (2 per rank under 2 ranks)."""
    return SweepConfig(
        out_dir=str(out),
        data={
            "models": ["tiny"],
            "hooks": ["mlp_out"],
            "context_size": 16,
            "train_tokens": 16 * 64,
            "eval_tokens": 16 * 8,
            "ce_tokens": 16 * 4,
            "buffer_tokens": 240,
            "epochs": 2,
        },
        train={"total_steps": 10, "batch_size": 128},
        grid=[
            {"label": "sa", "arch": "sa_gsae", "sparsity": [1.0, 3.0]},
            {"label": "gated", "arch": "gated", "sparsity": [1.0]},
        ],
    )


def _sweep(out: Path) -> list[dict]:
    """The tiny sweep, data-parallel: each rank streams its own share of the text."""
    cfg = _tiny_sweep(out)
    return run_sweep(cfg, inputs=_Tiny(cfg.data), progress=False)


def _train_runs(out: Path) -> list[int]:
    """``sign-sae train`` of the tiny sweep; returns the training sequences this rank streams."""
    cfg = _tiny_sweep(out)
    inputs = _Tiny(cfg.data)
    every = train_runs(cfg, inputs, progress=False)
    model = inputs.model("tiny")
    stream = training_stream(cfg, "tiny", model, inputs.tokens(model, "train"), every)
    return sorted(int(i) for c in stream.mine for i in stream.chunks[c])


def _train_sharded(out: Path, shards: int) -> None:
    """``sign-sae train`` of the tiny sweep's SA-GSAEs with their latents over ``shards`` ranks
    (every rank streams the same rows: one data rank)."""
    cfg = _tiny_sweep(out)
    cfg.grid = [g for g in cfg.grid if g.arch == "sa_gsae"]
    cfg.train.latent_shards = shards
    train_runs(cfg, _Tiny(cfg.data), progress=False)


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread inside the block, as each gloo rank (and torchrun) runs: the
    1-process references then round the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_ranks(fn: Callable[..., None], world: int, *args: Any) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo processes, each joined to the group from
    the variables torchrun would export (``fn`` at module level, so that spawn finds it)."""
    mp.spawn(_rank, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _rank(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    with distributed.session():
        assert distributed.get_world() == world and distributed.get_rank() == rank
        fn(rank, world, *args)


def _worker(rank: int, world: int, tmp: str) -> None:
    """One rank of the data-parallel runs."""
    out = Path(tmp)
    tensors = {}
    for name in RUNS:
        state, history, resets = _train(name)
        tensors.update({f"{name}/{k}": v for k, v in state.items()})
        tensors[f"{name}/resets"] = torch.tensor(resets)
        tensors[f"{name}/history"] = torch.tensor([list(r.values()) for r in history])
    _train("sa_gsae", run_dir=out / "paused_by_2", stop_at=PAUSE)  # resumed by 1 process
    state, _, _ = _train("sa_gsae", run_dir=out / "paused_by_1", resume=True)
    tensors.update({f"resumed_by_2/{k}": v for k, v in state.items()})
    mine = [(i, distributed.get_rank()) for i in range(distributed.get_rank(), 7, world)]
    table = distributed.gather_rows(mine, key=lambda row: row[0])
    tensors["table"] = torch.tensor(table)
    rows = _sweep(out / "sweep_by_2")
    (out / f"sweep_rows_{rank}.json").write_text(json.dumps(rows))
    _train_sharded(out / "sharded_by_2", shards=2)
    seen = _train_runs(out / "train_by_2")
    (out / f"sequences_{rank}.json").write_text(json.dumps(seen))
    if distributed.is_main():
        save_file(tensors, out / "ranks.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """1-process references, then the same runs on 2 gloo ranks (one spawn for all of them)."""
    tmp = tmp_path_factory.mktemp("dist")
    with one_thread():
        single = {name: _train(name) for name in RUNS}
        _train("sa_gsae", run_dir=tmp / "paused_by_1", stop_at=PAUSE)  # resumed by 2 ranks
        _sweep(tmp / "sweep_by_1")
        _train_runs(tmp / "train_by_1")
        _train_sharded(tmp / "sharded_by_1", shards=1)
    run_ranks(_worker, 2, str(tmp))
    return single, load_file(tmp / "ranks.safetensors"), tmp


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_give_the_one_process_weights(name, runs):
    single, ranks, _ = runs
    state, history, resets = single[name]
    for key, value in state.items():
        torch.testing.assert_close(ranks[f"{name}/{key}"], value, atol=1e-5, rtol=1e-5, msg=key)
    # the logged rows are over the global batch too
    expected = torch.tensor([list(r.values()) for r in history])
    torch.testing.assert_close(ranks[f"{name}/history"].float(), expected, atol=1e-4, rtol=1e-4)
    assert ranks[f"{name}/resets"].tolist() == resets
    if name == "sa_gsae":
        assert sum(resets) > 0  # dead-latent threshold resets really happened, identically


def test_checkpoints_resume_with_another_number_of_ranks(runs):
    single, ranks, tmp = runs
    straight = single["sa_gsae"][0]
    with one_thread():
        resumed, _, _ = _train("sa_gsae", run_dir=tmp / "paused_by_2", resume=True)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=1e-5, msg=key)
        torch.testing.assert_close(ranks[f"resumed_by_2/{key}"], value, atol=1e-5, rtol=1e-5)


# Two ranks stream disjoint halves of the text, so a global batch holds other rows than one
# process's (the same distribution): the trained SAEs agree in their held-out metrics to these
# tolerances, not weight for weight.
R2_TOLERANCE, L0_TOLERANCE = 0.01, 0.25  # absolute R^2 (5e-4 measured); L0 relative


def test_two_rank_sweep_matches_the_one_rank_table(runs):
    _, _, tmp = runs
    timing = {"train_s", "eval_s", "wall_s", "finished"}

    def table(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if k not in timing} for r in json.loads(path.read_text())
        ]

    one, two = (
        table(tmp / "sweep_by_1" / "results.json"),
        table(tmp / "sweep_by_2" / "results.json"),
    )
    assert len(one) == 3 and [r["config_hash"] for r in two] == [r["config_hash"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        assert abs(a["r2"] - b["r2"]) < R2_TOLERANCE
        assert b["l0"] == pytest.approx(a["l0"], rel=L0_TOLERANCE)
        assert b["r2"] != a["r2"]  # other rows: not the same run
        for key, value in a.items():
            if not isinstance(value, float):
                assert b[key] == value, key
    # every rank returns the whole table
    for rank in range(2):
        rows = json.loads((tmp / f"sweep_rows_{rank}.json").read_text())
        assert [r["config_hash"] for r in rows] == [r["config_hash"] for r in one]


def test_two_ranks_train_every_run_of_a_sweep_file_from_disjoint_shares(runs):
    _, _, tmp = runs
    one, two = trained_runs(tmp / "train_by_1"), trained_runs(tmp / "train_by_2")
    assert list(one) == list(two) == ["sa_sp1_seed0", "sa_sp3_seed0", "gated_sp1_seed0"]
    for name, record in one.items():
        assert two[name]["folder"] == record["folder"]  # the same config hash
        a = load_file(tmp / "train_by_1" / record["folder"] / "sae" / "sae_weights.safetensors")
        b = load_file(tmp / "train_by_2" / record["folder"] / "sae" / "sae_weights.safetensors")
        assert a.keys() == b.keys() and not torch.equal(a["W_dec"], b["W_dec"])
        assert not (tmp / "train_by_2" / record["folder"] / "checkpoint").exists()
        info = json.loads((tmp / "train_by_2" / record["folder"] / "train.json").read_text())
        assert info["stream"]["world"] == 2
    # each rank streamed its own half of the 64 training sequences, and no rank held the other's
    halves = [set(json.loads((tmp / f"sequences_{r}.json").read_text())) for r in range(2)]
    assert not halves[0] & halves[1] and len(halves[0]) == len(halves[1]) == 32


def test_sign_sae_train_with_latents_on_two_ranks_gives_the_one_process_weights(runs):
    _, _, tmp = runs
    one, two = trained_runs(tmp / "sharded_by_1"), trained_runs(tmp / "sharded_by_2")
    assert list(one) == list(two) == ["sa_sp1_seed0", "sa_sp3_seed0"]
    for name, record in one.items():
        a = load_file(tmp / "sharded_by_1" / record["folder"] / "sae" / "sae_weights.safetensors")
        b = load_file(
            tmp / "sharded_by_2" / two[name]["folder"] / "sae" / "sae_weights.safetensors"
        )
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, atol=1e-5, rtol=1e-5, msg=f"{name} {key}")


def test_gather_rows(runs):
    _, ranks, _ = runs
    assert ranks["table"].tolist() == [[i, i % 2] for i in range(7)]
    # one process: identities
    assert distributed.gather_rows([3, 1, 2], key=lambda r: r) == [1, 2, 3]
    assert distributed.get_world() == 1 and distributed.is_main()


def test_batches_are_split_by_rows():
    data = torch.arange(40.0).reshape(20, 2)
    whole = TensorBatches(data, 5, seed=3)
    parts = [whole.shard(r, 2) for r in range(2)]
    for step in range(6):
        full = whole.batch(step)
        torch.testing.assert_close(parts[0].batch(step), full[0::2])
        torch.testing.assert_close(parts[1].batch(step), full[1::2])
    with pytest.raises(ValueError, match="rank < world"):
        TensorBatches(data, 5, rank=2, world=2)
