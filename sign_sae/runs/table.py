"""The results table of a sweep folder: one row per evaluated run and held-out split, written
atomically as JSON and CSV; the names runs are shown by; the trained runs of a folder.

    OUT/results.json, OUT/results.csv             one row per evaluated run, rewritten atomically

A run whose training failed has a row too, with its identity, ``failed`` (the reason) and
``steps`` (where it stopped) and no metrics, until a rerun trains it and its evaluated row
replaces it. Readers of the table (``ResultsTable.rows``, ``read_results``) see the evaluated
rows; ``ResultsTable.failed`` the others.

Processes that share OUT take turns under the table's lock file, and each ``add`` merges its row
into the rows on disk, so no row is lost.
"""

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sign_sae import distributed
from sign_sae.markdown import markdown_table
from sign_sae.metrics import SequenceStats
from sign_sae.runs.config import SWEEP_FILE, load_sweep, plan
from sign_sae.runs.spec import TRAIN_FILE, Row, Run, read_train_info
from sign_sae.storage import atomic_write_text, locked, read_table, read_weights

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
# The first columns of the table, in this order; any others follow in order of appearance.
COLUMNS = [
    "config_hash", "split", "model", "hook", "hook_kind", "label", "name", "arch", "ablation_of",
    "width_factor", "d_in", "d_sae", "sparsity", "seed", "options", "train", "n_params",
    "n_params_train", "r2", "mse", "l0", "dead_fraction", "bipolar_fraction", "ce_clean",
    "ce_with_sae", "ce_zero_ablation", "ce_loss_recovered", "kl_with_sae", "n_tokens",
    "ce_tokens", "steps", "train_s", "eval_s", "wall_s", "failed",
]  # fmt: skip
# The columns of the printed summary (and of a run report's table), with their formats.
SUMMARY = [
    ("name", "{}"),
    ("architecture", "{}"),
    ("d_sae", "{}"),
    ("n_params", "{:,}"),
    ("r2", "{:.3f}"),
    ("l0", "{:.1f}"),
    ("dead_fraction", "{:.3f}"),
    ("bipolar_fraction", "{:.2f}"),
    ("ce_loss_recovered", "{:.3f}"),
    ("kl_with_sae", "{:.3f}"),
    ("train_s", "{:.0f}"),
]
# SAE metadata that only records versions, left out of the run hash with TrainConfig's
# BOOKKEEPING fields.


# ---- trained runs of a folder -------------------------------------------------------------
def trained_runs(out_dir: str | Path) -> dict[str, Row]:
    """Every trained run under ``out_dir`` in the plan's order, by its ``short_names`` name; the
    value is its identity record (``Run.record``: name, model, hook, folder, config_hash, ...)."""
    out = Path(out_dir)
    records = [read_train_info(p)["run"] for p in sorted(out.glob(f"runs/*/*/*/{TRAIN_FILE}"))]
    if (out / SWEEP_FILE).is_file():
        rank = {(p.model.name, p.hook, p.name): i for i, p in enumerate(plan(load_sweep(out)))}
        records.sort(key=lambda r: rank.get((r["model"], r["hook_kind"], r["name"]), len(rank)))
    return dict(zip(short_names(records), records, strict=True))


def short_names(records: list[Row]) -> list[str]:
    """A name per run (record or results row) that no other run of ``records`` has: its label,
    else ``<label>_sp<sparsity>_seed<seed>``, qualified by hook kind, then model, where those
    repeat; else its folder. Reports, exports and printed tables name runs this way."""
    for key in _KEYS:
        names = [key(r) for r in records]
        if len(set(names)) == len(names):
            return names
    raise AssertionError("two runs share a folder")


_KEYS: list[Callable[[Row], str]] = [
    lambda r: r["label"],
    lambda r: r["name"],
    lambda r: f"{r['hook_kind']}/{r['name']}",
    lambda r: f"{r['model']}/{r['hook_kind']}/{r['name']}",
    lambda r: r["folder"],
]


