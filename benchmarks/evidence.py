"""Evidence v2, step 2 (issue #24): every method in the converged regime with an equal tuning budget.

Each (task, setting) trains at the epoch budget step 1 chose (``results/v2/budget.json``: the un-regularized bases
fit their training labels there), cosine schedule after 10% warm-up, the official symmetric label noise. Every
method gets the same number of validation-selected configurations, :data:`CONFIGS_PER_METHOD`: a regularized method
3 learning rates × 3 points of its own knob (``benchmarks.methods.EVIDENCE_METHODS``), a base 9 learning rates over
the same range. A configuration's score is its mean validation accuracy over :data:`SELECT_SEEDS` (ties: lower mean
validation loss, then grid order); the chosen one then trains :data:`FINAL_SEEDS`, fresh seeds shared by every
method, so a method and its counterpart pair seed by seed (same few-shot sample, same label noise). Test accuracy is
never used to select.

A group is one (task, setting, method); the plan (:data:`PLAN`) runs groups in order, the comparisons of the issue's
targets first. Resumable (a finished run is read from its folder) and shareable: ``--shard i/n`` processes train every
n-th pending run of a group from the i-th, then any run of it nobody holds, and only then wait for the runs other
processes hold (read when they finish). After a method with several terms, the plan runs its ablations
(:data:`ABLATIONS`: one term off, at the method's selected configuration, on the final seeds). ``--report`` writes ``results/v2/evidence.{json,md}`` from whatever has
finished, without training::

    OMP_NUM_THREADS=1 python -m benchmarks.evidence --shard 0/2 &
    OMP_NUM_THREADS=1 python -m benchmarks.evidence --shard 1/2 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from . import RESULTS, ROOT
from .budget import NOISE_TYPE, SCHEDULE, SELECTED_LR, SETTINGS, V2_TASKS
from .generalization.grid import BENCH_OVERRIDES, RunSpec, Setting, default_lr, lr_grid, spec_for
from .generalization.running import default_runner, execute
from .ledger import add_grid_arguments, ledger_for, restore
from .methods import EVIDENCE_BY_KEY, Method
from .stats import mean_std, paired_t_test, sign_test

OUT = os.path.join(RESULTS, "v2")
RUNS = os.path.join(ROOT, "runs", "bench-v2", "evidence")
BUDGET_FILE = os.path.join(OUT, "budget.json")
SELECT_SEEDS = (0, 1)
FINAL_SEEDS = (10, 11, 12, 13, 14)
REGULARIZED_LR_MULTIPLIERS = (0.3, 1.0, 3.0)
BASE_LR_MULTIPLIERS = (0.3, 0.4, 0.55, 0.75, 1.0, 1.35, 1.8, 2.4, 3.0)  # log-spaced over the same range
CONFIGS_PER_METHOD = 9

# comparisons first as the issue lists its targets; a method's counterpart before it
_CLEAN = ("lora", "lora+pace", "pace-base", "pace", "rlrr", "rlrr+tsrs", "lora+tsrs", "full", "full+tsrs", "lora-r1",
          "lora-r2")
_NOISY = ("full", "full+selflabel", "pace-base", "pace", "lora", "lora+pace", "rlrr", "rlrr+tsrs", "lora+tsrs",
          "full+tsrs", "lora-r1", "lora-r2")
# RLRR loses to LoRA on the ViT: do the two defaults that differ from the official ViT code explain it? RLRR with SSF
# (always on there) and with the official Kaiming init, each a base with its own learning-rate search; on text (no
# official code) the init only
_OFFICIAL_RLRR = {"fmnist": ("rlrr+ssf", "rlrr-kaiming"), "wordnet": ("rlrr-kaiming",)}
PLAN: tuple[tuple[str, Setting, str], ...] = tuple(
    (task, setting, method) for task in ("wordnet", "fmnist") for setting in SETTINGS[task]
    for method in (_NOISY if setting.noise else _CLEAN + _OFFICIAL_RLRR[task]))


# compared besides each regularized method against its counterpart: the bases against each other (RLRR vs LoRA vs
# full fine-tuning, and RLRR against LoRA at ranks 1 and 2, which bracket its trainable parameter count; the summary
# gives each one's)
BASE_COMPARISONS = (("rlrr", "lora"), ("rlrr", "full"), ("lora", "full"), ("rlrr", "lora-r1"), ("rlrr", "lora-r2"),
                    *((variant, other) for variant in dict.fromkeys(v for vs in _OFFICIAL_RLRR.values() for v in vs)
                      for other in ("rlrr", "lora", "lora-r1", "lora-r2")))


@dataclass(frozen=True)
class Ablation:
    """A regularized method with one of its terms switched off, at the configuration its group selected (no search
    of its own), on the same final seeds: paired with the full method and with the method's counterpart, it says
    which term costs or brings what."""
    key: str  # its run folder under the setting
    parent: str  # the regularized method (a key of EVIDENCE_BY_KEY)
    label: str
    overrides: tuple[str, ...]  # applied last, over the parent's recipe, selected configuration and schedule


# methods with two or more terms; a single-term regularizer (TSRS on RLRR / LoRA) is ablated by its counterpart
ABLATIONS: tuple[Ablation, ...] = (
    Ablation("pace-no-consistency", "pace", "PACE adapter noise, no consistency term",
             ("regularizers.pace_weight=0",)),
    Ablation("lora+pace-no-consistency", "lora+pace", "PACE's noise on LoRA, no consistency term",
             ("regularizers.pace_weight=0",)),
    Ablation("full+tsrs-no-bss", "full+tsrs", "full FT + TSRS without BSS", ("regularizers.bss_weight=0",)),
    Ablation("full+tsrs-bss-only", "full+tsrs", "full FT + BSS without the TSRS term",
             ("regularizers.tsrs_weight=0",)),
    Ablation("full+selflabel-distance-only", "full+selflabel", "distance constraint only",
             ("regularizers.label_correction_threshold=null", "regularizers.reweight_start_epoch=null")),
    Ablation("full+selflabel-no-correction", "full+selflabel", "distance + reweighting, no label correction",
             ("regularizers.label_correction_threshold=null",)),
    Ablation("full+selflabel-no-reweighting", "full+selflabel", "distance + label correction, no reweighting",
             ("regularizers.reweight_start_epoch=null",)),
)
ABLATION_BY_KEY = {a.key: a for a in ABLATIONS}
PLAN = tuple((task, setting, key) for task, setting, key in PLAN for key in
             (key, *(a.key for a in ABLATIONS if a.parent == key)))  # each ablation right after its method


@dataclass(frozen=True)
class Config:
    lr: float
    hparams: tuple[str, ...]


def budget_epochs(task: str, setting: Setting, path: str = BUDGET_FILE) -> Optional[int]:
    """The setting's epoch budget from step 1 (``None`` while step 1 has not fixed it)."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)["budgets"].get(f"{task}/{setting.key}")


