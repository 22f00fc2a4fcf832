"""One call of ``python -m benchmarks.generalization``: its command line, the grid it plans, and the groups a
recorded command wrote (to merge tables and to say how earlier calls chose their configurations)."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from ..methods import (GENERALIZATION_BY_KEY, GENERALIZATION_METHODS, SELF_LABEL_FILE, TSRS_GRID, TSRS_WEIGHTS, Method,
                       distance_grid, first_grid_point, recipe_distance_ratio, tsrs_grid)
from .grid import (LR_MULTIPLIERS, QUICK_LR_MULTIPLIERS, QUICK_SEEDS, QUICK_SETTINGS, SEEDS, SETTINGS, TASKS, Group,
                   Setting, Task)

COMMAND = "python -m benchmarks.generalization"  # how a call is recorded in the results' meta


def parse_settings(texts: Sequence[str]) -> list[Setting]:
    """``8`` or ``32:0.2`` (shots[:noise])."""
    out = []
    for text in texts:
        shots, _, noise = text.partition(":")
        out.append(Setting(int(shots), float(noise) if noise else 0.0))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Generalization benchmark (see the docstring of "
                                                               "benchmarks.generalization).")
    parser.add_argument("--quick", action="store_true", help="tiny budget, 2 settings, 2 seeds: proves the pipeline")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(GENERALIZATION_BY_KEY), default=None,
                        help="default: all (a method's counterpart is added when missing)")
    parser.add_argument("--no-counterparts", action="store_true",
                        help="run exactly --methods, without adding their un-regularized counterparts (to split one "
                             "grid across processes sharing --runs; the report of the whole grid is --report-only)")
    parser.add_argument("--settings", nargs="+", default=None, help="shots[:noise], e.g. 8 32 32:0.2 32:0.4")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--lr-multipliers", nargs="+", type=float, default=None)
    parser.add_argument("--runs", default=None, help="parent folder of the run folders (default benchmarks/runs)")
    parser.add_argument("--out", default=None, help="folder of the results (default benchmarks/results)")
    parser.add_argument("--override", nargs="+", default=[], help="extra recipe overrides for every run")
    parser.add_argument("--tsrs-weights", nargs="+", type=float, default=None,
                        help=f"the TSRS λ grid of the TSRS methods (default {' '.join(map(str, TSRS_WEIGHTS))}); "
                             "its first value is the one --no-search and --lr-only use")
    parser.add_argument("--distance-ratios", nargs="+", type=float, default=None,
                        help="a grid of the self-labeling radius ratio (D_l = ratio·‖W0_l‖; the recipe's "
                             f"{recipe_distance_ratio():g} when not given); its first value is the one --no-search and "
                             "--lr-only use")
    parser.add_argument("--no-search", action="store_true",
                        help="no selection: every method at its recipe's learning rate and the first point of its own "
                             "grid (TSRS λ = 0.1), for grids too costly to search")
    parser.add_argument("--lr-only", action="store_true",
                        help="search the learning rate only: every method at the first point of its own grid "
                             "(TSRS λ = 0.1), one selection run per learning rate")
    parser.add_argument("--select-on-clean", action="store_true",
                        help="settings with label noise reuse the configuration selected for the clean setting with "
                             "the same shots (no selection runs of their own)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs only")
    parser.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter/ folder")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of this process (default: torch's, one per core); give each of "
                             "several processes sharing the cores its share (--threads 1 for two on 2 cores): "
                             "two processes at 2 OpenMP threads each on 2 cores ran an 8-shot WordNet run in "
                             "≈ 500 s against ≈ 105 s at 1 thread each")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of <out>/generalization.json for (task, setting, method) groups outside "
                             "this call's grid (extend a committed table with more methods or settings)")
    return parser


@dataclass
class CallPlan:
    """What one call runs: its tasks, settings, methods (counterparts added, grids cut), seeds and lr multipliers."""
    tasks: list[Task]
    settings: list[Setting]
    methods: list[Method]
    seeds: list[int]
    multipliers: list[float]

    @property
    def groups(self) -> set[Group]:
        """The (task, shots, label noise, method) groups of this call's grid (the table lines it writes)."""
        return {(t.key, s.shots, s.noise, m.key) for t in self.tasks for s in self.settings for m in self.methods}


def plan_call(args: argparse.Namespace) -> CallPlan:
    """The grid of a parsed command line (raises ValueError on contradictory options)."""
    quick = args.quick
    settings = parse_settings(args.settings) if args.settings else list(QUICK_SETTINGS if quick else SETTINGS)
    seeds = list(args.seeds if args.seeds is not None else (QUICK_SEEDS if quick else SEEDS))
    if args.no_search and args.lr_multipliers:
        raise ValueError("--no-search runs the recipe's learning rate only; drop --lr-multipliers or --no-search")
    if args.no_search and args.lr_only:
        raise ValueError("--lr-only searches the learning rate; drop --lr-only or --no-search")
    multipliers = [1.0] if args.no_search else list(
        args.lr_multipliers or (QUICK_LR_MULTIPLIERS if quick else LR_MULTIPLIERS))
    chosen = set(args.methods or GENERALIZATION_BY_KEY)
    if not args.no_counterparts:
        chosen |= {GENERALIZATION_BY_KEY[k].counterpart for k in list(chosen) if GENERALIZATION_BY_KEY[k].counterpart}
    methods = [m for m in GENERALIZATION_METHODS if m.key in chosen]
    if args.tsrs_weights:
        if any(w < 0 for w in args.tsrs_weights):
            raise ValueError(f"--tsrs-weights must be >= 0, got {args.tsrs_weights}")
        grid = tsrs_grid(args.tsrs_weights)
        methods = [replace(m, hparams=grid) if m.hparams == TSRS_GRID else m for m in methods]
    if args.distance_ratios:
        if any(r <= 0 for r in args.distance_ratios):
            raise ValueError(f"--distance-ratios must be > 0, got {args.distance_ratios}")
        grid = distance_grid(args.distance_ratios)
        methods = [replace(m, hparams=grid) if SELF_LABEL_FILE in m.files else m for m in methods]
    if quick or args.no_search or args.lr_only:  # one point of each method's own grid
        methods = first_grid_point(methods)
    return CallPlan([TASKS[k] for k in args.tasks], settings, methods, seeds, multipliers)


def parse_command(command: str) -> Optional[argparse.Namespace]:
    """The arguments of a recorded ``python -m benchmarks.generalization ...`` command; None if it does not parse."""
    if not command.startswith(COMMAND):
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return build_parser().parse_args(shlex.split(command[len(COMMAND):]))
    except (SystemExit, ValueError):
        return None


def command_groups(command: str) -> Optional[set[Group]]:
    """The (task, shots, label noise, method) groups of a recorded command; None if it does not parse."""
    args = parse_command(command)
    try:
        return None if args is None else plan_call(args).groups
    except ValueError:
        return None
