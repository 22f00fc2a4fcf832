"""Does it generalize better? Every method on the same budget, tasks × shots × label noise × seeds, with the
learning rate (and a method's own regularizer strength, where it has a grid) chosen on the validation split.

Grid (the default, hours on 2 CPU cores — resumable, run it in pieces with the filters):

* tasks: ``wordnet`` (MiniLM, few-shot WordNet noun categories) and ``fmnist`` (the small ViT pretrained here on
  Fashion-MNIST classes 0-4, fine-tuned on classes 5-9);
* settings: 8 and 32 shots per class without label noise, and 32 shots with 20% and 40% of the training labels
  flipped (validation and test labels stay clean);
* methods (``benchmarks.methods``): full fine-tuning, LoRA, RLRR, the PACE adapter without noise/consistency, PACE
  (full), PACE-fast, LoRA+TSRS, RLRR+TSRS, full + distance constraint + self-labeling, and RLRR + TSRS + PACE-fast
  (the combination of the demo) — each compared (paired over seeds) with its un-regularized counterpart;
* budget: the task file's (WordNet 10 epochs, ViT 15 epochs, batch 16; the best epoch on validation is kept).

Selection (never on test): on seed 0 of every (task, setting, method), each learning rate of ``lr_multipliers ×``
the recipe's default and each entry of the method's ``hparams`` grid is trained; the configuration with the highest
validation accuracy (ties: lower validation loss, then grid order) is then run with seeds 0..S-1 (seed 0 is the
selection run itself). A seed sets both the few-shot split / label flips (``task.seed``) and the initialization and
data order (``training.seed``), so paired comparisons share split and noise.

Output: ``<out>/generalization.json`` (every run, selection included), ``generalization.md`` (mean ± std over seeds,
paired difference to the counterpart with a paired t-test and an exact sign test) and ``generalization.png``.
Each run folder is ``<runs>/<task>/<setting>/<method>/lr<lr>[-<hparams>]-s<seed>``; a folder that already holds a
``metrics.json`` is not run again (resume after an interruption, or extend the grid). ``--merge`` keeps the rows of
an existing ``<out>/generalization.json`` outside this call's (task, setting, method) groups, so a committed table
can be extended method by method.

    python -m benchmarks.generalization                       # the full grid
    python -m benchmarks.generalization --quick               # tiny budget, proves the pipeline (minutes)
    python -m benchmarks.generalization --tasks wordnet --methods lora lora+tsrs --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from . import RESULTS, ROOT
from .methods import (GENERALIZATION_BY_KEY, GENERALIZATION_METHODS, SELF_LABEL_FILE, TSRS_GRID, TSRS_WEIGHTS, Method,
                      distance_grid, first_grid_point, recipe_distance_ratio, recipe_files, tsrs_grid)
from .stats import mean_std, paired_t_test, sign_test

RUNS = os.path.join(ROOT, "benchmarks", "runs")
COMMAND = "python -m benchmarks.generalization"  # how a call is recorded in the results' meta
Group = tuple[str, int, float, str]  # (task, shots, label noise, method): the rows of one table line


# ---------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Task:
    key: str
    label: str
    file: str  # relative to configs/tasks


@dataclass(frozen=True)
class Setting:
    shots: int
    noise: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.shots}shot-noise{round(100 * self.noise)}"

    @property
    def label(self) -> str:
        return f"{self.shots} shots" + (f", {self.noise:.0%} noisy labels" if self.noise else "")


TASKS: dict[str, Task] = {
    "wordnet": Task("wordnet", "WordNet nouns / MiniLM", "wordnet_minilm.yaml"),
    "fmnist": Task("fmnist", "Fashion-MNIST 5-9 / ViT", "fmnist_vit.yaml"),
}
SETTINGS = (Setting(8), Setting(32), Setting(32, 0.2), Setting(32, 0.4))
LR_MULTIPLIERS = (0.3, 1.0, 3.0)
SEEDS = (0, 1, 2, 3, 4)

# --quick: a tiny budget that exercises every step (selection, seeds, resume, report) in minutes
QUICK_SETTINGS = (Setting(2), Setting(2, 0.4))
QUICK_LR_MULTIPLIERS = (1.0, 3.0)
QUICK_SEEDS = (0, 1)
QUICK_OVERRIDES = ("training.max_steps=4", "training.logging_steps=2", "task.val_per_class=2",
                   "task.test_per_class=4", "diagnostics=false")
# every run: the end-of-run diagnostics (stable ranks, sharpness probe, ...) are not part of this comparison
BENCH_OVERRIDES = ("diagnostics=false",)


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class RunSpec:
    task: str
    setting: Setting
    method: str
    lr: float
    hparams: tuple[str, ...]
    seed: int
    phase: str  # "select" (seed 0, grid) or "seed"
    run_dir: str
    overrides: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def config_tag(self) -> str:
        return config_tag(self.lr, self.hparams)


def hparam_tag(hparams: Sequence[str]) -> str:
    """``("regularizers.tsrs_weight=0.1",)`` -> ``tsrs_weight0.1``."""
    parts = []
    for h in hparams:
        key, _, value = h.partition("=")
        parts.append(key.split(".")[-1] + value)
    return "-".join(parts)


def config_tag(lr: float, hparams: Sequence[str]) -> str:
    tag = f"lr{lr:.3g}"
    return f"{tag}-{hparam_tag(hparams)}" if hparams else tag


def run_dir_for(runs: str, task: str, setting: Setting, method: str, lr: float, hparams: Sequence[str],
                seed: int) -> str:
    return os.path.join(runs, task, setting.key, method, f"{config_tag(lr, hparams)}-s{seed}")


def default_lr(task: Task, method: Method) -> float:
    """The learning rate of the merged task + method recipe files and the method's overrides (the grid's centre)."""
    from peft_tsrs.app.recipes import load_recipe

    overrides = [*method.overrides, *method.per_task.get(task.key, ())]
    return load_recipe(recipe_files(task.file, method), overrides).training.learning_rate


def lr_grid(base_lr: float, multipliers: Sequence[float]) -> list[float]:
    return [float(f"{base_lr * m:.3g}") for m in multipliers]


def spec_for(runs: str, task: Task, setting: Setting, method: Method, lr: float, hparams: tuple[str, ...],
             seed: int, phase: str, extra: Sequence[str] = ()) -> RunSpec:
    run_dir = run_dir_for(runs, task.key, setting, method.key, lr, hparams, seed)
    overrides = (
        *method.overrides, *method.per_task.get(task.key, ()), *hparams,
        f"task.shots_per_class={setting.shots}", f"task.label_noise={setting.noise}",
        f"task.seed={seed}", f"training.seed={seed}", f"training.learning_rate={lr}",
        *extra,
        f"output_dir={os.path.dirname(run_dir)}", f"name={os.path.basename(run_dir)}",
    )
    return RunSpec(task.key, setting, method.key, lr, tuple(hparams), seed, phase, run_dir, overrides,
                   tuple(recipe_files(task.file, method)))


def selection_specs(runs: str, task: Task, setting: Setting, method: Method, lrs: Sequence[float],
                    extra: Sequence[str] = ()) -> list[RunSpec]:
    return [spec_for(runs, task, setting, method, lr, hp, 0, "select", extra)
            for hp in method.hparams for lr in lrs]


# ---------------------------------------------------------------------------------------------- running
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


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold the exclusive lock of one run folder (``<run_dir>.lock``, POSIX ``flock``) against other processes
    sharing ``--runs``: two calls split with ``--seeds`` both need seed 0, and without the lock both would train it
    into the same folder, or one would delete the other's unfinished folder as an interrupted run. Released (and the
    waiting process let in) when the block ends or the process dies. No-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
    with open(f"{run_dir}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def execute(spec: RunSpec, runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner,
            log: Callable[[str], None] = print) -> Optional[dict[str, Any]]:
    """The metrics of ``spec``: read from its folder if it finished before (resume), else run it with ``runner``
    (``None``: report only, an unfinished run gives ``None``). A run another process is training is waited for
    (:func:`run_lock`) and then read, not run twice."""
    metrics = load_metrics(spec.run_dir)
    if metrics is not None or runner is None:
        return metrics
    with run_lock(spec.run_dir):
        return _run_locked(spec, runner, log)


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
    log(f"    ran {spec.task}/{spec.setting.key}/{spec.method}/{os.path.basename(spec.run_dir)}: "
        f"val {metrics['validation']['accuracy']:.4f} test {metrics['test']['accuracy']:.4f} "
        f"({time.perf_counter() - start:.0f} s)")
    return metrics


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


# ---------------------------------------------------------------------------------------------- statistics
def final_runs(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs at each method's selected configuration (one per seed)."""
    return [r for r in records if r["selected"]]