def centre_lr(task: str, method: Method) -> float:
    """The centre of the method's learning-rate range: step 1's rate of its base (a regularized method is centred
    where its counterpart is)."""
    base = method.counterpart or method.key
    return SELECTED_LR.get((task, base)) or default_lr(V2_TASKS[task], EVIDENCE_BY_KEY[base])


def configs(task: str, method: Method) -> list[Config]:
    """The method's :data:`CONFIGS_PER_METHOD` candidate configurations, in grid (tie-breaking) order."""
    centre = centre_lr(task, method)
    if method.hparams == ((),):
        out = [Config(lr, ()) for lr in lr_grid(centre, BASE_LR_MULTIPLIERS)]
    else:
        out = [Config(lr, hp) for hp in method.hparams for lr in lr_grid(centre, REGULARIZED_LR_MULTIPLIERS)]
    if len(out) != CONFIGS_PER_METHOD:
        raise ValueError(f"{method.key}: {len(out)} configurations, the equal tuning budget is {CONFIGS_PER_METHOD}")
    return out


def _uses_self_labeling(method: Method) -> bool:
    return any("label_correction" in h for point in method.hparams for h in point)


def spec(task: str, setting: Setting, method: Method, config: Config, seed: int, epochs: int,
         runs: str = RUNS, last: Sequence[str] = ()) -> RunSpec:
    """One run: the method's recipe on the task at ``config`` and ``seed``, ``epochs`` epochs, cosine schedule;
    ``last``: overrides over all of that (an ablation's)."""
    extra = [*BENCH_OVERRIDES, *SCHEDULE, f"training.epochs={epochs}", NOISE_TYPE]
    if _uses_self_labeling(method):  # the paper's epochs 10 and 5 of 30, scaled to the budget
        extra += [f"regularizers.label_correction_start_epoch={max(1, round(epochs / 3))}",
                  f"regularizers.reweight_start_epoch={max(1, round(epochs / 6))}"]
    extra += list(last)
    phase = "select" if seed in SELECT_SEEDS else "final"
    return spec_for(runs, V2_TASKS[task], setting, method, config.lr, config.hparams, seed, phase, extra)


