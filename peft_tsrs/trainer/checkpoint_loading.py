"""Loading full-model Trainer checkpoints whose weight names differ from the model's own.

transformers 5 renames the weights of some architectures when it loads them (ViT: ``vit.encoder.layer.0.attention.
attention.query`` → ``vit.layers.0.attention.q_proj``) and ``save_pretrained`` writes the original names back, so a
Trainer checkpoint of a fully fine-tuned ViT holds names the live model does not have. ``Trainer`` restores the best
model (``load_best_model_at_end``) and resumed runs with a raw ``load_state_dict(..., strict=False)``: every renamed
weight is skipped with a warning and the run silently continues from a half-restored model. These helpers detect that
case and load through ``from_pretrained``, which applies the renaming. Adapter checkpoints (PEFT) are not affected.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

__all__ = ["checkpoint_weight_names", "needs_renamed_load", "load_renamed_checkpoint"]


def checkpoint_weight_names(folder: str) -> Optional[set[str]]:
    """The weight names stored in a ``save_pretrained`` folder (single file or sharded safetensors), else ``None``."""
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as fh:
            return set(fh.keys())
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as fh:
            return set(json.load(fh)["weight_map"])
    return None


def needs_renamed_load(model: nn.Module, folder: str) -> bool:
    """True when ``model`` is a plain transformers model and ``folder`` stores weights under names it lacks."""
    if not isinstance(model, PreTrainedModel):
        return False
    names = checkpoint_weight_names(folder)
    return names is not None and not names <= set(model.state_dict())


def load_renamed_checkpoint(model: PreTrainedModel, folder: str) -> None:
    """Load the weights of ``folder`` into ``model`` in place, renamed as ``from_pretrained`` renames them.

    Raises ``RuntimeError`` naming the weights that still do not match (a checkpoint of another architecture)."""
    dtype = next(model.parameters()).dtype
    fresh, info = type(model).from_pretrained(folder, config=model.config, dtype=dtype, output_loading_info=True)
    weights = fresh.state_dict()
    bad = {
        "missing": sorted(info.get("missing_keys", ())) + sorted(set(model.state_dict()) - set(weights)),
        "unexpected": sorted(info.get("unexpected_keys", ())),
        "mismatched": [k for k, *_ in info.get("mismatched_keys", ())],
    }
    if any(bad.values()):  # checked before the model is touched
        details = ", ".join(f"{kind} {names[:5]}" for kind, names in bad.items() if names)
        raise RuntimeError(
            f"checkpoint {folder} does not match {type(model).__name__}: {details} (was it saved from another model "
            "class or config?)"
        )
    model.load_state_dict(weights)
