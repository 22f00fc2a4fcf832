"""Rendering a generalization table: ``generalization.md`` and ``generalization.png`` from the run records and the
call's meta (nothing here trains or reads run folders); the report's prose is ``benchmarks/notes/generalization.md``."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional, Sequence

from ..methods import FIXED_IN, GENERALIZATION_BY_KEY, GENERALIZATION_METHODS, TSRS_WEIGHTS, is_stale
from ..notes import note
from .calls import parse_command
from .grid import TASKS, Setting
from .tables import aggregate, best_by_validation, group_key, paired_comparisons


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


def _note(key: str, **values: Any) -> str:
    return note("generalization", key, **values)


def selection_text(meta: dict[str, Any]) -> str:
    """How the configurations of a call were chosen, from its ``meta``."""
    weights, ratios = meta.get("tsrs_weights"), meta.get("distance_ratios")
    if not meta.get("search", True):
        text = _note("Protocol / no search", weights=_weights_text(weights, True), ratios=_ratios_text(ratios, True))
    elif meta.get("lr_only"):
        text = _note("Protocol / learning rate only", multipliers=meta.get("lr_multipliers"),
                     weights=_weights_text(weights, True), ratios=_ratios_text(ratios, True))
    else:
        text = _note("Protocol / search", multipliers=meta.get("lr_multipliers"),
                     weights=_weights_text(weights, False), ratios=_ratios_text(ratios, False))
    if meta.get("select_on_clean"):
        text += _note("Protocol / select on clean")
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


def stale_methods(records: Sequence[dict[str, Any]]) -> list[str]:
    """The methods (table order) with a run recorded before the fixes that changed them (``methods.is_stale``)."""
    stale = {r["method"] for r in records
             if r["method"] in GENERALIZATION_BY_KEY and is_stale(GENERALIZATION_BY_KEY[r["method"]], r)}
    return [m.key for m in GENERALIZATION_METHODS if m.key in stale]


def stale_lines(stale: Sequence[str]) -> list[str]:
    """The note under the protocol that says which rows are stale and why ([] when none is)."""
    if not stale:
        return []
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key in stale:
        by_reason[GENERALIZATION_BY_KEY[key].changed].append(GENERALIZATION_BY_KEY[key].label)
    reasons = " ".join(_note("Stale / method", labels=", ".join(labels), changed=changed)
                       for changed, labels in by_reason.items())
    return [_note("Stale", fixed_in=FIXED_IN, reasons=reasons), ""]


def markdown_report(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    rows = aggregate(records)
    pairs = {(p["task"], p["shots"], p["label_noise"], p["method"]): p for p in paired_comparisons(records)}
    stale = stale_methods(records)
    labels = {m.key: m.label + (" †" if m.key in stale else "") for m in GENERALIZATION_METHODS}
    lines = ["# Generalization (`python -m benchmarks.generalization`)", ""]
    if meta.get("quick"):
        lines += [_note("Quick mode"), ""]
    earlier = "".join(" " + _note("Protocol / earlier call", date=c["date"], command=c["command"],
                                  how=call_protocol(c["command"])) for c in meta.get("earlier_calls", []))
    lines += [_note("Protocol", date=meta.get("date", ""), command=meta.get("command", ""), seeds=meta.get("seeds"),
                    selection=selection_text(meta), earlier_calls=earlier), ""]
    lines += stale_lines(stale)
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
    lines += ["", _note("Run count", runs=len(records), selection_runs=n_sel)]
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


def plot(records: list[dict[str, Any]], path: str) -> Optional[str]:
    """One panel per (task, setting): test accuracy mean ± std per method."""
    rows = aggregate(records)
    if not rows:
        return None
    stale = set(stale_methods(records))
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
        ax.set_xticks(range(len(group)), [r["method"] + (" †" if r["method"] in stale else "") for r in group],
                      rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task}: {Setting(shots, noise).label}", fontsize=9)
        ax.set_ylabel("test accuracy (%)")
        low = min(m - e for m, e in zip(means, errs))
        ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + e for m, e in zip(means, errs)) + 3))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("test accuracy, mean ± std over seeds (orange: regularized, blue: un-regularized)"
                 + ("; † stale: measured before the method changed" if stale else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