def _row(s: RunSpec, metrics: dict[str, Any]) -> dict[str, Any]:
    """One run's line; ``*_accuracy`` is the task's score (``metrics["metric"]``: exact match on a generative task)."""
    score = metrics.get("metric", "accuracy")
    train = metrics.get("train_end") or {}
    return {
        "task": s.task, "setting": s.setting.key, "method": s.method, "phase": s.phase, "seed": s.seed,
        "config": s.config_tag, "lr": s.lr, "hparams": list(s.hparams),
        "train_accuracy": train.get(score), "train_loss": train.get("loss"),
        "validation_accuracy": metrics["validation"][score], "validation_loss": metrics["validation"].get("loss"),
        "test_accuracy": metrics["test"][score], "generalization_gap": metrics.get("generalization_gap"),
        "seconds_per_step": metrics.get("seconds_per_step"), "train_steps": metrics.get("train_steps"),
        "peak_memory_mb": metrics.get("peak_memory_mb"), "trainable_parameters": metrics.get("trainable_parameters"),
        "run_dir": os.path.relpath(s.run_dir, ROOT),
    }


def _run_all(specs: Sequence[RunSpec], shard: tuple[int, int], runner: Optional[Callable[[RunSpec], dict[str, Any]]],
             runs: str) -> list[Optional[dict[str, Any]]]:
    """Metrics of every spec: this shard's share first, then the rest nobody is training, then (waited for) the
    runs other shards were still training. No shard waits while a run of the group is left to start."""
    index, count = shard
    ledger = ledger_for(runs)
    if runner is not None:
        for s in [*specs[index::count], *specs]:
            execute(s, runner, ledger=ledger, wait=False)
    return [execute(s, runner, ledger=ledger) for s in specs]


def choose(rows: Sequence[dict[str, Any]], candidates: Sequence[Config]) -> Config:
    """The configuration with the best mean validation accuracy over the selection seeds (ties: lower mean
    validation loss, then grid order)."""
    def score(i_config: tuple[int, Config]) -> tuple[float, float, int]:
        i, config = i_config
        own = [r for r in rows if r["lr"] == config.lr and tuple(r["hparams"]) == config.hparams]
        losses = [r["validation_loss"] for r in own if r["validation_loss"] is not None]
        return (-statistics.fmean(r["validation_accuracy"] for r in own),
                statistics.fmean(losses) if losses else math.inf, i)

    return min(enumerate(candidates), key=score)[1]


def run_group(task: str, setting: Setting, method: Method, epochs: int, shard: tuple[int, int] = (0, 1),
              runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner,
              runs: str = RUNS) -> Optional[dict[str, Any]]:
    """Selection then final seeds of one group; ``None`` while unfinished (``runner=None``: read only)."""
    candidates = configs(task, method)
    select = [spec(task, setting, method, c, seed, epochs, runs) for c in candidates for seed in SELECT_SEEDS]
    results = _run_all(select, shard, runner, runs)
    if any(m is None for m in results):
        return None
    select_rows = [_row(s, m) for s, m in zip(select, results)]
    chosen = choose(select_rows, candidates)
    final = [spec(task, setting, method, chosen, seed, epochs, runs) for seed in FINAL_SEEDS]
    results = _run_all(final, shard, runner, runs)
    if any(m is None for m in results):
        return None
    group = {"task": task, "setting": setting.key, "method": method.key, "counterpart": method.counterpart,
             "epochs": epochs, "selected": {"lr": chosen.lr, "hparams": list(chosen.hparams)},
             "selection": select_rows, "final": [_row(s, m) for s, m in zip(final, results)]}
    check = edge_check(task, setting, method, group, epochs, shard, runner, runs)
    if check is not None:
        group["edge_check"] = check
    return group


