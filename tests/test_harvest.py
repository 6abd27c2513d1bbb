import json
import logging
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from sign_sae.errors import SignSAEError
from sign_sae.harvest import (
    BF16_FORWARD_RTOL,
    ActivationCache,
    InvalidCacheError,
    fingerprint,
    harvest,
)
from sign_sae.models import DEFAULT_MODEL, hook_name, mid_layer
from sign_sae.storage import sha256_file

LOW_HOOKS = ["blocks.1.hook_attn_out", "blocks.2.hook_resid_mid", "blocks.3.hook_mlp_out"]


@pytest.fixture(scope="module")
def hooks(model):
    """A shallow hook and the three kinds at the middle layer, as used for training."""
    return ["blocks.2.hook_attn_out"] + [
        hook_name(kind, mid_layer(model)) for kind in ("resid_mid", "mlp_out", "attn_out")
    ]


@pytest.fixture(scope="module")
def direct(model, eval_tokens, hooks):
    """Activations from a plain run_with_cache, BOS position dropped, as [token, d_model]."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            eval_tokens, names_filter=hooks, stop_at_layer=mid_layer(model) + 1
        )
    return {h: cache[h][:, 1:].reshape(-1, model.cfg.d_model).clone() for h in hooks}


@pytest.fixture(scope="module")
def harvested(model, eval_tokens, hooks, tmp_path_factory):
    """Small batches and shards so that batch and shard boundaries do not line up."""
    out = tmp_path_factory.mktemp("acts")
    return out, harvest(model, eval_tokens, hooks, out, batch_size=3, shard_tokens=100)


def direct_low(model, tokens, hook):
    """One LOW_HOOKS activation from a plain run_with_cache, BOS position dropped."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=4)
    return cache[hook][:, 1:].reshape(-1, model.cfg.d_model).clone()


def row_set(acts):
    """The rows of `acts` as a sorted list, for comparing orders (first four columns suffice)."""
    return sorted(map(tuple, acts[:, :4].tolist()))


@pytest.fixture
def forwards(model):
    """Counts forward passes (embedding calls) and calls of block 4, past LOW_HOOKS."""
    counts = Counter(model=0, block4=0)

    def count(key):
        return lambda *_: counts.update([key])

    handles = [
        model.embed.register_forward_hook(count("model")),
        model.blocks[4].register_forward_hook(count("block4")),
    ]
    yield counts
    for handle in handles:
        handle.remove()


def test_cached_activations_equal_run_with_cache(harvested, direct, hooks):
    _, caches = harvested
    assert list(caches) == hooks
    for hook in hooks:
        cache = caches[hook]
        assert (cache.n_tokens, cache.d_in, cache.dtype) == (8 * 63, 576, torch.float32)
        assert len(cache.shard_paths) == 6  # 5 x 100 + 4 rows
        torch.testing.assert_close(cache.load(), direct[hook], rtol=0, atol=1e-5)
        torch.testing.assert_close(
            ActivationCache.open(cache.path).load(), direct[hook], rtol=0, atol=1e-5
        )


def test_metadata_records_the_request(harvested, eval_tokens, hooks):
    out, _ = harvested
    meta = json.loads((out / hooks[1] / "metadata.json").read_text())
    assert meta["model_name"] == DEFAULT_MODEL and meta["hook"] == hooks[1]
    assert meta["tokens_sha256"] == fingerprint(eval_tokens)
    assert (meta["dtype"], meta["d_in"], meta["n_tokens"]) == ("float32", 576, 504)
    assert (meta["n_shards"], meta["context_size"], meta["exclude_bos"]) == (6, 64, True)
    assert list(meta)[-1] == "complete" and meta["complete"] is True


def test_all_hooks_come_from_one_forward_per_batch(model, eval_tokens, tmp_path, forwards):
    caches = harvest(model, eval_tokens, LOW_HOOKS, tmp_path, batch_size=4, exclude_bos=False)
    assert forwards == {"model": 2, "block4": 0}  # 8 rows / 4, stopped after block 3
    assert [c.n_tokens for c in caches.values()] == [8 * 64] * 3
    with torch.inference_mode():
        _, direct = model.run_with_cache(
            eval_tokens[:1], names_filter=LOW_HOOKS[:1], stop_at_layer=2
        )
    first_row = direct[LOW_HOOKS[0]][0]
    torch.testing.assert_close(caches[LOW_HOOKS[0]].load()[:64], first_row, rtol=0, atol=1e-5)


def test_reuse_does_not_run_the_model(model, eval_tokens, harvested, hooks, forwards, caplog):
    out, first = harvested
    with caplog.at_level(logging.INFO, logger="sign_sae.harvest"):
        again = harvest(model, eval_tokens, hooks, out, batch_size=3, shard_tokens=100)
    assert forwards["model"] == 0
    assert "Reusing activation cache" in caplog.text
    assert [c.path for c in again.values()] == [c.path for c in first.values()]


