"""Build the PEFT config named by a recipe's ``adapter`` section (``full`` means no adapter)."""

from __future__ import annotations

from typing import Any, Optional

from peft import PeftConfig, get_peft_model
from torch import nn

from ..tuners.defaults import DEFAULT_HEAD_MODULES, LINEAR_TARGETS, default_targets
from .recipes import AdapterSpec, Recipe, check_options, config_class

HEAD = list(DEFAULT_HEAD_MODULES)


def adapter_config(spec: AdapterSpec, model_type: Optional[str], recipe: Optional[dict[str, Any]] = None,
                   head: Optional[list[str]] = HEAD) -> Optional[PeftConfig]:
    """The PEFT config for ``spec`` (``None`` for full fine-tuning); the new head (``head``, the classifier's module
    names) is always trained and saved; ``head=None`` for a model without a new head (a causal LM).

    ``recipe`` (the RegularizerConfig fields) is stored in RLRR/PACE configs so the adapter folder carries its recipe.
    """
    spec.validate()
    if spec.type == "full":
        return None
    cls = config_class(spec.type)
    options = dict(spec.options)
    if head:
        options.setdefault("modules_to_save", list(head))
    if spec.type == "lora":
        options.setdefault("target_modules", sorted(default_targets(LINEAR_TARGETS, model_type, "target_modules",
                                                                    "LoRA")))
        options.setdefault("r", 8)
        options.setdefault("lora_alpha", 16)
    elif recipe is not None:
        options.setdefault("regularizers", recipe)
    check_options(spec.type, options)
    return cls(**options)


def apply_adapter(model: nn.Module, recipe: Recipe) -> nn.Module:
    """``model`` wrapped with the PEFT adapter of ``recipe.adapter`` (returned as is for full fine-tuning); a recipe
    with any regularizer on is stored in the adapter config (see :func:`adapter_config`)."""
    stored = None if recipe.regularizers.is_noop else recipe.regularizers.to_dict()
    head = None if recipe.task.generative else HEAD  # an instruction task keeps the LM head: nothing new to train
    config = adapter_config(recipe.adapter, getattr(model.config, "model_type", None), stored, head=head)
    return model if config is None else get_peft_model(model, config)