def edge_check(task: str, setting: Setting, method: Method, group: dict[str, Any], epochs: int,
               shard: tuple[int, int], runner: Optional[Callable[[RunSpec], dict[str, Any]]],
               runs: str) -> Optional[dict[str, Any]]:
    """When the selected learning rate is an edge of the grid: the selection seeds one grid step beyond it (up from
    the top, down from the bottom), at the selected knob point. A diagnosis only (the selection keeps the equal
    budget): it says whether the method's optimum lay beyond the searched range. ``None`` for an interior choice,
    or while its runs are unfinished."""
    edge = lr_edge(group)
    if edge is None:
        return None
    lrs = sorted({r["lr"] for r in group["selection"]})
    end, next_in = (lrs[-1], lrs[-2]) if edge == "high" else (lrs[0], lrs[1])
    beyond = float(f"{end * end / next_in:.3g}")  # one grid step past the edge
    chosen = Config(group["selected"]["lr"], tuple(group["selected"]["hparams"]))
    specs = [spec(task, setting, method, replace(chosen, lr=beyond), seed, epochs, runs) for seed in SELECT_SEEDS]
    results = _run_all(specs, shard, runner, runs)
    if any(m is None for m in results):
        return None
    selected = [r["validation_accuracy"] for r in group["selection"]
                if r["lr"] == chosen.lr and tuple(r["hparams"]) == chosen.hparams]
    return {"lr": beyond, "validation_accuracy": statistics.fmean(_row(s, m)["validation_accuracy"]
                                                                  for s, m in zip(specs, results)),
            "selected_validation_accuracy": statistics.fmean(selected)}


def run_ablation(task: str, setting: Setting, ablation: Ablation, epochs: int, shard: tuple[int, int] = (0, 1),
                 runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner,
                 runs: str = RUNS) -> Optional[dict[str, Any]]:
    """The final seeds of ``ablation`` at its parent group's selected configuration; ``None`` while the parent or
    one of its own runs is unfinished."""
    parent = run_group(task, setting, EVIDENCE_BY_KEY[ablation.parent], epochs, runner=None, runs=runs)
    if parent is None:
        return None
    chosen = Config(parent["selected"]["lr"], tuple(parent["selected"]["hparams"]))
    method = replace(EVIDENCE_BY_KEY[ablation.parent], key=ablation.key)
    final = [spec(task, setting, method, chosen, seed, epochs, runs, last=ablation.overrides) for seed in FINAL_SEEDS]
    results = _run_all(final, shard, runner, runs)
    if any(m is None for m in results):
        return None
    return {"task": task, "setting": setting.key, "method": ablation.key, "counterpart": ablation.parent,
            "ablates": list(ablation.overrides), "epochs": epochs,
            "selected": {"lr": chosen.lr, "hparams": list(chosen.hparams)}, "selection": [],
            "final": [_row(s, m) for s, m in zip(final, results)]}


def run_any(task: str, setting: Setting, key: str, epochs: int, shard: tuple[int, int] = (0, 1),
            runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner,
            runs: str = RUNS) -> Optional[dict[str, Any]]:
    """One entry of :data:`PLAN`: a method's group or an ablation."""
    if key in ABLATION_BY_KEY:
        return run_ablation(task, setting, ABLATION_BY_KEY[key], epochs, shard, runner, runs)
    return run_group(task, setting, EVIDENCE_BY_KEY[key], epochs, shard, runner, runs)


def lr_edge(group: dict[str, Any]) -> Optional[str]:
    """``"high"``/``"low"`` when the selected learning rate is the highest/lowest of the group's grid: the optimum
    may lie outside the searched range (kept anyway: every method gets the same budget)."""
    lrs = [r["lr"] for r in group.get("selection", ())]  # none: no learning-rate grid (the LLM track)
    if len(set(lrs)) < 2:
        return None
    chosen = group["selected"]["lr"]
    return "high" if chosen == max(lrs) else "low" if chosen == min(lrs) else None


