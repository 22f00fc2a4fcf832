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

The parts: ``grid`` (tasks, settings, one run's spec), ``calls`` (the command line and the grid a call plans),
``running`` (training, resuming and locking the runs, selection on validation), ``tables`` (mean ± std and the paired
tests), ``report`` (Markdown and plot, prose from ``benchmarks/notes/generalization.md``), ``results``
(generalization.json: read, merge, write); the methods come from ``benchmarks.methods``.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any, Optional, Sequence

from .. import RESULTS, ROOT
from .calls import COMMAND, build_parser, plan_call
from .grid import BENCH_OVERRIDES, QUICK_OVERRIDES, RunSpec
from .report import markdown_report
from .results import merge_records, merged_meta, read_results, write_outputs
from .running import default_runner, run_grid

RUNS = os.path.join(ROOT, "benchmarks", "runs")


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """One call: plan it, run (or, ``--report-only``, read) its runs, write ``<out>/generalization.*``; its records."""
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
