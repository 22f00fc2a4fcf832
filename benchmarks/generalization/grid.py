"""What one generalization call can run: the tasks, the (shots, label noise) settings, the default grid, and one run
(:class:`RunSpec`: its recipe files, overrides and folder)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from ..methods import Method, recipe_files

Group = tuple[str, int, float, str]  # (task, shots, label noise, method): the rows of one table line


@dataclass(frozen=True)
class Task:
    key: str
    label: str
    file: str  # relative to configs/tasks
    overrides: tuple[str, ...] = ()  # recipe overrides of every run of the task (e.g. another backbone)
    tag: str = ""  # names the variant in run folders (``<task>-<tag>``), so its runs never mix with the plain task's

    @property
    def folder(self) -> str:
        return f"{self.key}-{self.tag}" if self.tag else self.key


@dataclass(frozen=True)
class Setting:
    shots: int
    noise: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.shots}shot-noise{round(100 * self.noise)}"

    @property
    def label(self) -> str:
        return f"{self.shots} shots" + (f", {self.noise:.0%} noisy labels" if self.noise else "")


TASKS: dict[str, Task] = {
    "wordnet": Task("wordnet", "WordNet nouns / MiniLM", "wordnet_minilm.yaml"),
    "fmnist": Task("fmnist", "Fashion-MNIST 5-9 / ViT", "fmnist_vit.yaml"),
}
SETTINGS = (Setting(8), Setting(32), Setting(32, 0.2), Setting(32, 0.4))
LR_MULTIPLIERS = (0.3, 1.0, 3.0)
SEEDS = (0, 1, 2, 3, 4)

# --quick: a tiny budget that exercises every step (selection, seeds, resume, report) in minutes
QUICK_SETTINGS = (Setting(2), Setting(2, 0.4))
QUICK_LR_MULTIPLIERS = (1.0, 3.0)
QUICK_SEEDS = (0, 1)
QUICK_OVERRIDES = ("training.max_steps=4", "training.logging_steps=2", "task.val_per_class=2",
                   "task.test_per_class=4", "diagnostics=false")
# every run: the end-of-run diagnostics (stable ranks, sharpness probe, ...) are not part of this comparison
BENCH_OVERRIDES = ("diagnostics=false",)


@dataclass
class RunSpec:
    task: str
    setting: Setting
    method: str
    lr: float
    hparams: tuple[str, ...]
    seed: int
    phase: str  # "select" (seed 0, grid) or "seed"
    run_dir: str
    overrides: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def config_tag(self) -> str:
        return config_tag(self.lr, self.hparams)


def hparam_tag(hparams: Sequence[str]) -> str:
    """``("regularizers.tsrs_weight=0.1",)`` -> ``tsrs_weight0.1``."""
    parts = []
    for h in hparams:
        key, _, value = h.partition("=")
        parts.append(key.split(".")[-1] + value)
    return "-".join(parts)


def config_tag(lr: float, hparams: Sequence[str]) -> str:
    tag = f"lr{lr:.3g}"
    return f"{tag}-{hparam_tag(hparams)}" if hparams else tag


def run_dir_for(runs: str, task: str, setting: Setting, method: str, lr: float, hparams: Sequence[str],
                seed: int) -> str:
    return os.path.join(runs, task, setting.key, method, f"{config_tag(lr, hparams)}-s{seed}")


def default_lr(task: Task, method: Method) -> float:
    """The learning rate of the merged task + method recipe files and the method's overrides (the grid's centre)."""
    from peft_tsrs.app.recipes import load_recipe

    overrides = [*task.overrides, *method.overrides, *method.per_task.get(task.key, ())]
    return load_recipe(recipe_files(task.file, method), overrides).training.learning_rate


def lr_grid(base_lr: float, multipliers: Sequence[float]) -> list[float]:
    return [float(f"{base_lr * m:.3g}") for m in multipliers]


def spec_for(runs: str, task: Task, setting: Setting, method: Method, lr: float, hparams: tuple[str, ...],
             seed: int, phase: str, extra: Sequence[str] = ()) -> RunSpec:
    run_dir = run_dir_for(runs, task.folder, setting, method.key, lr, hparams, seed)
    overrides = (
        *task.overrides, *method.overrides, *method.per_task.get(task.key, ()), *hparams,
        f"task.shots_per_class={setting.shots}", f"task.label_noise={setting.noise}",
        f"task.seed={seed}", f"training.seed={seed}", f"training.learning_rate={lr}",
        *extra,
        f"output_dir={os.path.dirname(run_dir)}", f"name={os.path.basename(run_dir)}",
    )
    return RunSpec(task.key, setting, method.key, lr, tuple(hparams), seed, phase, run_dir, overrides,
                   tuple(recipe_files(task.file, method)))


def selection_specs(runs: str, task: Task, setting: Setting, method: Method, lrs: Sequence[float],
                    extra: Sequence[str] = ()) -> list[RunSpec]:
    return [spec_for(runs, task, setting, method, lr, hp, 0, "select", extra)
            for hp in method.hparams for lr in lrs]
