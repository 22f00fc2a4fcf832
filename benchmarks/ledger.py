"""The committed record of finished benchmark runs.

``runs/`` is not in git, and a new machine starts without it: a grid that spans several sessions would train again
everything the last machine finished. So each finished run's metrics (the fields the reports read, not its history
or adapter) also go, one JSON line per run, into a file under ``benchmarks/results/`` that is committed with the
results; :func:`benchmarks.generalization.running.execute` reads a run from there when its folder is missing.
Several processes append to one ledger safely (one ``write`` per line under an exclusive ``flock``).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Iterable, Optional

from peft_tsrs.app.locking import exclusive

from . import RESULTS, ROOT

# the committed ledger of each grid's run folder; any other folder keeps its ledger inside (``<runs>/ledger.jsonl``)
COMMITTED = {os.path.join(ROOT, "runs", "bench-v2", name): os.path.join(RESULTS, "v2", f"{name}_runs.jsonl")
             for name in ("budget", "evidence", "llm")}
# the fields of metrics.json a report reads; the rest (history, diagnostics, base model) stays in the run folder
KEPT = ("metric", "method", "train_end", "train", "validation", "test", "generalization_gap", "seconds_per_step",
        "train_steps", "train_time_s", "peak_memory_mb", "trainable_parameters")


class Ledger:
    """Finished runs by folder (relative to ``root``), kept in the JSON-lines file ``path``."""

    def __init__(self, path: str, root: str = ROOT) -> None:
        self.path = path
        self.root = root
        self._entries: dict[str, dict[str, Any]] = {}
        self._seen: Optional[tuple[float, int]] = None

    def key(self, run_dir: str) -> str:
        return os.path.relpath(os.path.abspath(run_dir), self.root).replace(os.sep, "/")

    def _refresh(self) -> None:
        """Reread the file when another process appended to it."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._entries, self._seen = {}, None
            return
        if self._seen == (stat.st_mtime, stat.st_size):
            return
        entries = {}
        with open(self.path) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as err:  # a line cut by a killed process: that run is simply redone
                    warnings.warn(f"{self.path}:{n}: not a JSON line ({err}); its run is trained again",
                                  stacklevel=2)
                    continue
                entries[entry["run"]] = entry["metrics"]
        self._entries, self._seen = entries, (stat.st_mtime, stat.st_size)

    def get(self, run_dir: str) -> Optional[dict[str, Any]]:
        """The recorded metrics of the run in ``run_dir``, ``None`` if it is not recorded."""
        self._refresh()
        return self._entries.get(self.key(run_dir))

    def __len__(self) -> int:
        self._refresh()
        return len(self._entries)

    def add(self, run_dir: str, metrics: dict[str, Any]) -> None:
        """Record a finished run (once: a run already recorded is left as it is)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with exclusive(f"{self.path}.lock"):
            if self.get(run_dir) is not None:
                return
            kept = {k: metrics[k] for k in KEPT if k in metrics}
            line = json.dumps({"run": self.key(run_dir), "metrics": kept}, sort_keys=True) + "\n"
            with open(self.path, "a+") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() > 0:
                    fh.seek(fh.tell() - 1)
                    if fh.read(1) != "\n":  # after a line cut by a killed process
                        line = "\n" + line
                fh.write(line)
            self._seen = None


_OPEN: dict[str, Ledger] = {}


def ledger_for(runs: str) -> Ledger:
    """The record of the finished runs under ``runs`` (one object per file: it caches what it read)."""
    runs = os.path.abspath(runs)
    path = COMMITTED.get(runs, os.path.join(runs, "ledger.jsonl"))
    return _OPEN.setdefault(path, Ledger(path))


def restore(ledger: Ledger, rows: Iterable[dict[str, Any]], metric: str = "accuracy") -> int:
    """Record the runs of a written report's rows (``benchmarks.evidence._row`` or ``benchmarks.budget.row``: scores
    under ``*_accuracy``, the folder relative to the repository as ``run_dir``) that ``ledger`` lacks: for reports
    written before the ledgers existed. ``metric``: the task's score those rows hold. Returns how many were added."""
    before = len(ledger)
    for row in rows:
        selected = {"train": {metric: row["selected_train_accuracy"]}} if "selected_train_accuracy" in row else {}
        ledger.add(os.path.join(ROOT, row["run_dir"]), {
            "metric": metric, **selected,
            "train_end": {metric: row["train_accuracy"], "loss": row["train_loss"]},
            "validation": {metric: row["validation_accuracy"], "loss": row.get("validation_loss")},
            "test": {metric: row["test_accuracy"]},
            **{k: row.get(k) for k in ("generalization_gap", "seconds_per_step", "train_steps", "peak_memory_mb",
                                       "trainable_parameters")}})
    return len(ledger) - before


def add_grid_arguments(parser: argparse.ArgumentParser, shard_help: str, report: str) -> None:
    """The options every resumable grid shares: ``--shard i/n``, ``--report`` and ``--restore-ledger``."""
    parser.add_argument("--shard", default="0/1", help=shard_help)
    parser.add_argument("--report", action="store_true", help="write the results of finished runs, train nothing")
    parser.add_argument("--restore-ledger", action="store_true",
                        help=f"first record the runs of the written {report} in the ledger (reports older than it)")
