"""SA-GSAE attached to the real model with HookedSAETransformer."""

import torch

from sign_sae import SAGSAETrainingSAE, SAGSAETrainingSAEConfig
from sign_sae.models import hook_name, mid_layer


def test_add_sae_splices_and_error_term_restores_logits(model, eval_tokens, tmp_path):
    hook = hook_name("mlp_out", mid_layer(model))
    cfg = SAGSAETrainingSAEConfig(d_in=model.cfg.d_model, d_sae=256)
    cfg.metadata.hook_name = hook
    torch.manual_seed(0)
    SAGSAETrainingSAE(cfg).save_inference_model(tmp_path)
    from sae_lens import SAE

    sae = SAE.load_from_disk(tmp_path)
    tokens = eval_tokens[:2, :32]
    with torch.inference_mode():
        clean = model(tokens)
        spliced = model.run_with_saes(tokens, saes=[sae])
        model.add_sae(sae, use_error_term=True)
        try:
            exact, cache = model.run_with_cache(tokens)
        finally:
            model.reset_saes()
    assert not torch.allclose(spliced, clean, atol=1e-3)  # a random SAE changes the output
    torch.testing.assert_close(exact, clean, atol=1e-4, rtol=1e-4)
    acts = cache[f"{hook}.hook_sae_acts_post"]
    assert acts.shape == (*tokens.shape, 256)
    assert (acts < 0).any() and (acts > 0).any()  # signed latents through the hook
