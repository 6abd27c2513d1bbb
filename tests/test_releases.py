"""Pretrained SAEs through SAELens's registry, both ways, offline: local releases of SAELens-native
Gated / JumpReLU SAEs and of SA-GSAEs load with ``SAE.from_pretrained``; runs export to release
folders; SA-GSAEs export exactly as doubled JumpReLU SAEs and come back through to_signed_init."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sign_sae
from sign_sae import SAGSAE, SAGSAEConfig, releases
from sign_sae.export import (
    export,
    export_run,
    signed_from_doubled,
    to_doubled_jumprelu,
    to_signed_init,
)
from sign_sae.harvest import ActivationCache
from sign_sae.metrics import LatentStats
from sign_sae.runs import Inputs, SweepConfig, activations_dir, run_sweep, trained_runs

D_IN, D_SAE = 8, 12
HOOK = "blocks.0.hook_mlp_out"
META = {"model_name": "tiny-model", "hook_name": HOOK, "context_size": 16, "prepend_bos": True}
SIGNED_VARIANTS = [
    dict(tied=True, two_sided=True),
    dict(tied=False, two_sided=True),
    dict(tied=True, two_sided=False),
    dict(tied=False, two_sided=True, apply_b_dec_to_input=False),
]


@torch.no_grad()
def randomize(sae: SAE, seed: int) -> SAE:
    """Random parameters that make latents fire (both signs for SA-GSAE)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if name.startswith("W_"):
            p.mul_(1 / 0.3 * (1 + torch.rand(p.shape[0], 1, generator=g)))
        if "threshold" in name:
            p.abs_()
        if name == "scale_neg":
            p.exp_()
    return sae


def native(arch: str, seed: int = 0) -> SAE:
    cls, cfg_cls = {
        "gated": (GatedSAE, GatedSAEConfig),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    }[arch]
    return randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**META))), seed)


def signed(seed: int = 0, **kwargs) -> SAGSAE:
    cfg = SAGSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(**META), **kwargs)
    return randomize(SAGSAE(cfg), seed)


def batch(seed: int = 1, n: int = 512) -> torch.Tensor:
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def register():
    """register_release / register_releases that unregister what they added after the test."""
    added: list[str] = []

    def add(*args, yaml_file=None, **kwargs) -> list[str]:
        if yaml_file is not None:
            names = releases.register_releases(yaml_file, **kwargs)
        else:
            names = [releases.register_release(*args, **kwargs).release]
        added.extend(names)
        return names

    yield add
    for name in added:
        releases.unregister_release(name)


@pytest.fixture
def local_release(tmp_path):
    """A release folder with a native Gated, a native JumpReLU and an SA-GSAE."""
    saes = {"gated": native("gated"), "jumprelu": native("jumprelu", 1), "signed": signed(2)}
    for sae_id, sae in saes.items():
        sae.save_model(tmp_path / "release" / sae_id)
    return tmp_path / "release", saes


# ---- loading through SAELens ------------------------------------------------------------------
def test_native_and_signed_saes_load_through_from_pretrained_and_analyse(local_release, register):
    folder, saved = local_release
    register("test-local", folder)
    x = batch()
    for sae_id, original in saved.items():
        sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("test-local", sae_id)
        assert type(sae) is type(original) and sparsity is None
        assert type(SAE.from_pretrained("test-local", sae_id)) is type(original)
        for name, value in original.state_dict().items():
            assert torch.equal(sae.state_dict()[name], value), name
        assert cfg["metadata"]["context_size"] == 16 and cfg["normalize_activations"] == "none"
        assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.metadata.model_name == "tiny-model"
        with torch.no_grad():
            f = sae.encode(x)
        stats = LatentStats(D_SAE)
        stats.update(f)
        assert stats.l0 == pytest.approx((f != 0).sum(-1).float().mean().item())
        assert stats.l0 > 0
        assert (stats.n_neg.sum() > 0) == (sae_id == "signed")
    lookup = releases.registered_releases()["test-local"]
    assert lookup.model == "tiny-model" and set(lookup.saes_map) == set(saved)


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_pretrained_non_negative_saes_feed_to_signed_init(local_release, register, arch):
    register("test-local", local_release[0])
    sae = SAE.from_pretrained("test-local", arch)
    init = to_signed_init(sae, [(0, 1), (2, 3)])
    assert init.cfg.d_sae == D_SAE - 2 and init.cfg.metadata.hook_name == HOOK


def test_registry_survives_a_cleared_directory_cache(local_release, register):
    """SAELens rebuilds its directory from its own YAML after a cache clear; sign-sae's explicit
    calls (``load_pretrained``, ``find_release``) put the registered releases back."""
    register("test-local", local_release[0])
    get_pretrained_saes_directory.cache_clear()
    assert "test-local" not in get_pretrained_saes_directory()  # SAELens's own behaviour
    assert type(sign_sae.load_pretrained("test-local", "signed")) is SAGSAE
    assert "test-local" in get_pretrained_saes_directory()
    assert type(SAE.from_pretrained("test-local", "signed")) is SAGSAE


