"""Running the grid: each run trained once (resumed from its folder, locked against other processes sharing
``--runs``), the configuration of every (task, setting, method) selected on seed 0's validation, then its seeds."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

from peft_tsrs.app.locking import LockBusy, exclusive

from .. import ROOT
from ..ledger import Ledger
from ..methods import Method
from .grid import RunSpec, Setting, Task, default_lr, lr_grid, selection_specs, spec_for


def load_metrics(run_dir: str) -> Optional[dict[str, Any]]:
    """The run's metrics.json (``peft_tsrs.app.run.load_metrics``), ``None`` while unfinished."""
    from peft_tsrs.app.run import load_metrics as _load

    return _load(run_dir)


def default_runner(spec: RunSpec, keep_adapter: bool = False) -> dict[str, Any]:
    """``peft_tsrs.app.run.run_recipe`` on the spec's recipe; the ``adapter/`` folder (a whole model for full
    fine-tuning, 90 MB for MiniLM) is deleted afterwards unless ``keep_adapter``: the report needs metrics.json."""
    from peft_tsrs.app.recipes import load_recipe
    from peft_tsrs.app.run import run_recipe

    recipe = load_recipe(list(spec.files), list(spec.overrides))
    metrics = run_recipe(recipe, progress=False)
    if not keep_adapter:
        shutil.rmtree(os.path.join(spec.run_dir, "adapter"), ignore_errors=True)
    return metrics


def run_lock(run_dir: str, wait: bool = True) -> contextlib.AbstractContextManager[None]:
    """The exclusive lock of one run folder (``<run_dir>.lock``) against other processes sharing ``--runs``: two
    calls split with ``--seeds`` both need seed 0, and without the lock both would train it into the same folder, or
    one would delete the other's unfinished folder as an interrupted run."""
    return exclusive(f"{run_dir}.lock", wait=wait)


def execute(spec: RunSpec, runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner,
            log: Callable[[str], None] = print, ledger: Optional[Ledger] = None,
            wait: bool = True) -> Optional[dict[str, Any]]:
    """The metrics of ``spec``: read from its folder if it finished before (resume), else from ``ledger`` (the
    committed record, for a machine without the folder), else run it with ``runner`` (``None``: report only, an
    unfinished run gives ``None``). A run another process is training is waited for (:func:`run_lock`) and then
    read, not run twice (``wait=False``: skipped, ``None``, so a grid shard can train another run meanwhile). A
    finished run is recorded in ``ledger``."""
    metrics = load_metrics(spec.run_dir)
    if metrics is None and ledger is not None:
        metrics = ledger.get(spec.run_dir)
    elif metrics is not None and ledger is not None:
        ledger.add(spec.run_dir, metrics)  # finished before the ledger knew it
    if metrics is not None or runner is None:
        return metrics
    try:
        with run_lock(spec.run_dir, wait=wait):
            metrics = _run_locked(spec, runner, log)
    except LockBusy:
        return None
    if ledger is not None:
        ledger.add(spec.run_dir, metrics)
    return metrics


def _run_locked(spec: RunSpec, runner: Callable[[RunSpec], dict[str, Any]],
                log: Callable[[str], None]) -> dict[str, Any]:
    metrics = load_metrics(spec.run_dir)  # finished by another process while this one waited for the lock
    if metrics is not None:
        log(f"    read {spec.task}/{spec.setting.key}/{spec.method}/{os.path.basename(spec.run_dir)}: "
            "finished by another process")
        return metrics
    if os.path.isdir(spec.run_dir):  # an interrupted run: start it again from scratch
        shutil.rmtree(spec.run_dir)
    start = time.perf_counter()
    metrics = runner(spec)
    score = metrics.get("metric", "accuracy")  # exact match on a generative task
    log(f"    ran {spec.task}/{spec.setting.key}/{spec.method}/{os.path.basename(spec.run_dir)}: "
        f"val {metrics['validation'][score]:.4f} test {metrics['test'][score]:.4f} "
        f"({time.perf_counter() - start:.0f} s)")
    return metrics


def _version() -> str:
    from peft_tsrs.version import __version__

    return __version__


