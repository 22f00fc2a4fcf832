"""The ``peft-tsrs`` command.

    peft-tsrs train [RECIPE.yaml ...] [--override section.key=value ...]
    peft-tsrs report RUN_DIR [RUN_DIR ...] [--output DIR]
    peft-tsrs demo [--output-dir DIR] [--override section.key=value ...]
    peft-tsrs push RUN_DIR REPO_ID [--private]

``train`` with no recipe runs the embedded default (MiniLM, WordNet noun categories, 8 shots per class, RLRR).
``demo`` runs that default twice — without and with the regularizers of :data:`DEMO_REGULARIZERS` — and prints the
comparison table. ``push`` uploads a finished run folder (adapter, model card, metrics, curves) to the Hub.

``--override`` takes one or more ``KEY=VALUE`` (``-o a=1 b=2`` or ``-o a=1 -o b=2``); put recipe files before it.

Every error ends the command with exit status 2 (1 for an unexpected one) and one line ``peft-tsrs: error: ...`` on
stderr saying what to change, without a traceback (``PEFT_TSRS_DEBUG=1`` shows it). A failed ``train`` leaves no run
folder behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from ..trainer.nonfinite import NonFiniteLossError
from .hub import PushError
from .recipes import load_recipe

# The regularized arm of the demo: TSRS noise stability + PACE-fast consistency on the same adapter and budget.
# λ_TSRS = 0.1, not the paper's 1.0: at the default learning rate λ = 1 collapses the RLRR features on this task
# (noise stability bought by shrinking the representation; validation accuracy at chance). PACE's noise on the RLRR
# branches: σ 1.0, the PACE recipes' value (paper grid 0.1-2).
DEMO_REGULARIZERS = [
    "regularizers.tsrs_weight=0.1",
    "regularizers.tsrs_noise_std=0.2",
    "regularizers.pace_weight=0.1",
    "regularizers.pace_mode=fast",
    "regularizers.pace_sigma=1.0",
]


def _check_overrides(overrides: list[str]) -> None:
    """``--override`` takes several values, so a recipe file after it lands there: say so."""
    for text in overrides:
        if "=" not in text and text.endswith((".yaml", ".yml")):
            raise ValueError(f"{text!r} came after --override: put recipe files before --override, e.g. "
                             f"peft-tsrs train {text} --override training.epochs=3")


def _train(args: argparse.Namespace) -> int:
    from .run import run_recipe, score

    overrides = list(args.override or [])
    _check_overrides(overrides)
    # JSON-quoted: a YAML string whatever the text (`--name 1e-3` stays the name "1e-3")
    if args.output_dir:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    if args.name:
        overrides.append(f"name={json.dumps(args.name)}")
    recipe = load_recipe(args.recipes, overrides)
    metrics = run_recipe(recipe, progress=not args.no_progress, keep_checkpoints=args.keep_checkpoints)
    metric = metrics["metric"].replace("_", " ")
    before = ""
    if "before_training" in metrics:
        before = f" (before training: {metrics['before_training']['test'][metrics['metric']]:.4f})"
    print(f"{recipe.name}: train {metric} {score(metrics, 'train'):.4f}, validation {metric} "
          f"{score(metrics, 'validation'):.4f}, test {metric} {score(metrics):.4f}{before} -> {recipe.run_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    output = args.output or os.path.commonpath([os.path.abspath(d) for d in args.run_dirs])
    print(write_report(args.run_dirs, output), end="")
    print(f"report: {os.path.join(output, 'report.md')}, plot: {os.path.join(output, 'comparison.png')}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .report import write_report
    from .run import run_recipe

    out = args.output_dir
    arms = {"baseline": [], "regularized": DEMO_REGULARIZERS}
    run_dirs = []
    for name, overrides in arms.items():
        extra = list(args.override or [])
        recipe = load_recipe([], [*overrides, *extra, f"output_dir={json.dumps(out)}", f"name=demo-{name}"])
        print(f"== {name}: {recipe.method} on {recipe.task.name} ({recipe.task.shots_per_class} shots/class)",
              flush=True)
        run_recipe(recipe, progress=not args.no_progress)
        run_dirs.append(recipe.run_dir)
    print(write_report(run_dirs, out), end="")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_run_to_hub

    url = push_run_to_hub(args.run_dir, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.message)
    print(f"pushed {args.run_dir} -> {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-tsrs", description="Regularized PEFT fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune from recipe YAML files (merged in order)")
    train.add_argument("recipes", nargs="*", help="recipe files; none = the embedded default")
    train.add_argument("--override", "-o", action="extend", nargs="+", metavar="KEY=VALUE",
                       help="edit the recipe, e.g. training.epochs=3 or regularizers.tsrs_weight=1")
    train.add_argument("--output-dir", help="parent folder of the run folder (recipe output_dir)")
    train.add_argument("--name", help="run name (folder name)")
    train.add_argument("--keep-checkpoints", action="store_true", help="keep the per-epoch checkpoints")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)
    report = sub.add_parser("report", help="compare finished runs (Markdown table + PNG)")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--output", help="where report.md and comparison.png go (default: common parent)")
    report.set_defaults(func=_report)
    demo = sub.add_parser("demo", help="baseline vs. regularized run of the embedded default, with a table")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--override", "-o", action="extend", nargs="+", metavar="KEY=VALUE",
                      help="edit both arms' recipe, e.g. training.epochs=2 for a quick look")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)
    push = sub.add_parser("push", help="upload a finished run folder (adapter + model card + metrics) to the Hub")
    push.add_argument("run_dir", help="a run folder written by `peft-tsrs train` (<output_dir>/<name>)")
    push.add_argument("repo_id", help="Hub repository, e.g. user/wordnet-minilm-tsrs (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", help="Hub token (default: the logged-in one / HF_TOKEN)")
    push.add_argument("--message", help="commit message")
    push.set_defaults(func=_push)
    return parser


# Errors that carry a message written for the user (exit status 2); anything else is unexpected (exit status 1).
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, PushError, NonFiniteLossError)


def one_line(err: BaseException, limit: int = 1000) -> str:
    """An exception's message on one line (whitespace and line breaks collapsed), at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("PEFT_TSRS_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("peft-tsrs: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"peft-tsrs: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # no traceback for users; PEFT_TSRS_DEBUG=1 shows it
        if debug:
            raise
        print(f"peft-tsrs: error: {type(err).__name__}: {one_line(err)} (unexpected; rerun with PEFT_TSRS_DEBUG=1 "
              f"for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