# ---- export -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) run: random 1-layer model, harvested activations, two trained SAEs, results."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_IN, n_ctx=16, d_head=4, n_heads=2, d_mlp=16, d_vocab=40, act_fn="gelu"
    )
    model = HookedTransformer(cfg)
    out = tmp_path_factory.mktemp("run")
    run = SweepConfig(
        out_dir=str(out),
        data={
            "models": ["tiny-model"],
            "hooks": [HOOK],
            "context_size": 16,
            "train_tokens": 16 * 16,
            "eval_tokens": 4 * 16,
            "ce_tokens": 4 * 16,
        },
        train={"total_steps": 4, "batch_size": 32, "log_every": 2},
        grid=[
            {"label": "sa", "arch": "sa_gsae", "width": D_SAE / D_IN, "sparsity": [0.1]},
            {"label": "gated", "arch": "gated", "width": 2, "sparsity": [1.0]},
        ],
    )

    class Tiny(Inputs):
        def tokens(self, model, split):
            n = 16 if split == "train" else 4
            return torch.randint(0, 40, (n, 16), generator=torch.Generator().manual_seed(n))

    run_sweep(run, inputs=Tiny(run.data, {"tiny-model": model}), progress=False)
    return out


def test_export_run_writes_a_release_that_loads_back(run_dir, tmp_path, register):
    path = export_run(run_dir, tmp_path / "out", "tiny-run")
    assert path == tmp_path / "out" / "release.yaml" and (tmp_path / "out" / "README.md").is_file()
    entry = yaml.safe_load(path.read_text())["tiny-run"]
    ids = [s["id"] for s in entry["saes"]]
    assert ids == [f"{HOOK}/sa", f"{HOOK}/gated"] and entry["model"] == "tiny-model"
    results = {r["label"]: r for r in json.loads((run_dir / "results.json").read_text())}
    assert entry["saes"][0]["l0"] == pytest.approx(results["sa"]["l0"], abs=1e-4)
    for sae_id in ids:
        assert {p.name for p in (tmp_path / "out" / sae_id).iterdir()} == {
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
            "sha256.json",  # their hashes, checked on load
        }
    register(yaml_file=path)
    sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity("tiny-run", f"{HOOK}/sa")
    trained = SAE.load_from_disk(run_dir / trained_runs(run_dir)["sa"]["folder"] / "sae")
    assert trained.cfg.d_sae == D_SAE
    assert type(sae) is SAGSAE and torch.equal(sae.W_enc, trained.W_enc)
    assert cfg["metadata"]["context_size"] == 16 and cfg["metadata"]["model_name"] == "tiny-model"
    acts = ActivationCache.open(activations_dir(run_dir, "tiny-model", "validation") / HOOK).load()
    with torch.no_grad():
        fired = (trained.encode(acts) != 0).double().mean(0)
    assert torch.allclose(sparsity, torch.log10(fired + 1e-10).float())
    assert type(SAE.from_pretrained("tiny-run", f"{HOOK}/gated")).__name__ == "GatedSAE"


