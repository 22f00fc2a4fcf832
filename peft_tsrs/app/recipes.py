"""Recipes: what a ``peft-tsrs train`` run does, as typed dataclasses loaded from YAML.

A recipe has five sections — ``task``, ``model``, ``adapter``, ``regularizers`` (the :class:`RegularizerConfig` fields) and
``training`` — plus ``name`` and ``output_dir``. The dataclass defaults are the embedded default run: MiniLM
fine-tuned few-shot (8 glosses per class) on WordNet's 26 noun categories with an RLRR adapter. Several YAML files
merge in order (``task`` file, then ``method`` file, ...) and ``--override section.key=value`` edits the result.
Unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from peft import LoraConfig, PeftConfig

from ..config import RegularizerConfig
from ..tuners.pace import PACEConfig
from ..tuners.rlrr import RLRRConfig
from .data.splits import LABEL_NOISE_TYPES

TASKS = ("wordnet", "fashion_mnist")
# The one registry of adapter types a recipe may name: type -> PEFT config class (None: full fine-tuning).
ADAPTER_CONFIGS: dict[str, Optional[type[PeftConfig]]] = {
    "full": None, "lora": LoraConfig, "rlrr": RLRRConfig, "pace": PACEConfig,
}
ADAPTERS = tuple(ADAPTER_CONFIGS)


def config_class(adapter_type: str) -> type[PeftConfig]:
    """The PEFT config class of an adapter type name."""
    cls = ADAPTER_CONFIGS.get(adapter_type)
    if cls is None:
        raise ValueError(f"unknown adapter type {adapter_type!r}; use one of {', '.join(ADAPTERS)}.")
    return cls


def check_options(adapter_type: str, options: dict[str, Any]) -> None:
    """Reject options that the adapter type's PEFT config does not have, listing the valid ones (called when a
    recipe is loaded, so a typo fails before any data or model is loaded)."""
    if adapter_type == "full":
        if options:
            raise ValueError(f"adapter.type 'full' takes no options, got {sorted(options)}.")
        return
    valid = {f.name for f in dataclasses.fields(config_class(adapter_type))}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for adapter.type {adapter_type!r}; "
                         f"valid: {', '.join(sorted(valid))}")


@dataclass
class TaskSpec:
    """The dataset and its few-shot split."""

    name: str = "wordnet"
    shots_per_class: int = 8
    val_per_class: int = 10
    test_per_class: Optional[int] = 50
    classes: Optional[list[int]] = None
    label_noise: float = 0.0
    # "symmetric_exclusive" (default, earlier releases: a flip always changes the class), "symmetric" (official:
    # drawn from all classes) or "pair" (c -> c + 1 mod K); see peft_tsrs.app.data.flip_labels.
    label_noise_type: str = "symmetric_exclusive"
    max_length: int = 64
    seed: int = 0

    def validate(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task.name must be one of {TASKS}, got {self.name!r}.")
        if self.shots_per_class < 1 or self.val_per_class < 1:
            raise ValueError("task.shots_per_class and task.val_per_class must be >= 1.")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"task.label_noise is a fraction in [0, 1), got {self.label_noise}.")
        if self.label_noise_type not in LABEL_NOISE_TYPES:
            raise ValueError(f"task.label_noise_type must be one of {LABEL_NOISE_TYPES}, got {self.label_noise_type!r}.")


@dataclass
class ModelSpec:
    """The pretrained backbone: ``minilm`` (shipped text encoder), ``fmnist_vit`` (small ViT pretrained here on
    Fashion-MNIST classes 0-4) or a path to any HF model folder."""

    name: str = "minilm"
    pretrain_epochs: float = 2.0
    pretrain_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])


@dataclass
class AdapterSpec:
    """``type`` is one of ``full``, ``lora``, ``rlrr``, ``pace``; every other key goes to that PEFT config."""

    type: str = "rlrr"
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.type not in ADAPTERS:
            raise ValueError(f"adapter.type must be one of {ADAPTERS}, got {self.type!r}.")
        check_options(self.type, self.options)


@dataclass
class TrainSpec:
    """The optimisation budget (the same for every method of a comparison)."""

    epochs: float = 10.0
    batch_size: int = 16
    eval_batch_size: int = 128
    learning_rate: float = 1e-2  # chosen on WordNet validation among 1e-3, 5e-3, 1e-2, 2e-2 (RLRR, 8 shots)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_steps: int = -1
    logging_steps: int = 5
    seed: int = 0
    select_on: str = "accuracy"

    def validate(self) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("training.epochs (or training.max_steps) must be > 0.")
        if self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("training.batch_size must be >= 1 and training.learning_rate > 0.")


@dataclass
class Recipe:
    """One fine-tuning run."""

    name: str = "wordnet-minilm-rlrr"
    output_dir: str = "runs"
    task: TaskSpec = field(default_factory=TaskSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    training: TrainSpec = field(default_factory=TrainSpec)
    diagnostics: bool = True

    def validate(self) -> "Recipe":
        self.task.validate()
        self.adapter.validate()
        self.training.validate()  # the regularizers validated themselves when built
        return self

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        options = data["adapter"].pop("options")
        data["adapter"].update(options)
        return data

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    @property
    def method(self) -> str:
        """A short label: the adapter plus the regularizers that are on."""
        reg = self.regularizers
        parts = [self.adapter.type + ("-ssf" if self.adapter.options.get("ssf") else "")]
        if reg.uses_pace:
            parts.append(f"pace-{reg.pace_mode}")
        if reg.uses_tsrs:
            parts.append("tsrs")
        if reg.uses_distance:
            parts.append(f"dist-{reg.distance_norm}")
        if reg.uses_label_correction or reg.uses_reweighting:
            parts.append("selflabel")
        return "+".join(parts)


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


_SECTIONS = {"task": TaskSpec, "model": ModelSpec, "training": TrainSpec}
_TOP_LEVEL = {"name", "output_dir", "diagnostics", "task", "model", "adapter", "regularizers", "training", "base"}


def _check_keys(section: str, given: dict[str, Any], cls) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in recipe section '{section}'; valid keys: {', '.join(valid)}")


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build and validate a :class:`Recipe` from a nested dict (missing keys keep the defaults)."""
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise ValueError(f"unknown recipe key(s) {unknown}; valid top-level keys: {', '.join(sorted(_TOP_LEVEL))}")
    recipe = Recipe()
    for key in ("name", "output_dir", "diagnostics"):
        if key in data:
            setattr(recipe, key, data[key])
    for section, cls in _SECTIONS.items():
        given = data.get(section) or {}
        _check_keys(section, given, cls)
        setattr(recipe, section, cls(**given))
    adapter = dict(data.get("adapter") or {})
    recipe.adapter = AdapterSpec(type=adapter.pop("type", "rlrr"), options=adapter)
    regularizers = data.get("regularizers") or {}
    try:
        recipe.regularizers = RegularizerConfig.from_dict(regularizers)
    except ValueError as err:
        raise ValueError(f"recipe section 'regularizers': {err}") from None
    return recipe.validate()


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str) -> dict[str, Any]:
    """A recipe file as a dict, with its ``base:`` file (relative to it) merged underneath."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe file not found: {path}")
    with open(path) as fh:
        data = _yaml_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}.")
    base = data.pop("base", None)
    if base:
        data = deep_merge(read_yaml(os.path.join(os.path.dirname(path), base)), data)
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` as a nested dict; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. training.epochs=3")
    path, raw = text.split("=", 1)
    value = _yaml_load(raw) if raw.strip() else None
    out: dict[str, Any] = {}
    node = out
    keys = path.strip().split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def load_recipe(paths: list[str] = (), overrides: list[str] = ()) -> Recipe:
    """Merge recipe files in order, apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    for path in paths:
        data = deep_merge(data, read_yaml(path))
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    return recipe_from_dict(data)
