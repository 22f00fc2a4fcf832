"""The numbers of a generalization table, from the run records: mean ± std over seeds per (task, setting, method),
the paired comparison of each regularized method with its counterpart, the best method per setting."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Iterable, Optional, Sequence

from ..methods import GENERALIZATION_METHODS
from ..stats import mean_std, paired_t_test, sign_test
from .grid import Group


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


def best_by_validation(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["shots"], r["label_noise"])].append(r)
    return [max(g, key=lambda r: r["val_mean"]) for _, g in sorted(groups.items())]