def test_export_with_chosen_ids_half_precision_and_activations_by_hook(run_dir, tmp_path):
    """What the shipped release uses: ids by run name, fp16 weights that load as the SAE's
    dtype, and firing frequencies from a mapping of hook to activations."""
    acts = ActivationCache.open(activations_dir(run_dir, "tiny-model", "validation") / HOOK)
    ids = {"sa": HOOK, "gated": f"{HOOK}/gated_2H"}
    path = export(run_dir, tmp_path / "out", "half", {HOOK: acts}, ids=ids, weights_dtype="float16")
    entry = yaml.safe_load(path.read_text())["half"]
    assert [s["id"] for s in entry["saes"]] == [HOOK, f"{HOOK}/gated_2H"]
    stored = load_file(tmp_path / "out" / HOOK / "sae_weights.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.values())
    back = SAE.load_from_disk(tmp_path / "out" / HOOK)
    trained = SAE.load_from_disk(run_dir / trained_runs(run_dir)["sa"]["folder"] / "sae")
    assert back.W_enc.dtype == torch.float32
    assert torch.equal(back.W_enc, trained.W_enc.half().float())
    assert (tmp_path / "out" / HOOK / "sparsity.safetensors").is_file()
    with pytest.raises(ValueError, match="No activations given for hook"):
        export(run_dir, tmp_path / "out2", "x", {"blocks.9.hook_mlp_out": acts})


def test_export_run_doubled_and_without_usable_activations(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    held_out = activations_dir(tmp_path / "run", "tiny-model", "validation")
    (held_out / HOOK / "metadata.json").unlink()  # an interrupted harvest
    path = export_run(tmp_path / "run", tmp_path / "out", "tiny-doubled", doubled=True)
    entry = yaml.safe_load(path.read_text())["tiny-doubled"]
    assert "no activations were given" in path.read_text() and "conversion_func" not in entry
    assert not list((tmp_path / "out").rglob("sparsity.safetensors"))
    doubled = SAE.load_from_disk(tmp_path / "out" / HOOK / "sa")
    assert type(doubled) is JumpReLUSAE and doubled.cfg.d_sae == 2 * D_SAE
    assert type(SAE.load_from_disk(tmp_path / "out" / HOOK / "gated")).__name__ == "GatedSAE"


def test_export_without_activations_omits_sparsity_with_a_note(tmp_path, register):
    signed(3).save_model(tmp_path / "sae")
    path = export(tmp_path / "sae", tmp_path / "my-release")
    assert not (tmp_path / "my-release" / HOOK / "sparsity.safetensors").exists()
    assert "no activations were given" in path.read_text()
    assert "no activations were given" in (tmp_path / "my-release" / "README.md").read_text()
    register(yaml_file=path)
    assert type(SAE.from_pretrained("my-release", HOOK)) is SAGSAE
    register("one-sae", tmp_path / "sae")  # a single SAE folder: its hook is its id
    assert type(SAE.from_pretrained("one-sae", HOOK)) is SAGSAE


@pytest.mark.parametrize("variant", SIGNED_VARIANTS, ids=str)
def test_doubled_export_reconstructs_identically_and_loads_as_jumprelu(tmp_path, variant):
    sae = signed(4, **variant)
    sae.save_model(tmp_path / "sae")
    x = batch(5)
    path = export(tmp_path / "sae", tmp_path / "doubled", activations=x, doubled=True)
    assert "conversion_func" not in yaml.safe_load(path.read_text())["doubled"]  # SAELens-native
    doubled = SAE.load_from_disk(tmp_path / "doubled" / HOOK)
    assert type(doubled) is JumpReLUSAE and doubled.cfg.metadata.doubled_from == "sa_gsae"
    width = 2 * D_SAE if sae.cfg.two_sided else D_SAE
    assert doubled.cfg.d_sae == width and doubled.cfg.metadata.context_size == 16
    with torch.no_grad():
        f, f2 = sae.encode(x), doubled.encode(x)
        assert (f2 >= 0).all() and (f < 0).any() == sae.cfg.two_sided
        assert torch.allclose(doubled.decode(f2), sae.decode(f), atol=1e-5)
        assert torch.allclose(doubled(x), sae(x), atol=1e-5)
        back = signed_from_doubled(f2) if sae.cfg.two_sided else f2
        assert torch.allclose(back, f, atol=1e-5)
    sparsity = load_file(tmp_path / "doubled" / HOOK / "sparsity.safetensors")["sparsity"]
    assert torch.allclose(sparsity, torch.log10((f2 != 0).double().mean(0) + 1e-10).float())


def test_doubled_export_comes_back_exactly_through_to_signed_init(tmp_path, register):
    sae = signed(6)
    to_doubled_jumprelu(sae).save_model(tmp_path / "doubled" / HOOK)
    register("test-doubled", tmp_path / "doubled")
    doubled = SAE.from_pretrained("test-doubled", HOOK)
    assert type(doubled) is JumpReLUSAE
    back = to_signed_init(doubled, [(i, D_SAE + i) for i in range(D_SAE)])
    x = batch(7)
    with torch.no_grad():
        assert torch.allclose(back.decode(back.encode(x)), sae.decode(sae.encode(x)), atol=1e-5)


@pytest.mark.parametrize("variant", [dict(tied=True), dict(tied=True, two_sided=False)], ids=str)
def test_signed_to_doubled_to_signed_is_the_same_function(variant):
    sae = signed(9, **variant)
    doubled = to_doubled_jumprelu(sae)
    pairs = [(i, D_SAE + i) for i in range(D_SAE)] if sae.cfg.two_sided else []
    back = to_signed_init(doubled, pairs)
    assert back.cfg.d_sae == D_SAE
    x = batch(10)
    with torch.no_grad():
        f, f_back = sae.encode(x), back.encode(x)
        assert (f < 0).any() == sae.cfg.two_sided and (f != 0).any()
        # the same latents up to each decoder row's norm (to_signed_init makes rows unit-norm)
        assert torch.allclose(f_back, f * sae.W_dec.norm(dim=1), atol=1e-5)
        assert torch.allclose(back.decode(f_back), sae.decode(f), atol=1e-5)


def test_doubling_refuses_negative_thresholds_and_other_saes():
    sae = signed(8)
    with torch.no_grad():
        sae.threshold_neg[0] = -0.1
    with pytest.raises(ValueError, match="negative thresholds"):
        to_doubled_jumprelu(sae)
    with pytest.raises(TypeError, match="SAGSAE"):
        to_doubled_jumprelu(native("gated"))


# ---- errors -----------------------------------------------------------------------------------
def test_unknown_release_and_sae_id_list_close_matches(local_release, register):
    register("test-local", local_release[0])
    with pytest.raises(
        ValueError, match=r"Unknown SAE release 'test-locl'\. Did you mean 'test-local'"
    ):
        sign_sae.load_pretrained("test-locl", "signed")
    with pytest.raises(ValueError, match=r"Unknown SAE id 'signd'.*Did you mean 'signed'"):
        sign_sae.load_pretrained("test-local", "signd")
    with pytest.raises(ValueError, match="Did you mean 'gemma-scope-2b-pt-res'"):
        sign_sae.load_pretrained("gemma-scope-2b-pt-re", "layer_3/width_16k/average_l0_14")
    assert type(sign_sae.load_pretrained("test-local", "signed")) is sign_sae.SAGSAE


def test_unregistered_architecture_is_a_clear_error(local_release, register):
    folder = local_release[0]
    cfg = json.loads((folder / "gated" / "cfg.json").read_text())
    (folder / "mystery").mkdir()
    (folder / "mystery" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "mystery"}))
    (folder / "mystery" / "sae_weights.safetensors").write_bytes(
        (folder / "gated" / "sae_weights.safetensors").read_bytes()
    )
    register("test-local", folder)
    with pytest.raises(ValueError, match="architecture 'mystery', which is not registered"):
        SAE.from_pretrained("test-local", "mystery")


