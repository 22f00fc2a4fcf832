"""``make bench``: the cost benchmark (``benchmarks.overhead``), evidence v2's Fashion-MNIST backbone probe
(``benchmarks.vit_backbone``: results/v2/vit_backbone.*, about 30 min the first time), its epoch budget (``benchmarks.budget``:
results/v2/budget.*, a few hours) and its equal-tuning-budget grid (``benchmarks.evidence``: results/v2/evidence.*,
days on 2 CPU cores; resumable, ``--shard`` for two processes), the recommended recipes it selects
(``benchmarks.recommend``: configs/methods/recommended/) and LLM track (``benchmarks.llm``: results/v2/llm.*,
about an hour; needs ``make llm``), then the generalization runs of :data:`CPU_PLAN`
(the tables committed in ``benchmarks/results/``, about 10-30 h on 2 CPU cores, depending on the machine; resumable).

    python -m benchmarks.run_all                    # all three, as committed
    python -m benchmarks.run_all --only overhead    # minutes
    python -m benchmarks.run_all --only generalization --quick
    python -m benchmarks.run_all --only generalization --generalization-args "--tasks wordnet"   # one custom grid
    python -m benchmarks.run_all --only generalization --generalization-args ""  # the whole grid (30-70 h on CPU)
"""

from __future__ import annotations

import argparse
import shlex
import time
from typing import Optional, Sequence

from . import RESULTS, budget, evidence, generalization, llm, overhead, recommend, vit_backbone
from .methods import cli_methods


def _wordnet(*args: str, out: str = "wordnet") -> tuple[str, ...]:
    """One WordNet call: ``--tasks wordnet ARGS --out results/<out>`` (the table by default, or a probe's folder)."""
    return ("--tasks", "wordnet", *args, "--out", f"{RESULTS}/{out}")