def group_key(row: dict[str, Any]) -> Group:
    """``(task, shots, label noise, method)``: the rows of one table line."""
    return row["task"], row["shots"], row["label_noise"], row["method"]


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (task, shots, label noise, method), from the selected runs."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in final_runs(records):
        groups[group_key(r)].append(r)
    rows = []
    for (task, shots, noise, method), runs in groups.items():
        test_mean, test_std = mean_std([r["test_accuracy"] for r in runs])
        val_mean, val_std = mean_std([r["validation_accuracy"] for r in runs])
        rows.append({"task": task, "shots": shots, "label_noise": noise, "method": method,
                     "seeds": sorted(r["seed"] for r in runs), "n": len(runs), "config": runs[0]["config"],
                     "test_mean": test_mean, "test_std": test_std, "val_mean": val_mean, "val_std": val_std,
                     "train_time_s": statistics.fmean(r["train_time_s"] or 0.0 for r in runs)})
    order = {m.key: i for i, m in enumerate(GENERALIZATION_METHODS)}
    rows.sort(key=lambda r: (r["task"], r["shots"], r["label_noise"], order.get(r["method"], len(order)),
                             r["method"]))
    return rows


def paired_comparisons(records: Iterable[dict[str, Any]], counterparts: Optional[dict[str, str]] = None
                       ) -> list[dict[str, Any]]:
    """Per (task, setting, method with a counterpart): test-accuracy differences over the seeds both have."""
    counterparts = counterparts if counterparts is not None else {
        m.key: m.counterpart for m in GENERALIZATION_METHODS if m.counterpart}
    by_key: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in final_runs(records):
        by_key[group_key(r)][r["seed"]] = r["test_accuracy"]
    out = []
    for (task, shots, noise, method), accs in sorted(by_key.items()):
        base = counterparts.get(method)
        if base is None or (task, shots, noise, base) not in by_key:
            continue
        base_accs = by_key[(task, shots, noise, base)]
        seeds = sorted(set(accs) & set(base_accs))
        diffs = [accs[s] - base_accs[s] for s in seeds]
        mean, std = mean_std(diffs)
        t, p = paired_t_test(diffs)
        wins, losses, p_sign = sign_test(diffs)
        out.append({"task": task, "shots": shots, "label_noise": noise, "method": method, "counterpart": base,
                    "seeds": seeds, "diffs": diffs, "mean_diff": mean, "std_diff": std, "t": t, "p_t": p,
                    "wins": wins, "losses": losses, "p_sign": p_sign})
    return out