def test_folders_that_are_not_saes_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SAE folders"):
        releases.register_release("test-bad", tmp_path / "empty")
    (tmp_path / "empty" / "x").mkdir()
    (tmp_path / "empty" / "x" / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"not an SAE folder.*pickle"):
        releases.register_release("test-bad", tmp_path / "empty", {"a": "x"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        releases.register_release("test-bad", tmp_path / "missing")
    with pytest.raises(ValueError, match="is neither a local folder"):
        releases.register_release("test-bad", "not a repo", ["a"], model="m")
    with pytest.raises(FileNotFoundError, match="neither an SAE folder"):
        export(tmp_path / "empty", tmp_path / "out")
    assert "test-bad" not in releases.registered_releases()


def test_registration_conflicts_and_idempotence(local_release, register):
    folder = local_release[0]
    register("test-local", folder)
    register("test-local", folder)  # same contents: no-op
    with pytest.raises(ValueError, match="replace=True"):
        releases.register_release("test-local", folder, ["signed"])
    assert list(register("test-local", folder, ["signed"], replace=True)) == ["test-local"]
    assert list(releases.registered_releases()["test-local"].saes_map) == ["signed"]
    with pytest.raises(ValueError, match="taken by SAELens's own directory"):
        releases.register_release("gemma-scope-2b-pt-res", folder)
    assert get_pretrained_saes_directory()["gemma-scope-2b-pt-res"].repo_id != str(folder)
    hub = releases.register_release("test-hub", "someone/sign-sae-saes", ["a"], model="m")
    releases.unregister_release("test-hub")
    assert hub.repo_id == "someone/sign-sae-saes" and hub.conversion_func == "sign_sae"


def test_shipped_list_is_valid_and_install_is_idempotent():
    from importlib.resources import files

    data = yaml.safe_load(files("sign_sae").joinpath("releases.yaml").read_text())
    assert isinstance(data, dict) and set(data) <= set(releases.registered_releases())
    releases.install()
    sign_sae.register()
    assert list(releases.registered_releases()) == list(
        dict.fromkeys(releases.registered_releases())
    )


def test_importing_sign_sae_leaves_saelens_loaders_unchanged():
    """A fresh interpreter: SAELens's own entry points are the same objects before and after
    ``import sign_sae``; only the registries gain entries."""
    code = (
        "from sae_lens import SAE\n"
        "before = {n: SAE.__dict__[n] for n in ('from_pretrained', "
        "'from_pretrained_with_cfg_and_sparsity', 'load_from_disk')}\n"
        "from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS as L\n"
        "loaders = dict(L)\n"
        "import sign_sae\n"
        "assert all(SAE.__dict__[n] is f for n, f in before.items()), 'SAE methods replaced'\n"
        "assert all(L[k] is v for k, v in loaders.items()), 'a SAELens loader replaced'\n"
        "assert set(L) - set(loaders) == {'sign_sae'}\n"
        "print('unchanged')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "unchanged"