# The generalization grids behind benchmarks/results/{fmnist,wordnet}. Fashion-MNIST ViT (seconds a run): every
# method and setting, 5 seeds, selection on validation (noisy settings reuse the clean 32-shot selection). MiniLM
# (1.5-12 min a run on 2 cores, depending on the machine, the method and the load): 5 seeds at 8 shots (clean, 20% and
# 40% noisy labels), 32 shots and 32 shots with 40% noisy labels; each method at its recipe's configuration except:
# LoRA and LoRA+TSRS at 32 shots select their learning rate on validation (`--lr-only`: the recipe's 5e-3 diverges
# there), full fine-tuning and full+self-labeling at 8 shots select theirs on the clean setting (the recipe's 5e-5
# underfits), PACE full and PACE-fast at 8 clean shots select theirs from {3e-3, 1e-2, 3e-2}, and every method with
# TSRS (LoRA+TSRS, RLRR+TSRS, RLRR+TSRS+PACE-fast) selects TSRS λ from {0.1, 0.03, 0.01} on validation in every
# setting (`--tsrs-weights`). The calls were added one by one to the same table (`--merge`); a call that rewrites all
# of an earlier call's rows replaces it. Run two calls at once with `--threads 1` each on 2 cores.
CPU_PLAN: tuple[tuple[str, ...], ...] = (
    ("--tasks", "fmnist", "--select-on-clean", "--out", f"{RESULTS}/fmnist"),
    _wordnet("--settings", "8", "--no-search",
             *cli_methods("lora+tsrs", "rlrr+tsrs", "rlrr+tsrs+pacefast", "full+selflabel")),
    _wordnet("--settings", "8", "--no-search", *cli_methods("pace", "pace-fast"), "--merge"),
    _wordnet("--settings", "8:0.4", "--no-search", *cli_methods("lora+tsrs"), "--merge"),
    _wordnet("--settings", "8:0.2", "--no-search", *cli_methods("lora+tsrs"), "--merge"),
    _wordnet("--settings", "8:0.4", "--no-search", *cli_methods("pace", "pace-fast", "rlrr+tsrs+pacefast"), "--merge"),
    _wordnet("--settings", "8:0.2", "--no-search", *cli_methods("pace", "pace-fast", "rlrr+tsrs+pacefast"), "--merge"),
    _wordnet("--settings", "32", "--no-search",
             *cli_methods("pace", "pace-fast", "full+selflabel", "rlrr+tsrs+pacefast"), "--merge"),
    _wordnet("--settings", "32:0.4", "--no-search", *cli_methods("pace", "pace-fast", "full+selflabel"), "--merge"),
    _wordnet("--settings", "32", "32:0.4", "--lr-multipliers", "1", "0.4", "0.2", "0.1", "--lr-only",
             "--select-on-clean", *cli_methods("lora+tsrs"), "--merge"),
    _wordnet("--settings", "32:0.4", "--no-search", *cli_methods("rlrr+tsrs+pacefast"), "--merge"),
    _wordnet("--settings", "8", "8:0.2", "8:0.4", "--lr-multipliers", "1", *cli_methods("lora+tsrs"),
             "--tsrs-weights", "0.1", "0.03", "0.01", "--no-counterparts", "--merge"),
    _wordnet("--settings", "32", "32:0.4", "--lr-multipliers", "0.4", *cli_methods("lora+tsrs"),
             "--tsrs-weights", "0.1", "0.03", "0.01", "--no-counterparts", "--merge"),
    _wordnet("--settings", "8:0.4", "32:0.4", "--lr-multipliers", "1", *cli_methods("rlrr+tsrs"),
             "--tsrs-weights", "0.1", "0.03", "0.01", "--no-counterparts", "--merge"),
    _wordnet("--settings", "8", "8:0.2", "8:0.4", "32", "32:0.4", "--lr-multipliers", "1",
             *cli_methods("rlrr+tsrs+pacefast"), "--tsrs-weights", "0.1", "0.03", "0.01", "--no-counterparts",
             "--merge"),
    _wordnet("--settings", "8", "8:0.2", "32", "--lr-multipliers", "1", *cli_methods("rlrr+tsrs"),
             "--tsrs-weights", "0.1", "0.03", "0.01", "--no-counterparts", "--merge"),
    _wordnet("--settings", "8", "8:0.2", "8:0.4", "--lr-multipliers", "1", "3", "10", "20", "--lr-only",
             "--select-on-clean", *cli_methods("full", "full+selflabel"), "--no-counterparts", "--merge"),
    _wordnet("--settings", "8", "--lr-multipliers", "0.3", "1", "3", *cli_methods("pace", "pace-fast"),
             "--no-counterparts", "--merge"),
    # seed-0 probes, each in its own folder: the self-labeling radius ratio at 8 shots (at the selected lr 5e-4), and
    # the learning rate of the PACE methods at 8 shots (they run at RLRR's validation-selected 1e-2 in the table)
    _wordnet("--settings", "8", "--seeds", "0", "--lr-multipliers", "10", "--distance-ratios", "0.05", "0.1", "0.2",
             "0.4", *cli_methods("full+selflabel"), "--no-counterparts", out="wordnet-probe-radius"),
    _wordnet("--settings", "8", "--seeds", "0", "--lr-multipliers", "0.3", "1", "3",
             *cli_methods("pace-base", "pace", "pace-fast"), "--no-counterparts", out="wordnet-probe-adapter-lr"),
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the peft-tsrs benchmarks (cost, then generalization).")
    parser.add_argument("--only", choices=("overhead", "vit_backbone", "budget", "evidence", "recommend", "llm",
                                           "generalization"), default=None,
                        help="run just one of them (budget / evidence: evidence v2's epoch budget / its grid)")
    parser.add_argument("--quick", action="store_true",
                        help="generalization in --quick mode (tiny budget) and a short overhead run (5 steps)")
    parser.add_argument("--overhead-args", default="", help="extra arguments for benchmarks.overhead")
    parser.add_argument("--generalization-args", default=None,
                        help="arguments for ONE benchmarks.generalization call instead of the committed plan "
                             "('' = the whole grid)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.only in (None, "overhead"):
        extra = shlex.split(args.overhead_args)
        if args.quick:
            extra = ["--steps", "5", "--warmup", "1", "--inference-reps", "5", "--out",
                     overhead.RESULTS + "/quick", *extra]
        print("#### benchmarks.overhead", *extra, flush=True)
        overhead.main(extra)
    if not args.quick:  # evidence v2, in order: backbone, budget, grid, LLM track (each resumable)
        steps = (("vit_backbone", vit_backbone), ("budget", budget), ("evidence", evidence), ("recommend", recommend),
                 ("llm", llm))
        for name, module in steps:
            if args.only in (None, name):
                print(f"#### benchmarks.{name}", flush=True)
                module.main([])
    if args.only in (None, "generalization"):
        if args.quick or args.generalization_args is not None:
            plan = [shlex.split(args.generalization_args or "") + (["--quick"] if args.quick else [])]
        else:
            plan = [list(p) for p in CPU_PLAN]
        for extra in plan:
            print("#### benchmarks.generalization", *extra, flush=True)
            generalization.main(extra)
    print(f"benchmarks done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