def record(spec: RunSpec, metrics: dict[str, Any], selected: bool = False) -> dict[str, Any]:
    """One row of generalization.json."""
    return {
        "task": spec.task, "shots": spec.setting.shots, "label_noise": spec.setting.noise,
        "setting": spec.setting.key, "method": spec.method, "phase": spec.phase, "seed": spec.seed,
        "lr": spec.lr, "hparams": list(spec.hparams), "config": spec.config_tag, "selected": selected,
        "validation_accuracy": metrics["validation"]["accuracy"],
        "validation_loss": metrics["validation"].get("loss"),
        "test_accuracy": metrics["test"]["accuracy"],
        "train_time_s": metrics.get("train_time_s"), "train_steps": metrics.get("train_steps"),
        "trainable_parameters": metrics.get("trainable_parameters"),
        "recipe_method": metrics.get("method"), "run_dir": os.path.relpath(spec.run_dir, ROOT),
        "peft_tsrs_version": _version(),
    }


def select_best(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row with the highest validation accuracy; ties: lower validation loss, then the earliest in the grid."""
    if not rows:
        raise ValueError("select_best: no candidate runs")

    def key(i_row):
        i, row = i_row
        loss = row.get("validation_loss")
        return (-row["validation_accuracy"], math.inf if loss is None else loss, i)

    return min(enumerate(rows), key=key)[1]


def run_grid(tasks: Sequence[Task], settings: Sequence[Setting], methods: Sequence[Method], seeds: Sequence[int],
             multipliers: Sequence[float], runs: str, extra: Sequence[str] = (),
             runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner, log: Callable[[str], None] = print,
             lrs_for: Optional[Callable[[Task, Method], list[float]]] = None,
             on_progress: Optional[Callable[[list[dict[str, Any]]], None]] = None,
             select_on_clean: bool = False) -> list[dict[str, Any]]:
    """Selection then seeds for every (task, setting, method); returns every run as a record.

    ``select_on_clean``: a setting with label noise reuses the configuration selected (on validation) for the clean
    setting with the same shots when that one is in the grid before it, and only runs its seeds."""
    records: list[dict[str, Any]] = []
    lrs_for = lrs_for or (lambda t, m: lr_grid(default_lr(t, m), multipliers))
    chosen: dict[tuple[str, int, str], RunSpec] = {}
    for task in tasks:
        for setting in settings:
            for method in methods:
                log(f"== {task.key} / {setting.label} / {method.key}")
                clean = chosen.get((task.key, setting.shots, method.key))
                if select_on_clean and setting.noise > 0 and clean is not None:
                    log(f"   configuration of the clean {setting.shots}-shot selection: {clean.config_tag}")
                    best_spec, seed_runs = clean, list(seeds)
                else:
                    candidates = []
                    specs = selection_specs(runs, task, setting, method, lrs_for(task, method), extra)
                    for spec in specs:
                        metrics = execute(spec, runner, log)
                        if metrics is not None:
                            candidates.append((spec, record(spec, metrics)))
                    if len(candidates) < len(specs):  # report only: selection unfinished, leave the group out
                        log(f"   selection unfinished ({len(candidates)}/{len(specs)} runs): left out")
                        continue
                    best = select_best([r for _, r in candidates])
                    best_spec = next(s for s, r in candidates if r is best)
                    if setting.noise == 0:
                        chosen[(task.key, setting.shots, method.key)] = best_spec
                    log(f"   selected {best['config']} (validation {best['validation_accuracy']:.4f})")
                    for spec, row in candidates:
                        row["selected"] = row is best and 0 in seeds  # the selection run at the chosen config: seed 0
                        records.append(row)
                    seed_runs = [seed for seed in seeds if seed != 0]
                for seed in seed_runs:
                    spec = spec_for(runs, task, setting, method, best_spec.lr, best_spec.hparams, seed, "seed",
                                    extra)
                    metrics = execute(spec, runner, log)
                    if metrics is not None:
                        records.append(record(spec, metrics, selected=True))
                if on_progress is not None:
                    on_progress(records)
    return records
