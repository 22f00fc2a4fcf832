"""What the regularizers cost: per-step training time and peak memory of every method relative to its
un-regularized base, and inference after ``merge_and_unload`` relative to the plain model — measured in ONE process.

For each model (MiniLM on a WordNet batch of 16; the Fashion-MNIST ViT on a batch of 64) every method is built
from the recipe files in ``configs/`` exactly as ``peft_tsrs.app.run.run_recipe`` builds it (``build_task``,
``build_model``, ``apply_adapter``, ``RegularizedTrainer``), all on the same fixed batch. One
timed step is what the HF training loop does per batch::

    trainer.training_step(model, batch)        # RegularizedTrainer.compute_loss (all regularizer terms) + backward
    clip_grad_norm_(params, max_grad_norm)     # as Trainer does (max_grad_norm 1.0)
    optimizer.step()                           # AdamW built by trainer.create_optimizer()
    callback_handler.on_optimizer_step(...)    # the distance projection (_ProjectAfterStep) where on
    optimizer.zero_grad(set_to_none=True)

Timing: warm-up rounds, then ``--steps`` rounds; each round runs one step of every method (round-robin, the
start rotated every round), garbage collection off inside a round. Per method the median step time; the ratio
to its base is the ratio of medians (and, as a check against load drift on a shared machine, the median of the
per-round ratios). Peak memory: one profiled step per method with ``torch.profiler`` (``profile_memory=True``):
the allocation/free events of CPU tensors in time order, cumulated — the peak of live tensor bytes allocated
during the step above what was alive before it (activations, gradients, temporaries); ``persistent`` adds the
bytes alive between steps (parameters, buffers, optimizer state, distance anchors, PACE-fast store, labels).

    python -m benchmarks.overhead                      # both models, writes benchmarks/results/overhead.{json,md}
    python -m benchmarks.overhead --models vit --steps 5 --warmup 1 --out /tmp/oh   # a quick look

The parts: ``plan`` (the models, the checks and their targets), ``build`` (each method built as a run builds it, one
optimizer step), ``measure`` (timing, memory, op profiles, inference), ``report`` (overhead.md) and ``analysis`` (its
prose, from ``benchmarks/notes/overhead.md``); the methods come from ``benchmarks.methods``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence

from .. import RESULTS
from ..methods import OVERHEAD_BY_KEY, OVERHEAD_METHODS
from ..notes import note
from .build import quiet_libraries
from .measure import run_model
from .plan import CHECKS, MODELS
from .report import summary_rows, write_report

COMMAND = "python -m benchmarks.overhead"  # how a call is recorded in the results' meta


def _loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages of the machine (other jobs included), where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _meta(args) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch_threads": torch.get_num_threads(), "steps": args.steps,
        "warmup": args.warmup, "inference_reps": args.inference_reps,
        "load_average_start": _loadavg(),
        "memory_method": note("overhead", "Memory method"),
        "command": " ".join([COMMAND, *sys.argv[1:]]),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Measure (or, ``--report-only``, re-render) and write ``<out>/overhead.{json,md}``; the results."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, help="method keys (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (>= 20 for the report)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inference-reps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a CPU shared with other jobs, 2 OpenMP threads "
                             "stall for seconds whenever a core is taken; 1 thread gives stable ratios)")
    parser.add_argument("--out", default=RESULTS, help="folder for overhead.json and overhead.md")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite overhead.md (and the analysis in overhead.json) from an existing overhead.json")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "overhead.json")) as fh:
            results = json.load(fh)
        return write_report(results, args.out)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    methods = OVERHEAD_METHODS if not args.methods else tuple(OVERHEAD_BY_KEY[k] for k in args.methods)
    needed = ({m.counterpart for m in methods if m.counterpart}
              | {c.base for c in CHECKS if c.method in {m.key for m in methods}})
    methods = tuple(m for m in OVERHEAD_METHODS if m in methods or m.key in needed)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {"meta": _meta(args), "models": {}}
    for key in args.models:
        log(f"== {key}")
        start = time.perf_counter()
        results["models"][key] = run_model(MODELS[key], methods, args.steps, args.warmup, args.inference_reps,
                                           args.profile_steps, log)
        results["models"][key]["wall_s"] = round(time.perf_counter() - start, 1)
    results["meta"]["load_average_end"] = _loadavg()
    write_report(results, args.out)
    for row in summary_rows(results):
        target = "" if row[3] is None else f"(target ≤ {row[3]:.2f})"
        log(f"{row[0]:8s} {row[1]:15s} {row[2]:.2f}x {target} {row[4]}")
    return results
