"""Harvest and stream throughput: ``sign_sae.harvest`` (to disk) and the training stream
(``sign_sae.stream``, in memory) vs SAELens's ``ActivationsStore``.

Same model, tokens, hooks and batch size. SAELens's store returns the activations in memory
(``get_raw_llm_batch``; ``get_multi_hook_activations`` for several hooks from one pass);
``harvest`` also writes them to safetensors shards on disk. Throughput counts the tokens that go
through the model. Runs are interleaved; every ``harvest`` run writes a fresh folder. The bf16
rows run the model under bfloat16 autocast (``forward_dtype``), which SAELens's store can do
too (``autocast_lm``); they are within ``BF16_FORWARD_RTOL`` of float32 (tests/test_harvest.py).
The stream rows read one epoch of 1024-row batches (the forward, the buffer's shuffle and the
batch cuts) and are compared with SAELens's store at equal precision (``autocast_lm``).

    python -m benchmarks.harvest                        # SmolLM2-135M, middle layer, 2048 tokens
    python -m benchmarks.harvest --tokens 32768 --batch 64 --rounds 5
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens.training.activations_store import ActivationsStore

from benchmarks.common import interleaved, machine, median, paired_ratio, set_threads
from sign_sae.corpus import load_texts, tokenize
from sign_sae.harvest import harvest
from sign_sae.markdown import markdown_table
from sign_sae.models import hook_name, load_model, mid_layer
from sign_sae.stream import ActivationStream


def saelens_store(
    model, tokens: torch.Tensor, hooks: list[str], batch: int, autocast_lm: bool = False
) -> ActivationsStore:
    """An ActivationsStore over the same pre-tokenised sequences (BOS already in them);
    ``autocast_lm`` runs the model under bfloat16 autocast."""
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    common = dict(
        dataset=dataset,
        streaming=False,
        context_size=tokens.shape[1],
        n_batches_in_buffer=2,
        total_training_tokens=tokens.numel(),
        store_batch_size_prompts=batch,
        train_batch_size_tokens=batch * tokens.shape[1],
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
        autocast_lm=autocast_lm,
    )
    d = model.cfg.d_model
    if len(hooks) == 1:
        return ActivationsStore(
            model=model, hook_name=hooks[0], hook_head_index=None, d_in=d, **common
        )
    return ActivationsStore.from_config_multi_hook(
        model, hook_names=hooks, hook_d_ins={h: d for h in hooks}, **common
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per run")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    print(machine())
    model = load_model()
    layer = mid_layer(model)
    tokens = tokenize(model, load_texts(split="train"), args.context, args.tokens)
    n_batches = -(-tokens.shape[0] // args.batch)
    one = [hook_name("mlp_out", layer)]
    three = [hook_name(k, layer) for k in ("resid_mid", "mlp_out", "attn_out")]
    root = Path(tempfile.mkdtemp(prefix="harvest-bench-"))
    runs = iter(range(10**9))

    def ours(hooks: list[str], forward_dtype: torch.dtype = torch.float32):
        def run() -> None:
            out = root / str(next(runs))
            harvest(
                model,
                tokens,
                hooks,
                out,
                batch_size=args.batch,
                model_name="bench",
                forward_dtype=forward_dtype,
            )
            shutil.rmtree(out)

        return run

    def theirs(hooks: list[str], autocast_lm: bool = False):
        store = saelens_store(model, tokens, hooks, args.batch, autocast_lm)

        def run() -> None:
            store.reset_input_dataset()
            store.iterable_sequences = store._iterate_tokenized_sequences()
            for _ in range(n_batches):
                if len(hooks) == 1:
                    store.get_raw_llm_batch()
                else:
                    store.get_multi_hook_activations(store.get_batch_tokens())

        return run

    def stream(hooks: list[str]):
        def run() -> None:
            s = ActivationStream(
                model,
                tokens,
                hooks,
                1024,
                buffer_tokens=tokens.numel(),
                forward_dtype=torch.bfloat16,
                forward_batch=args.batch,
            )
            for k in range(s.rows_per_epoch // 1024):
                s.batch(k)

        return run

    bf16 = torch.bfloat16
    candidates = {
        "SAELens ActivationsStore, 1 hook (memory)": theirs(one),
        "sign_sae harvest, 1 hook (disk)": ours(one),
        "sign_sae harvest, 1 hook, bf16 forward (disk)": ours(one, bf16),
        "SAELens ActivationsStore, 1 hook, autocast_lm (bf16, memory)": theirs(one, True),
        "SAELens multi-hook store, 3 hooks, 1 pass (memory)": theirs(three),
        "sign_sae harvest, 3 hooks, 1 pass (disk)": ours(three),
        "sign_sae harvest, 3 hooks, 1 pass, bf16 forward (disk)": ours(three, bf16),
        "SAELens multi-hook store, 3 hooks, autocast_lm (bf16, memory)": theirs(three, True),
        "sign_sae stream, 1 hook, bf16 forward (memory)": stream(one),
        "sign_sae stream, 3 hooks, 1 pass, bf16 forward (memory)": stream(three),
    }
    try:
        times = interleaved(candidates, args.rounds, torch.device("cpu"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_tokens = tokens.numel()
    names = list(candidates)
    rows = []
    for i, name in enumerate(names):
        # SAELens float32 with the same hooks; for the stream, SAELens bf16 (equal precision)
        base = times[names[i - i % 4] if i < 8 else names[3 + 4 * (i - 8)]]
        rows.append(
            [
                name,
                f"{median(times[name]):.2f}",
                f"{n_tokens / median(times[name]):,.0f}",
                f"{paired_ratio(base, times[name]):.2f}x",
            ]
        )
    print(
        f"model {model.cfg.model_name}, layer {layer} of {model.cfg.n_layers}, "
        f"{tokens.shape[0]} x {tokens.shape[1]} tokens, batch {args.batch} sequences, "
        f"{args.rounds} interleaved rounds"
    )
    print(
        markdown_table(
            ["harvest", "s (median)", "tokens/s", "speed vs SAELens (same hooks; stream: bf16)"],
            rows,
        )
    )
    print(machine())


if __name__ == "__main__":
    main()
