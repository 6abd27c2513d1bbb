"""The one run system: a sweep file describes every run (``config``), each run is resolved
against its model into a spec with a hash and a folder (``spec``), the pending runs train in
groups from one activation stream each and are evaluated (``execute``), and the rows go to a
resumable results table (``table``). ``sign-sae train``, ``eval``, ``sweep`` and ``demo`` are
views of ``execute.run_plan``; a single run is a sweep of one entry.
"""

from sign_sae.runs.config import (
    SWEEP_FILE,
    DataConfig,
    GridEntry,
    ModelSpec,
    Point,
    SweepConfig,
    load_sweep,
    plan,
    profiles,
)
from sign_sae.runs.execute import (
    Columns,
    Inputs,
    activations_dir,
    evaluate_run,
    evaluate_runs,
    groups,
    harvest_split,
    held_out_split,
    run_plan,
    run_sweep,
    train_group,
    train_runs,
)
from sign_sae.runs.spec import FAILED_FILE, TRAIN_FILE, Row, Run, resolve, resolve_hook
from sign_sae.runs.table import (
    COLUMNS,
    RESULTS_CSV,
    RESULTS_JSON,
    SUMMARY,
    ResultsTable,
    format_table,
    load_sequences,
    read_results,
    row_split,
    sequences_file,
    short_names,
    to_csv,
    trained_runs,
)
from sign_sae.trainer import TrainConfig  # the schema of a sweep file's ``train``

__all__ = [
    "COLUMNS", "FAILED_FILE", "RESULTS_CSV", "RESULTS_JSON", "SUMMARY", "SWEEP_FILE",
    "TRAIN_FILE", "TrainConfig", "Columns", "DataConfig", "GridEntry", "Inputs", "ModelSpec", "Point",
    "ResultsTable", "Row", "Run", "SweepConfig", "activations_dir", "evaluate_run",
    "evaluate_runs", "format_table", "groups", "harvest_split", "held_out_split",
    "load_sequences", "load_sweep", "plan", "profiles", "read_results", "resolve",
    "resolve_hook", "row_split", "run_plan", "run_sweep", "sequences_file", "short_names", "to_csv",
    "train_group", "train_runs", "trained_runs",
]  # fmt: skip
