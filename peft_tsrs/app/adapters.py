"""Build the PEFT config named by a recipe's ``adapter`` section (``full`` means no adapter)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

from .recipes import AdapterSpec, Recipe
from ..tuners.defaults import LINEAR_TARGETS, default_targets
HEAD = ["classifier"]


def config_class(adapter_type: str) -> type[PeftConfig]:
    """The PEFT config class of an adapter type name."""
    if adapter_type == "lora":
        return LoraConfig
    if adapter_type == "rlrr":
        from ..tuners.rlrr import RLRRConfig

        return RLRRConfig
    if adapter_type == "pace":
        from ..tuners.pace import PACEConfig

        return PACEConfig
    raise ValueError(f"unknown adapter type {adapter_type!r}; use one of full, lora, rlrr, pace.")


def adapter_config(spec: AdapterSpec, model_type: Optional[str], recipe: Optional[dict[str, Any]] = None
                   ) -> Optional[PeftConfig]:
    """The PEFT config for ``spec`` (``None`` for full fine-tuning); the new head is always trained and saved.

    ``recipe`` (the TSRSConfig fields) is stored in RLRR/PACE configs so the adapter folder carries its recipe.
    """
    spec.validate()
    if spec.type == "full":
        return None
    cls = config_class(spec.type)
    options = dict(spec.options)
    options.setdefault("modules_to_save", HEAD)
    if spec.type == "lora":
        options.setdefault("target_modules", sorted(default_targets(LINEAR_TARGETS, model_type, "target_modules",
                                                                    "LoRA")))
        options.setdefault("r", 8)
        options.setdefault("lora_alpha", 16)
    elif recipe is not None:
        options.setdefault("tsrs", recipe)
    check_options(spec.type, options)
    return cls(**options)


def apply_adapter(model: nn.Module, recipe: Recipe) -> nn.Module:
    """``model`` wrapped with the PEFT adapter of ``recipe.adapter`` (returned as is for full fine-tuning); a recipe
    with any regularizer on is stored in the adapter config (see :func:`adapter_config`)."""
    stored = None if recipe.regularizers.is_noop else recipe.regularizers.to_dict()
    config = adapter_config(recipe.adapter, getattr(model.config, "model_type", None), stored)
    return model if config is None else get_peft_model(model, config)


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