# ---------------------------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.1f}"


def _p(x: float) -> str:
    return "—" if math.isnan(x) else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def _values_text(values: Sequence[float], first_only: bool) -> str:
    """``= 0.1`` (the first point) or ``∈ {0.1, 1}`` (the grid)."""
    return f"= {values[0]:g}" if first_only else "∈ {" + ", ".join(f"{v:g}" for v in values) + "}"


def _weights_text(weights: Optional[Sequence[float]], first_only: bool) -> str:
    """``λ = 0.1`` (the first point) or ``λ ∈ {0.1, 1}`` (the grid) of a call's TSRS λ values."""
    return "λ " + _values_text(list(weights or TSRS_WEIGHTS), first_only)


def _ratios_text(ratios: Optional[Sequence[float]], first_only: bool) -> str:
    """``, self-labeling radius ratio ∈ {0.05, 0.1}`` of a call's ``--distance-ratios`` ('' without them)."""
    return f", self-labeling radius ratio {_values_text(list(ratios), first_only)}" if ratios else ""


def selection_text(meta: dict[str, Any]) -> str:
    """How the configurations of a call were chosen, from its ``meta``."""
    weights, ratios = meta.get("tsrs_weights"), meta.get("distance_ratios")
    if not meta.get("search", True):
        text = ("no search (`--no-search`): every method at its recipe's learning rate and the first point of its "
                f"own grid (TSRS {_weights_text(weights, True)}{_ratios_text(ratios, True)}), as shipped in configs/")
    elif meta.get("lr_only"):
        text = (f"learning-rate grid = {meta.get('lr_multipliers')} × the recipe's default, chosen per (task, "
                f"setting, method) on seed 0's validation accuracy, each method's own grid at its first point (TSRS "
                f"{_weights_text(weights, True)}{_ratios_text(ratios, True)}, `--lr-only`); test accuracy is reported "
                "at the selected configuration")
    else:
        text = (f"learning-rate grid = {meta.get('lr_multipliers')} × the recipe's default, chosen per (task, "
                f"setting, method) on seed 0's validation accuracy (plus the method's own grid, e.g. TSRS "
                f"{_weights_text(weights, False)}{_ratios_text(ratios, False)}); test accuracy is reported at the "
                "selected configuration")
    if meta.get("select_on_clean"):
        text += ("; settings with noisy labels use the configuration selected for the clean setting with the "
                 "same shots (`--select-on-clean`)")
    return text


