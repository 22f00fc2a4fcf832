"""Recommended starting recipes (issue #24): for each task and method, the configuration of the equal-budget grid
(:mod:`benchmarks.evidence`) with the best mean validation accuracy over every finished setting of the task, written
as a method recipe in ``configs/methods/recommended/<task>/`` with what to expect (test accuracy and the paired
difference to the counterpart in each setting, cost per step) in its header. Validation only: test never chooses.

    python -m benchmarks.recommend          # from results/v2/evidence.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from typing import Any, Optional, Sequence

import yaml

from peft_tsrs.app.recipes import deep_merge, parse_override

from . import CONFIGS
from .budget import SCHEDULE, V2_TASKS
from .evidence import BASE_COMPARISONS, OUT
from .methods import EVIDENCE_BY_KEY, Method

RECOMMENDED = os.path.join(CONFIGS, "methods", "recommended")


def file_name(method: str) -> str:
    return method.replace("+", "_") + ".yaml"


def best_config(groups: Sequence[dict[str, Any]]) -> tuple[float, tuple[str, ...], float]:
    """(lr, hparams, mean validation accuracy) of the configuration best over every group's selection runs (one
    method, one task: every setting searched the same grid). Ties: grid order of the first group."""
    scores: dict[tuple[float, tuple[str, ...]], list[float]] = defaultdict(list)
    for g in groups:
        for r in g["selection"]:
            scores[(r["lr"], tuple(r["hparams"]))].append(r["validation_accuracy"])
    most = max(len(v) for v in scores.values())
    complete = {c: v for c, v in scores.items() if len(v) == most}  # searched in every setting
    (lr, hparams), values = max(complete.items(), key=lambda item: statistics.fmean(item[1]))
    return lr, hparams, statistics.fmean(values)


def recipe_dict(task: str, method: Method, lr: float, hparams: Sequence[str]) -> dict[str, Any]:
    """The method file's additions: its overrides, the chosen knob point and learning rate, v2's schedule."""
    data: dict[str, Any] = {"base": os.path.join("..", "..", method.files[0]), "name": f"{method.key}-recommended"}
    for text in (*method.overrides, *method.per_task.get(task, ()), *hparams, f"training.learning_rate={lr}",
                 *SCHEDULE):
        data = deep_merge(data, parse_override(text))
    return data


def _expectations(task: str, key: str, comparisons: Sequence[dict[str, Any]],
                  summaries: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for s in summaries:
        if (s["task"], s["method"]) != (task, key):
            continue
        test, _ = s["test_accuracy"]
        lines.append(f"#   {s['setting']}, {s['epochs']} epochs: test {100 * test:.1f} ± "
                     f"{100 * s['test_accuracy'][1]:.1f}%, {s['seconds_per_step'][0]:.3f} s/step (one thread)")
        for c in comparisons:  # against its counterpart, and a base against the bases it is compared with
            if (c["task"], c["setting"], c["method"]) == (task, s["setting"], key) and (
                    c["counterpart"] == s["counterpart"] or (key, c["counterpart"]) in BASE_COMPARISONS):
                lines.append(f"#     vs {c['counterpart']}: {100 * c['diff_mean']:+.1f} ± {100 * c['diff_std']:.1f} "
                             f"points (p {c['p_t']:.2f}, {c['wins']} wins / {c['losses']} losses)")
    return lines


def render(task: str, method: Method, groups: Sequence[dict[str, Any]], evidence: dict[str, Any]) -> str:
    lr, hparams, val = best_config(groups)
    task_spec = V2_TASKS[task]
    header = [
        f"# Recommended start for {method.label} on {task_spec.label}:",
        f"# the configuration of the v2 equal-budget grid with the best mean validation accuracy ({100 * val:.1f}%)",
        f"# over {', '.join(g['setting'] for g in groups)} × seeds {', '.join(map(str, evidence['select_seeds']))}; "
        f"test accuracy never chose it.",
        "# Written by `python -m benchmarks.recommend` from benchmarks/results/v2/evidence.json: do not edit.",
        "# What to expect (5 fresh seeds at each setting's own selected configuration;",
        "# benchmarks/results/v2/evidence.md):",
        *_expectations(task, method.key, evidence["comparisons"], evidence["summaries"]),
        f"# Run it with your setting's epoch budget (above; here {groups[0]['setting']}'s):",
        f"#   peft-tsrs train configs/tasks/{task_spec.file} \\",
        f"#     configs/methods/recommended/{task}/{file_name(method.key)} \\",
        f"#     --override training.epochs={groups[0]['epochs']}" + "".join(f" {o}" for o in task_spec.overrides),
    ]
    body = yaml.safe_dump(recipe_dict(task, method, lr, hparams), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def expectations(evidence: dict[str, Any]) -> str:
    """``README.md`` of the recommended folder: per task, setting and regularized method, the paired test gain over
    its counterpart, the regime (training accuracy at the end) and the cost per step relative to the counterpart."""
    summary = {(s["task"], s["setting"], s["method"]): s for s in evidence["summaries"]}
    lines = ["# What to expect from each regularizer", "",
             "Written by `python -m benchmarks.recommend` from `benchmarks/results/v2/evidence.json`: do not edit. "
             "Each method at its own validation-selected configuration against its un-regularized counterpart at "
             "its own, both trained until the counterpart fits its training data (the *train* column: the method's "
             "training accuracy at the end), 5 fresh seeds paired by seed. Gain: test accuracy points, mean ± std "
             "of the paired differences; p: paired t-test; cost: seconds per step over the counterpart's. The "
             "recipe of each row is `<task>/<method>.yaml` here.", "",
             "| task | setting | method | vs | gain (points) | p | wins / losses | train % | cost × |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in evidence["comparisons"]:
        method = EVIDENCE_BY_KEY.get(c["method"])
        if method is None or c["counterpart"] != method.counterpart:  # ablations and base-vs-base pairs: elsewhere
            continue
        own = summary[(c["task"], c["setting"], c["method"])]
        cost = own["seconds_per_step"][0] / summary[(c["task"], c["setting"], c["counterpart"])]["seconds_per_step"][0]
        lines.append(f"| {c['task']} | {c['setting']} | {c['method']} | {c['counterpart']} | "
                     f"{100 * c['diff_mean']:+.1f} ± {100 * c['diff_std']:.1f} | {c['p_t']:.3f} | "
                     f"{c['wins']} / {c['losses']} | {100 * own['train_accuracy'][0]:.1f} | {cost:.2f} |")
    return "\n".join(lines) + "\n"


def write(evidence: dict[str, Any], out: str = RECOMMENDED) -> list[str]:
    """One file per (task, method) with a finished group (ablations excluded) and the ``README.md`` of
    :func:`expectations`; the paths written."""
    by_method: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for g in evidence["groups"]:
        if g["method"] in EVIDENCE_BY_KEY and g["selection"]:
            by_method[(g["task"], g["method"])].append(g)
    written = []
    for (task, key), groups in sorted(by_method.items()):
        folder = os.path.join(out, task)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, file_name(key))
        with open(path, "w") as fh:
            fh.write(render(task, EVIDENCE_BY_KEY[key], groups, evidence))
        written.append(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "README.md"), "w") as fh:
        fh.write(expectations(evidence))
    written.append(os.path.join(out, "README.md"))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recommend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--evidence", default=os.path.join(OUT, "evidence.json"))
    args = parser.parse_args(argv)
    with open(args.evidence) as fh:
        for path in write(json.load(fh)):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
