import pytest
import sae_lens
import torch
from transformers import AutoModelForCausalLM

from sign_sae.models import (
    DEFAULT_MODEL,
    HOOK_KINDS,
    cache_root,
    hook_name,
    load_model,
    mid_layer,
    smollm2_dir,
    validate_hook,
)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SIGN_SAE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("SIGN_SAE_CACHE")
    assert cache_root().parts[-2:] == (".cache", "sign-sae")


def test_logits_match_hugging_face(model):
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32).eval()
    ids = model.tokenizer(
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
        return_tensors="pt",
    ).input_ids
    with torch.inference_mode():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_capital_of_france_is_paris(model):
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        next_id = model(ids)[0, -1].argmax().item()
    assert model.tokenizer.decode(next_id) == " Paris"


def test_default_model_records_its_name_and_shape(model):
    assert type(model).__name__ == "HookedSAETransformer"
    assert model.cfg.model_name == DEFAULT_MODEL
    assert (model.cfg.n_layers, model.cfg.d_model) == (30, 576)
    assert mid_layer(model) == 15
    assert "llama" not in str(smollm2_dir()).lower()


def test_cache_path_with_llama_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("SIGN_SAE_CACHE", str(tmp_path / "llama-models"))
    with pytest.raises(ValueError, match="SIGN_SAE_CACHE"):
        smollm2_dir()


def test_unknown_model_name_names_the_default():
    with pytest.raises(ValueError, match="Unknown model") as err:
        load_model("no-such-model")
    assert DEFAULT_MODEL in str(err.value) and "pythia-1b" in str(err.value)


def test_hub_names_go_to_transformer_lens(monkeypatch):
    calls = []

    class Fake(torch.nn.Module):
        cfg = type("Cfg", (), {})()

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return Fake()

    monkeypatch.setattr(sae_lens.HookedSAETransformer, "from_pretrained", fake_from_pretrained)
    loaded = load_model("pythia-1b", dtype=torch.bfloat16)
    assert calls == [("pythia-1b", {"device": "cpu", "dtype": torch.bfloat16})]
    assert loaded.cfg.model_name == "pythia-1b"


def test_hook_name_formats_kinds():
    assert hook_name("resid_mid", 15) == "blocks.15.hook_resid_mid"
    assert hook_name("mlp_out", 3) == "blocks.3.hook_mlp_out"
    assert hook_name("attn_out", 0) == "blocks.0.hook_attn_out"
    with pytest.raises(ValueError, match="resid_mid"):
        hook_name("resid", 1)


def test_validate_hook_accepts_every_kind(model):
    for kind in HOOK_KINDS:
        validate_hook(model, hook_name(kind, mid_layer(model)))


def test_validate_hook_lists_close_matches(model):
    with pytest.raises(ValueError) as err:
        validate_hook(model, "blocks.15.hook_resid_mdi")
    message = str(err.value)
    assert "blocks.15.hook_resid_mid" in message
    assert "blocks.15.hook_mlp_out" in message and "0..29" in message