def call_protocol(command: str) -> str:
    """`` (no search)``-style note on how an earlier call chose its configurations ('' if it does not parse)."""
    args = parse_command(command)
    if args is None:
        return ""
    if args.no_search:
        return " (no search)"
    ratios = _ratios_text(args.distance_ratios, args.lr_only)
    if args.lr_only:
        return f" (learning rate selected on validation, {_weights_text(args.tsrs_weights, True)}{ratios})"
    tsrs = f", TSRS {_weights_text(args.tsrs_weights, False)}" if args.tsrs_weights else ""
    return f" (configuration selected on validation{tsrs}{ratios})"


def markdown_report(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = aggregate(records)
    pairs = {(p["task"], p["shots"], p["label_noise"], p["method"]): p for p in paired_comparisons(records)}
    labels = {m.key: m.label for m in GENERALIZATION_METHODS}
    lines = ["# Generalization (`python -m benchmarks.generalization`)", ""]
    if meta.get("quick"):
        lines += ["**QUICK MODE** — a tiny budget (a few optimizer steps, a handful of validation/test examples) that "
                  "only proves the harness works; these numbers say nothing about the methods.", ""]
    selection = selection_text(meta)
    earlier = "".join(f" Merged (`--merge`) with the other methods' rows of {c['date']}; `{c['command']}`"
                      f"{call_protocol(c['command'])}." for c in meta.get("earlier_calls", []))
    lines += [
        f"{meta.get('date', '')}; `{meta.get('command', '')}`; seeds {meta.get('seeds')}; {selection}.{earlier} "
        f"Accuracies in %, mean ± std over seeds. Δ = paired difference in test accuracy to the un-regularized "
        f"counterpart (same seeds: same split, label flips and initialization); p(t) paired t-test, W/L and p(sign) "
        f"an exact two-sided sign test.", "",
    ]
    current = None
    for r in rows:
        head = (r["task"], r["shots"], r["label_noise"])
        if head != current:
            current = head
            task = TASKS.get(r["task"])
            setting = Setting(r["shots"], r["label_noise"])
            lines += ["", f"## {task.label if task else r['task']} — {setting.label}", "",
                      "| method | seeds | selected | val acc | test acc | Δ test vs counterpart | p(t) | W/L | p(sign) "
                      "| train s |", "|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
        pair = pairs.get((r["task"], r["shots"], r["label_noise"], r["method"]))
        if pair:
            delta = (f"{'+' if pair['mean_diff'] >= 0 else ''}{_pct(pair['mean_diff'])} ± {_pct(pair['std_diff'])} "
                     f"vs {pair['counterpart']}")
            stats = f"{_p(pair['p_t'])} | {pair['wins']}/{pair['losses']} | {_p(pair['p_sign'])}"
        else:
            delta, stats = "", " |  | "
        lines.append(f"| {labels.get(r['method'], r['method'])} | {r['n']} | {r['config']} | "
                     f"{_pct(r['val_mean'])} ± {_pct(r['val_std'])} | {_pct(r['test_mean'])} ± {_pct(r['test_std'])} | "
                     f"{delta} | {stats} | {r['train_time_s']:.0f} |")
    best = best_by_validation(rows)
    if best:
        lines += ["", "## Best method per setting (by mean validation accuracy)", "",
                  "| task | setting | method | val acc | test acc |", "|---|---|---|---:|---:|"]
        for r in best:
            lines.append(f"| {r['task']} | {Setting(r['shots'], r['label_noise']).label} | "
                         f"{labels.get(r['method'], r['method'])} | {_pct(r['val_mean'])} | {_pct(r['test_mean'])} |")
    lines += selection_lines(records, labels)
    n_sel = sum(1 for r in records if r["phase"] == "select")
    lines += ["", f"{len(records)} runs in all ({n_sel} selection runs on seed 0); every run with its validation and "
                  f"test accuracy is in `generalization.json`."]
    return "\n".join(lines).strip() + "\n"


def selection_lines(records: Sequence[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Markdown table of every seed-0 selection run of the groups that searched more than one configuration."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["phase"] == "select":
            groups[group_key(r)].append(r)
    searched = [(key, runs) for key, runs in sorted(groups.items()) if len(runs) > 1]
    if not searched:
        return []
    lines = ["", "## Selection runs (seed 0, every configuration searched)", "",
             "| task | setting | method | configuration | val acc | test acc | selected |", "|---|---|---|---|---:|---:|---|"]
    for (task, shots, noise, method), runs in searched:
        for r in runs:
            lines.append(f"| {task} | {Setting(shots, noise).label} | {labels.get(method, method)} | {r['config']} | "
                         f"{_pct(r['validation_accuracy'])} | {_pct(r['test_accuracy'])} | "
                         f"{'yes' if r['selected'] else ''} |")
    return lines


def best_by_validation(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["shots"], r["label_noise"])].append(r)
    return [max(g, key=lambda r: r["val_mean"]) for _, g in sorted(groups.items())]


def plot(records: list[dict[str, Any]], path: str) -> Optional[str]:
    """One panel per (task, setting): test accuracy mean ± std per method."""
    rows = aggregate(records)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        panels[(r["task"], r["shots"], r["label_noise"])].append(r)
    n = len(panels)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, ((task, shots, noise), group) in zip(axes.flat, sorted(panels.items())):
        means = [100 * r["test_mean"] for r in group]
        errs = [100 * r["test_std"] for r in group]
        colors = ["#dd8452" if GENERALIZATION_BY_KEY.get(r["method"]) and GENERALIZATION_BY_KEY[r["method"]].counterpart
                  else "#4c72b0" for r in group]
        ax.bar(range(len(group)), means, yerr=errs, capsize=3, color=colors)
        ax.set_xticks(range(len(group)), [r["method"] for r in group], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task}: {Setting(shots, noise).label}", fontsize=9)
        ax.set_ylabel("test accuracy (%)")
        low = min(m - e for m, e in zip(means, errs))
        ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + e for m, e in zip(means, errs)) + 3))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("test accuracy, mean ± std over seeds (orange: regularized, blue: un-regularized)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def read_results(out: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(runs, meta)`` of ``<out>/generalization.json``; ``([], {})`` when there is none yet."""
    path = os.path.join(out, "generalization.json")
    if not os.path.exists(path):
        return [], {}
    with open(path) as fh:
        payload = json.load(fh)
    if not isinstance(payload, dict) or "runs" not in payload:
        raise ValueError(f"{path} is not a generalization.json (no 'runs' list); move it away or drop --merge")
    return payload["runs"], payload.get("meta", {})


def merge_records(earlier: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
                  groups: set[Group]) -> list[dict[str, Any]]:
    """The rows of ``earlier`` outside ``groups`` (the (task, shots, noise, method) of this call's grid), then
    ``records``: a table extended method by method keeps its other lines, a group run again replaces its own."""
    return [r for r in earlier if group_key(r) not in groups] + list(records)


def merged_meta(meta: dict[str, Any], earlier: dict[str, Any], groups: set[Group]) -> dict[str, Any]:
    """``meta`` with ``earlier_calls``: the (date, command) of the earlier calls that still contribute rows.

    The calls are in the order they ran. One is dropped when every (task, setting, method) group of its grid was
    written again by a later call or by this one (``groups``); a command that does not parse is dropped only when it
    is this call's command."""
    calls = [*earlier.get("earlier_calls", [])]
    if earlier.get("command"):
        calls.append({"date": earlier.get("date", ""), "command": earlier["command"]})
    later = set(groups)
    kept = []
    for call in reversed(calls):
        own = command_groups(call["command"])
        if own is None:
            replaced = call["command"] == meta.get("command")
        else:
            replaced = own <= later
            later |= own
        if not replaced:
            kept.append(call)
    return {**meta, "earlier_calls": kept[::-1]}


def write_outputs(records: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    payload = {"meta": meta, "summary": aggregate(records), "paired": paired_comparisons(records), "runs": records}
    with open(os.path.join(out, "generalization.json"), "w") as fh:
        json.dump(payload, fh, indent=1, default=float)
    with open(os.path.join(out, "generalization.md"), "w") as fh:
        fh.write(markdown_report(records, meta))
    plot(records, os.path.join(out, "generalization.png"))


# ---------------------------------------------------------------------------------------------- CLI
def parse_settings(texts: Sequence[str]) -> list[Setting]:
    """``8`` or ``32:0.2`` (shots[:noise])."""
    out = []
    for text in texts:
        shots, _, noise = text.partition(":")
        out.append(Setting(int(shots), float(noise) if noise else 0.0))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generalization benchmark (see the module docstring).")
    parser.add_argument("--quick", action="store_true", help="tiny budget, 2 settings, 2 seeds: proves the pipeline")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(GENERALIZATION_BY_KEY), default=None,
                        help="default: all (a method's counterpart is added when missing)")
    parser.add_argument("--no-counterparts", action="store_true",
                        help="run exactly --methods, without adding their un-regularized counterparts (to split one "
                             "grid across processes sharing --runs; the report of the whole grid is --report-only)")
    parser.add_argument("--settings", nargs="+", default=None, help="shots[:noise], e.g. 8 32 32:0.2 32:0.4")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--lr-multipliers", nargs="+", type=float, default=None)
    parser.add_argument("--runs", default=None, help="parent folder of the run folders (default benchmarks/runs)")
    parser.add_argument("--out", default=None, help="folder of the results (default benchmarks/results)")
    parser.add_argument("--override", nargs="+", default=[], help="extra recipe overrides for every run")
    parser.add_argument("--tsrs-weights", nargs="+", type=float, default=None,
                        help=f"the TSRS λ grid of the TSRS methods (default {' '.join(map(str, TSRS_WEIGHTS))}); "
                             "its first value is the one --no-search and --lr-only use")
    parser.add_argument("--distance-ratios", nargs="+", type=float, default=None,
                        help="a grid of the self-labeling radius ratio (D_l = ratio·‖W0_l‖; the recipe's "
                             f"{recipe_distance_ratio():g} when not given); its first value is the one --no-search and "
                             "--lr-only use")
    parser.add_argument("--no-search", action="store_true",
                        help="no selection: every method at its recipe's learning rate and the first point of its own "
                             "grid (TSRS λ = 0.1), for grids too costly to search")
    parser.add_argument("--lr-only", action="store_true",
                        help="search the learning rate only: every method at the first point of its own grid "
                             "(TSRS λ = 0.1), one selection run per learning rate")
    parser.add_argument("--select-on-clean", action="store_true",
                        help="settings with label noise reuse the configuration selected for the clean setting with "
                             "the same shots (no selection runs of their own)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs only")
    parser.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter/ folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of this process (default: torch's, one per core); give each of "
                             "several processes sharing the cores its share (--threads 1 for two on 2 cores): "
                             "two processes at 2 OpenMP threads each on 2 cores ran an 8-shot WordNet run in "
                             "≈ 500 s against ≈ 105 s at 1 thread each")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of <out>/generalization.json for (task, setting, method) groups outside "
                             "this call's grid (extend a committed table with more methods or settings)")
    return parser


