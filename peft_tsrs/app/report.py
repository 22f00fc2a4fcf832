"""Compare finished runs: a Markdown table (mean ± std over seeds) and a PNG bar chart.

Each run is scored by its task's metric (``metrics.json`` ``metric``: accuracy for classification, exact match of
the generated answer for an instruction task). When a run is not scored by accuracy the table names the metric in a
column and adds the score before training (the base model's zero-shot score, recorded by instruction tasks)."""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from typing import Any, Sequence

import yaml

from .plots import plot_comparison
from .run import load_metrics, score


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (std 0 for one value, ``nan`` for none); the benchmarks' tables use it too."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# recipe keys that differ between the seeds of one configuration (and the run folder's place)
_PER_SEED = {"name", "output_dir", "task.seed", "training.seed"}


def _settings(run_dir: str) -> dict[str, Any]:
    """The run's resolved recipe (``recipe.yaml``) flattened to ``section.key: value``, without the per-seed keys."""
    path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    flat = {}
    for key, value in data.items():
        for sub, item in (value.items() if isinstance(value, dict) else [(None, value)]):
            name = key if sub is None else f"{key}.{sub}"
            if name not in _PER_SEED:
                flat[name] = json.dumps(item, sort_keys=True)
    return flat


def collect(run_dirs: list[str]) -> list[dict[str, Any]]:
    """One row per (task, shots, label noise, method, configuration), aggregated over the seeds found. Runs of one
    method whose recipes differ in more than their seeds (e.g. two values of ``pace_weight``) are separate rows,
    labelled with the settings that tell them apart."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    settings: dict[tuple, dict[str, Any]] = {}
    missing = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        if metrics is None:
            missing.append(run_dir)
            continue
        flat = _settings(run_dir)
        key = (metrics["task"], metrics["shots_per_class"], metrics["label_noise"], metrics["method"],
               tuple(sorted(flat.items())))
        groups[key].append(metrics)
        settings[key] = flat
    if not groups:
        raise ValueError(f"no finished run (metrics.json) among: {', '.join(run_dirs) or '(none given)'}")
    rows = []
    for key, runs in groups.items():
        task, shots, noise, method, _ = key
        label = method + _distinction(key, settings)
        test_mean, test_std = mean_std([score(r) for r in runs])
        val_mean, val_std = mean_std([score(r, "validation") for r in runs])
        metric = runs[0].get("metric", "accuracy")
        before = [r["before_training"]["test"][metric] for r in runs if "before_training" in r]
        diag = [r.get("diagnostics", {}) for r in runs]
        rows.append({
            "label": label, "task": task, "shots": shots, "label_noise": noise, "seeds": len(runs), "metric": metric,
            "test_score": test_mean, "test_score_std": test_std,
            "validation_score": val_mean, "validation_score_std": val_std,
            "test_before_training": mean_std(before)[0],
            "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in runs),
            "trainable_parameters": runs[0]["trainable_parameters"],
            "stable_rank": mean_std([d["stable_rank_mean"] for d in diag if "stable_rank_mean" in d])[0],
            "noise_sensitivity": mean_std([d["noise_sensitivity"] for d in diag if "noise_sensitivity" in d])[0],
        })
    rows.sort(key=lambda r: (r["task"], r["shots"], r["label_noise"], r["label"]))
    return rows


def _distinction(key: tuple, settings: dict[tuple, dict[str, Any]]) -> str:
    """`` (pace_weight=0.001, pace_sigma=0.1)``: the settings in which this configuration differs from the other
    configurations of its (task, shots, label noise, method); empty when it is the only one."""
    others = [settings[k] for k in settings if k[:4] == key[:4] and k != key]
    if not others:
        return ""
    mine = settings[key]
    differing = sorted({name for other in others for name in set(mine) | set(other)
                        if mine.get(name) != other.get(name)})
    shown = [f"{name.split('.')[-1]}={json.loads(mine[name]) if name in mine else '-'}" for name in differing]
    return f" ({', '.join(shown)})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    scored = any(r["metric"] != "accuracy" for r in rows)  # not all accuracy: name the metric, add before training
    scores = "metric | test | val | test before training" if scored else "test acc | val acc"
    head = (f"| task | shots | label noise | method | seeds | {scores} | s/step | trainable | "
            "stable rank | noise sens. |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        values = (f"{r['test_score']:.4f} ± {r['test_score_std']:.4f} | "
                  f"{r['validation_score']:.4f} ± {r['validation_score_std']:.4f} |")
        if scored:
            values = f"{r['metric'].replace('_', ' ')} | {values} {r['test_before_training']:.4f} |"
        lines.append(
            f"| {r['task']} | {r['shots']} | {r['label_noise']:.0%} | {r['label']} | {r['seeds']} | {values} "
            f"{r['seconds_per_step']:.3f} | "
            f"{r['trainable_parameters']:,} | {r['stable_rank']:.2f} | {r['noise_sensitivity']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str], output_dir: str) -> str:
    """Write ``report.md`` and ``comparison.png`` into ``output_dir``; returns the Markdown table."""
    rows = collect(run_dirs)
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(rows)
    with open(os.path.join(output_dir, "report.md"), "w") as fh:
        fh.write("# peft-tsrs run comparison\n\n" + table)
    plot_comparison(rows, os.path.join(output_dir, "comparison.png"), metric="test_score")
    return table