def summarize(group: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std over the final seeds of one group."""
    out: dict[str, Any] = {k: group[k] for k in ("task", "setting", "method", "counterpart", "epochs", "selected")}
    out["selected_config"] = group["final"][0]["config"]
    out["selected_lr_edge"] = lr_edge(group)
    out["edge_check"] = group.get("edge_check")
    out["trainable_parameters"] = group["final"][0].get("trainable_parameters")
    for key in ("train_accuracy", "validation_accuracy", "test_accuracy", "generalization_gap", "seconds_per_step",
                "peak_memory_mb"):
        values = [r[key] for r in group["final"] if r[key] is not None]
        out[key] = mean_std(values) if values else (float("nan"), float("nan"))
    return out


def paired_differences(group: dict[str, Any], base: dict[str, Any]) -> list[float]:
    """Test accuracy of ``group`` minus ``base``'s, final seed by final seed (seeds both have)."""
    by_seed = {r["seed"]: r["test_accuracy"] for r in base["final"]}
    return [r["test_accuracy"] - by_seed[r["seed"]] for r in group["final"] if r["seed"] in by_seed]


def compare(group: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy of a method against its counterpart, paired by final seed."""
    diffs = paired_differences(group, base)
    t, p = paired_t_test(diffs)
    wins, losses, p_sign = sign_test(diffs)
    mean, std = mean_std(diffs)
    return {"task": group["task"], "setting": group["setting"], "method": group["method"],
            "counterpart": base["method"], "n": len(diffs), "diff_mean": mean, "diff_std": std, "t": t, "p_t": p,
            "wins": wins, "losses": losses, "p_sign": p_sign}


def _pm(pair: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = pair
    return "–" if math.isnan(mean) else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


_EDGE_MARK = {"high": " ↑", "low": " ↓", None: ""}


def markdown(summaries: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]]) -> str:
    lines = ["# Evidence v2, step 2: the converged regime, equal tuning budget", "",
             f"Each setting at its step-1 epoch budget (cosine after 10% warm-up). Every method: "
             f"{CONFIGS_PER_METHOD} configurations (regularized: 3 learning rates × 3 points of its knob; bases: 9 "
             f"learning rates over the same range), chosen on the mean validation accuracy of seeds "
             f"{', '.join(map(str, SELECT_SEEDS))}; then fresh seeds {', '.join(map(str, FINAL_SEEDS))}. Accuracies "
             f"in %, mean ± std over the final seeds; train acc is the model as training left it on its (noisy) "
             f"training labels. ↑ / ↓: the selected learning rate is the highest / lowest of the method's grid (its "
             f"optimum may lie outside the searched range). Written by `python -m benchmarks.evidence` from "
             f"`evidence.json`.", "",
             "| task | setting | epochs | method | trainable | selected | train acc | val acc | test acc | gap | s/step "
             "| peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['task']} | {s['setting']} | {s['epochs']} | {s['method']} | "
                     f"{s['trainable_parameters'] or '?'} | {s['selected_config']}{_EDGE_MARK[s.get('selected_lr_edge')]} | "
                     f"{_pm(s['train_accuracy'])} | {_pm(s['validation_accuracy'])} | {_pm(s['test_accuracy'])} | "
                     f"{_pm(s['generalization_gap'])} | {s['seconds_per_step'][0]:.3f} | "
                     f"{s['peak_memory_mb'][0]:.0f} |")
    checked = [s for s in summaries if s.get("edge_check")]
    if checked:
        lines += ["", "Edge checks (↑ / ↓ groups): the selection seeds one grid step beyond the edge, at the selected "
                  "knob point — whether the optimum lay beyond the range (a diagnosis; the selection is not changed):",
                  "",
                  "| task | setting | method | selected lr | val acc there | next lr | val acc there |",
                  "|---|---|---|---|---|---|---|"]
        for s in checked:
            e = s["edge_check"]
            lines.append(f"| {s['task']} | {s['setting']} | {s['method']} | {s['selected']['lr']:.3g} | "
                         f"{100 * e['selected_validation_accuracy']:.1f} | {e['lr']:.3g} | "
                         f"{100 * e['validation_accuracy']:.1f} |")
    lines += ["", "Paired by seed against the counterpart (test accuracy, points). An ablation (`<method>-no-…`, "
              "`-…-only`: one term off at its method's selected configuration, no search of its own) is paired with "
              "its method and with the method's counterpart:", "",
              "| task | setting | method | vs | Δ mean ± std | t | p (t) | wins / losses | p (sign) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['task']} | {c['setting']} | {c['method']} | {c['counterpart']} | "
                     f"{100 * c['diff_mean']:+.1f} ± {100 * c['diff_std']:.1f} | {c['t']:.2f} | {c['p_t']:.3f} | "
                     f"{c['wins']} / {c['losses']} | {c['p_sign']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(groups: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]], path: str) -> Optional[str]:
    """``evidence.png``: one panel per (task, setting), one row per comparison (a method or ablation with its
    counterpart, the bases with each other): each seed's paired test difference as a dot, their mean as a bar;
    ``None`` when there is nothing to draw."""
    if not comparisons:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(g["task"], g["setting"], g["method"]): g for g in groups}
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in comparisons:
        panels.setdefault((c["task"], c["setting"]), []).append(c)
    most = max(map(len, panels.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 0.32 * most + 1.6), squeeze=False)
    for ax, ((task, setting), rows) in zip(axes.flat, panels.items()):
        for y, c in enumerate(rows):
            diffs = [100 * d for d in paired_differences(by_key[(task, setting, c["method"])],
                                                         by_key[(task, setting, c["counterpart"])])]
            color = "#55a868" if c["diff_mean"] > 0 and c["p_t"] < 0.05 else "#4c72b0"
            ax.barh(y, 100 * c["diff_mean"], color=color, alpha=0.5, height=0.7)
            ax.plot(diffs, [y] * len(diffs), "o", color="black", markersize=2.5)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [f"{c['method']} vs {c['counterpart']}" for c in rows], fontsize=7)
        ax.set_ylim(most - 0.5, -0.5)  # rows of every panel the same height, from the top
        ax.set_xlabel("test accuracy difference (points)")
        ax.set_title(f"{task}, {setting}", fontsize=9)
    fig.suptitle("paired by seed: dots are seeds, bars the mean (green: > 0 with p < 0.05)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(groups: Sequence[dict[str, Any]], out: str = OUT) -> None:
    """``evidence.json`` (every run, the summaries and comparisons), ``evidence.md`` and ``evidence.png`` from
    finished groups."""
    summaries = [summarize(g) for g in groups]
    by_key = {(g["task"], g["setting"], g["method"]): g for g in groups}
    pairs = [(g["method"], g["counterpart"]) for g in groups if g["counterpart"]] + list(BASE_COMPARISONS)
    pairs += [(a.key, EVIDENCE_BY_KEY[a.parent].counterpart) for a in ABLATIONS]  # a term off: vs the base too
    comparisons = [compare(g, by_key[(g["task"], g["setting"], other)]) for g in groups for method, other in
                   dict.fromkeys(pairs) if g["method"] == method and (g["task"], g["setting"], other) in by_key]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "evidence.json"), "w") as fh:
        json.dump({"select_seeds": list(SELECT_SEEDS), "final_seeds": list(FINAL_SEEDS),
                   "configs_per_method": CONFIGS_PER_METHOD, "summaries": summaries, "comparisons": comparisons,
                   "groups": list(groups)}, fh, indent=1)
    with open(os.path.join(out, "evidence.md"), "w") as fh:
        fh.write(markdown(summaries, comparisons))
    plot(groups, comparisons, os.path.join(out, "evidence.png"))


def restore_ledger(report: str = os.path.join(OUT, "evidence.json"), runs: str = RUNS) -> int:
    """Record in the ledger the runs of a written report (selection and final rows) that it lacks: for reports
    written before the ledger existed. Edge checks keep only their means in a report: their runs train again."""
    with open(report) as fh:
        groups = json.load(fh)["groups"]
    return restore(ledger_for(runs), (r for g in groups for r in (*g["selection"], *g["final"])))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=None, choices=[*EVIDENCE_BY_KEY, *ABLATION_BY_KEY],
                        help="only these methods' groups (default: the whole plan)")
    add_grid_arguments(parser, "i/n: this process trains every n-th pending run of a group", "evidence.json")
    args = parser.parse_args(argv)
    if args.restore_ledger:
        print(f"ledger: {restore_ledger()} runs restored from {os.path.join(OUT, 'evidence.json')}")
    shard = tuple(int(x) for x in args.shard.split("/"))
    plan = [(t, s, m) for t, s, m in PLAN if t in args.tasks and (args.methods is None or m in args.methods)]
    for task, setting, key in plan:
        epochs = budget_epochs(task, setting)
        if epochs is None or args.report:
            continue
        print(f"== {task} / {setting.key} / {key} ({epochs} epochs)", flush=True)
        run_any(task, setting, key, epochs, shard)  # type: ignore[arg-type]
    groups = []
    for task, setting, key in PLAN:  # the report holds every finished group, whatever this call trained
        epochs = budget_epochs(task, setting)
        group = None if epochs is None else run_any(task, setting, key, epochs, runner=None)
        if group is not None:
            groups.append(group)
    write(groups)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