def test_other_tokens_or_dtype_rebuild(model, eval_tokens, tmp_path, forwards):
    hook = LOW_HOOKS[1]
    reference = direct_low(model, eval_tokens, hook)
    forwards.clear()
    harvest(model, eval_tokens, [hook], tmp_path)
    half = harvest(model, eval_tokens, [hook], tmp_path, dtype=torch.float16)[hook]
    assert forwards["model"] == 2 and half.dtype == torch.float16
    assert ActivationCache.open(half.path).dtype == torch.float16
    torch.testing.assert_close(half.load(), reference, rtol=1e-3, atol=1e-4)
    assert not torch.equal(half.load(), reference)  # really stored in half precision
    bf16 = harvest(model, eval_tokens, [hook], tmp_path, dtype=torch.bfloat16)[hook]
    torch.testing.assert_close(bf16.load(), reference, rtol=1e-2, atol=1e-3)
    harvest(model, eval_tokens[:4], [hook], tmp_path, dtype=torch.bfloat16)
    assert forwards["model"] == 4


def test_bf16_forward_is_within_its_stated_tolerance(
    model, harvested, hooks, eval_tokens, tmp_path
):
    """A bfloat16-autocast forward gives every hook within BF16_FORWARD_RTOL (relative Frobenius
    error) of the float32 harvest, and is recorded as such (a float32 request rebuilds it)."""
    fp32 = harvested[1]
    fast = harvest(model, eval_tokens, hooks, tmp_path, forward_dtype=torch.bfloat16)
    for hook in hooks:
        exact, approx = fp32[hook].load(), fast[hook].load()
        error = float((approx - exact).norm() / exact.norm())
        assert 0 < error < BF16_FORWARD_RTOL, (hook, error)
        assert fast[hook].metadata["forward_dtype"] == "bfloat16"
    rebuilt = harvest(model, eval_tokens, hooks[:1], tmp_path)[hooks[0]]
    assert torch.equal(rebuilt.load(), fp32[hooks[0]].load())
    with pytest.raises(SignSAEError, match="forward_dtype must be float32 or bfloat16"):
        harvest(model, eval_tokens, hooks, tmp_path, forward_dtype=torch.float16)


def test_truncated_shard_is_detected_and_rebuilt(
    model, eval_tokens, harvested, hooks, tmp_path, forwards
):
    out, caches = harvested
    hook = hooks[0]
    copy = tmp_path / "acts"
    shutil.copytree(out, copy)
    shard = copy / hook / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InvalidCacheError, match="shard_00002"):
        ActivationCache.open(copy / hook)
    rebuilt = harvest(model, eval_tokens, hooks, copy, batch_size=3, shard_tokens=100)
    assert forwards["model"] == 3  # only the broken hook is recomputed
    torch.testing.assert_close(rebuilt[hook].load(), caches[hook].load())


@pytest.mark.parametrize("damage", ["missing shard", "extra shard", "incomplete", "no metadata"])
def test_damaged_cache_is_refused(harvested, hooks, tmp_path, damage):
    out, _ = harvested
    folder = tmp_path / "acts"
    shutil.copytree(out / hooks[0], folder)
    meta_path = folder / "metadata.json"
    if damage == "missing shard":
        (folder / "shard_00005.safetensors").unlink()
    elif damage == "extra shard":
        shutil.copy(folder / "shard_00005.safetensors", folder / "shard_00006.safetensors")
    elif damage == "incomplete":
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "complete": False}))
    else:
        meta_path.unlink()
    with pytest.raises(InvalidCacheError, match="harvest"):
        ActivationCache.open(folder)


def test_nan_in_a_shard_is_reported_with_its_count(harvested, hooks, tmp_path):
    out, caches = harvested
    folder = tmp_path / "acts"
    shutil.copytree(out / hooks[0], folder)
    rows = caches[hooks[0]].load()[:100].clone()
    rows[3, 5] = float("nan")
    rows[7, :2] = float("inf")
    save_file({"acts": rows}, folder / "shard_00000.safetensors")
    meta = json.loads((folder / "metadata.json").read_text())  # as if harvested with NaN
    meta["shards"][0]["sha256"] = sha256_file(folder / "shard_00000.safetensors")
    (folder / "metadata.json").write_text(json.dumps(meta))
    cache = ActivationCache.open(folder)
    with pytest.raises(ValueError, match="3 non-finite values") as err:
        cache.load()
    assert "harvest again" in str(err.value)
    with pytest.raises(ValueError, match="non-finite"):
        next(cache.iter_batches(16, seed=0))


def test_iter_batches_is_one_shuffled_epoch(harvested, hooks):
    cache = harvested[1][hooks[1]]
    full = cache.load()
    batches = list(cache.iter_batches(100, seed=1, drop_last=False))
    assert [len(b) for b in batches] == [100] * 5 + [4]
    assert all(b.dtype == torch.float32 for b in batches)
    epoch = torch.cat(batches)
    assert not torch.equal(epoch, full)
    assert row_set(epoch) == row_set(full)
    again = torch.cat(list(cache.iter_batches(100, seed=1, drop_last=False)))
    assert torch.equal(again, epoch)
    assert not torch.equal(torch.cat(list(cache.iter_batches(100, seed=2, drop_last=False))), epoch)
    assert len(list(cache.iter_batches(100, seed=1))) == 5


def test_unknown_hook_lists_valid_hooks(model, eval_tokens, tmp_path, forwards):
    with pytest.raises(ValueError, match="blocks.2.hook_resid_mid"):
        harvest(model, eval_tokens, ["blocks.2.hook_resid_mdi"], tmp_path / "acts")
    assert forwards["model"] == 0 and not (tmp_path / "acts").exists()


def test_open_refuses_a_plain_folder(tmp_path):
    with pytest.raises(InvalidCacheError, match="not an activation cache"):
        ActivationCache.open(tmp_path)