# ---- the results table --------------------------------------------------------------------
def sequences_file(split: str) -> str:
    """The run folder's file of per-sequence sums (``SequenceStats``) on a held-out split."""
    return f"sequences-{split}.safetensors"


def load_sequences(run_folder: str | Path, split: str) -> SequenceStats:
    """A run's per-sequence sums on ``split``, for the paired bootstrap of ``analyses.gaps``."""
    tensors = read_weights(Path(run_folder) / sequences_file(split))
    return SequenceStats(**{k: tensors[k] for k in SequenceStats.__dataclass_fields__})


def row_split(row: Row) -> str:
    """The held-out split of a results row; rows written before the three splits have none and
    were evaluated on what is now the validation split."""
    return row.get("split") or "validation"


def _key(row: Row) -> tuple[str, str]:
    return row["config_hash"], row_split(row)


class ResultsTable:
    """The sweep's rows, one per run and held-out split (``config_hash``, ``split``); ``add``
    rewrites JSON and CSV atomically.

    Processes that share the folder take turns under its lock file, and each ``add`` merges
    into the rows on disk, so no process drops another's rows."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._all: list[Row] = self._read()

    @property
    def rows(self) -> list[Row]:
        """The evaluated rows."""
        return [r for r in self._all if not r.get("failed")]

    @property
    def failed(self) -> list[Row]:
        """The rows of runs whose training failed (``failed``: why; ``steps``: where)."""
        return [r for r in self._all if r.get("failed")]

    def _read(self) -> list[Row]:
        path = self.folder / RESULTS_JSON
        return read_table(path) if path.is_file() else []

    def has(self, run: Run) -> bool:
        """Whether ``run`` has an evaluated row for its ``data.eval_split``."""
        return (run.config_hash, run.data.eval_split) in {_key(r) for r in self.rows}

    def fail(self, run: Run, why: dict[str, Any]) -> None:
        """Record that ``run``'s training failed: ``why`` holds the step and the error."""
        self.add({**run.record(), "split": run.data.eval_split, "steps": why["step"],
                  "failed": why["error"]})  # fmt: skip

    def add(self, row: Row) -> None:
        """Put ``row`` in the table, in place of the run's earlier row for that split."""
        if not distributed.is_main():
            self._all = [r for r in self._all if _key(r) != _key(row)] + [row]
            return
        with locked(self.folder / ".results.lock"):
            ours = {_key(r): r for r in self._all}  # as computed (NaN, not null)
            disk = [r for r in self._read() if _key(r) != _key(row)]
            self._all = [ours.get(_key(r), r) for r in disk] + [row]
            atomic_write_text(
                self.folder / RESULTS_JSON, json.dumps(_json_safe(self._all), indent=1)
            )
            atomic_write_text(self.folder / RESULTS_CSV, to_csv(self._all))


def to_csv(rows: list[Row]) -> str:
    """The rows as CSV: ``COLUMNS`` first, then the rest; NaN and None as empty cells."""
    extra = [k for r in rows for k in r if k not in COLUMNS]
    names = [c for c in COLUMNS if any(c in r for r in rows)] + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in names})
    return buf.getvalue()


def read_results(path: str | Path) -> list[Row]:
    """The evaluated rows of a results table (``results.json`` or ``results.csv``; numbers
    parsed, empty cells None), checked: a damaged table is a one-line error naming the command
    that rewrites it. Rows of failed runs are left out."""
    return [r for r in read_table(Path(path)) if not r.get("failed")]


def format_table(rows: list[Row]) -> str:
    """The ``SUMMARY`` columns of the rows as a Markdown table, runs named by ``short_names``."""
    named = [{**r, "name": n} for r, n in zip(rows, short_names(rows), strict=True)]
    return markdown_table(
        [c for c, _ in SUMMARY], ([f.format(r[c]) for c, f in SUMMARY] for r in named)
    )


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
