"""Compare finished runs: a Markdown table (mean ± std over seeds) and a PNG bar chart.

Each run is scored by its task's metric (``metrics.json`` ``metric``: accuracy for classification, exact match of
the generated answer for an instruction task). When a run is not scored by accuracy the table names the metric in a
column and adds the score before training (the base model's zero-shot score, recorded by instruction tasks)."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from typing import Any, Sequence

from .plots import plot_comparison
from .run import load_metrics, score


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (std 0 for one value, ``nan`` for none); the benchmarks' tables use it too."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(run_dirs: list[str]) -> list[dict[str, Any]]:
    """One row per (task, shots, label noise, method), aggregated over the seeds found."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    missing = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        if metrics is None:
            missing.append(run_dir)
            continue
        key = (metrics["task"], metrics["shots_per_class"], metrics["label_noise"], metrics["method"])
        groups[key].append(metrics)
    if not groups:
        raise ValueError(f"no finished run (metrics.json) among: {', '.join(run_dirs) or '(none given)'}")
    rows = []
    for (task, shots, noise, method), runs in groups.items():
        test_mean, test_std = mean_std([score(r) for r in runs])
        val_mean, val_std = mean_std([score(r, "validation") for r in runs])
        metric = runs[0].get("metric", "accuracy")
        before = [r["before_training"]["test"][metric] for r in runs if "before_training" in r]
        diag = [r.get("diagnostics", {}) for r in runs]
        rows.append({
            "label": method, "task": task, "shots": shots, "label_noise": noise, "seeds": len(runs), "metric": metric,
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