@dataclass
class CallPlan:
    """What one call runs: its tasks, settings, methods (counterparts added, grids cut), seeds and lr multipliers."""
    tasks: list[Task]
    settings: list[Setting]
    methods: list[Method]
    seeds: list[int]
    multipliers: list[float]

    @property
    def groups(self) -> set[Group]:
        """The (task, shots, label noise, method) groups of this call's grid (the table lines it writes)."""
        return {(t.key, s.shots, s.noise, m.key) for t in self.tasks for s in self.settings for m in self.methods}


def plan_call(args: argparse.Namespace) -> CallPlan:
    """The grid of a parsed command line (raises ValueError on contradictory options)."""
    quick = args.quick
    settings = parse_settings(args.settings) if args.settings else list(QUICK_SETTINGS if quick else SETTINGS)
    seeds = list(args.seeds if args.seeds is not None else (QUICK_SEEDS if quick else SEEDS))
    if args.no_search and args.lr_multipliers:
        raise ValueError("--no-search runs the recipe's learning rate only; drop --lr-multipliers or --no-search")
    if args.no_search and args.lr_only:
        raise ValueError("--lr-only searches the learning rate; drop --lr-only or --no-search")
    multipliers = [1.0] if args.no_search else list(
        args.lr_multipliers or (QUICK_LR_MULTIPLIERS if quick else LR_MULTIPLIERS))
    chosen = set(args.methods or GENERALIZATION_BY_KEY)
    if not args.no_counterparts:
        chosen |= {GENERALIZATION_BY_KEY[k].counterpart for k in list(chosen) if GENERALIZATION_BY_KEY[k].counterpart}
    methods = [m for m in GENERALIZATION_METHODS if m.key in chosen]
    if args.tsrs_weights:
        if any(w < 0 for w in args.tsrs_weights):
            raise ValueError(f"--tsrs-weights must be >= 0, got {args.tsrs_weights}")
        grid = tsrs_grid(args.tsrs_weights)
        methods = [replace(m, hparams=grid) if m.hparams == TSRS_GRID else m for m in methods]
    if args.distance_ratios:
        if any(r <= 0 for r in args.distance_ratios):
            raise ValueError(f"--distance-ratios must be > 0, got {args.distance_ratios}")
        grid = distance_grid(args.distance_ratios)
        methods = [replace(m, hparams=grid) if SELF_LABEL_FILE in m.files else m for m in methods]
    if quick or args.no_search or args.lr_only:  # one point of each method's own grid
        methods = first_grid_point(methods)
    return CallPlan([TASKS[k] for k in args.tasks], settings, methods, seeds, multipliers)


def parse_command(command: str) -> Optional[argparse.Namespace]:
    """The arguments of a recorded ``python -m benchmarks.generalization ...`` command; None if it does not parse."""
    if not command.startswith(COMMAND):
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return build_parser().parse_args(shlex.split(command[len(COMMAND):]))
    except (SystemExit, ValueError):
        return None


def command_groups(command: str) -> Optional[set[Group]]:
    """The (task, shots, label noise, method) groups of a recorded command; None if it does not parse."""
    args = parse_command(command)
    try:
        return None if args is None else plan_call(args).groups
    except ValueError:
        return None


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    quick = args.quick
    try:
        plan = plan_call(args)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    tasks, settings, methods, seeds, multipliers = (plan.tasks, plan.settings, plan.methods, plan.seeds,
                                                    plan.multipliers)
    runs = args.runs or os.path.join(RUNS, "quick" if quick else "full")
    out = args.out or (os.path.join(RESULTS, "quick") if quick else RESULTS)
    extra = [*(QUICK_OVERRIDES if quick else BENCH_OVERRIDES), *args.override]
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "quick": quick, "search": not args.no_search,
            "lr_only": args.lr_only,
            "select_on_clean": args.select_on_clean,
            "tasks": args.tasks, "settings": [s.key for s in settings], "methods": [m.key for m in methods],
            "seeds": seeds, "lr_multipliers": multipliers, "extra_overrides": extra,
            **({"tsrs_weights": args.tsrs_weights} if args.tsrs_weights else {}),
            **({"distance_ratios": args.distance_ratios} if args.distance_ratios else {}),
            "command": " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])}
    groups = plan.groups
    earlier: list[dict[str, Any]] = []  # without --merge nothing is kept: merge_records returns this call's rows
    if args.merge:
        earlier, earlier_meta = read_results(out)
        meta = merged_meta(meta, earlier_meta, groups)

    if args.report_only:
        records = run_grid(tasks, settings, methods, seeds, multipliers, runs, extra, runner=None,
                           select_on_clean=args.select_on_clean)
    else:
        def progress(recs: list[dict[str, Any]]) -> None:
            write_outputs(merge_records(earlier, recs, groups), meta, out)

        def runner(spec: RunSpec) -> dict[str, Any]:
            return default_runner(spec, keep_adapter=args.keep_adapters)

        records = run_grid(tasks, settings, methods, seeds, multipliers, runs, extra, runner=runner,
                           on_progress=progress, select_on_clean=args.select_on_clean)
    records = merge_records(earlier, records, groups)
    write_outputs(records, meta, out)
    print(markdown_report(records, meta))
    print(f"results: {out}/generalization.{{json,md,png}}")
    return records


if __name__ == "__main__":
    main()
