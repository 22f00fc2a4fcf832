"""The task loss of a regularized step: the model's own loss, computed on the rows of the task path.

A regularized forward runs on more rows than the batch (PACE's second copy, TSRS's noisy copy), so the labels cannot
be passed to the model; the trainer computes the task loss on the selected logits instead, the way the model would:

* **single-label classification** (sequence, image, audio classifiers; labels ``(B,)`` class ids): per-example
  cross-entropy, which the regularizers that work per example (label correction, reweighting, PACE-fast) read;
* **everything else** (causal LM, masked LM, token classification, seq2seq, regression, multi-label): the model's
  ``loss_function`` (transformers' ``LOSS_MAPPING`` entry for its class: labels shifted for causal LMs, ``-100``
  ignored), or, for encoder-decoder generation models, whose ``forward`` computes an unshifted cross-entropy, that.

``supervised_positions`` gives the logit positions a token-level loss reads (the label of the *next* token for a
causal LM), which the PACE consistency term is restricted to.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..regularizers.blocks import unwrap_model

IGNORE_INDEX = -100  # a label the losses skip
CLASSIFICATION_LOSS_TYPES = ("ForSequenceClassification", "ForImageClassification", "ForVideoClassification",
                             "ForAudioClassification")
_NOT_SINGLE_LABEL = ("regression", "multi_label_classification")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / accelerate wrappers."""
    return unwrap_model(model)


def is_single_label_classifier(model: nn.Module) -> bool:
    """Whether ``model`` predicts one class per example: a transformers classifier (by its ``loss_type``) that is not
    a regression / multi-label model; a custom module without ``loss_type`` counts as one (the trainer's historical
    contract)."""
    base = base_model(model)
    loss_type = getattr(base, "loss_type", None)
    config = getattr(base, "config", None)
    if getattr(config, "problem_type", None) in _NOT_SINGLE_LABEL:
        return False
    if loss_type is None:
        return not hasattr(base, "loss_function")
    return loss_type in CLASSIFICATION_LOSS_TYPES


def supervised_positions(labels: Tensor, shift: bool) -> Tensor:
    """``(B, L)`` bool: the logit positions a token-level loss reads. With ``shift`` (causal LM) position ``t`` predicts
    ``labels[:, t + 1]``, so the last position is never supervised."""
    if not shift:
        return labels != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def decoder_inputs(model: nn.Module, inputs: dict[str, Any], labels: Tensor) -> dict[str, Any]:
    """An encoder-decoder generation model builds ``decoder_input_ids`` from ``labels`` inside its forward; the labels
    are not passed in a regularized step, so build them here the model's way."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if (labels.ndim < 2 or not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in inputs
            or "decoder_inputs_embeds" in inputs or not hasattr(base, "prepare_decoder_input_ids_from_labels")):
        return inputs
    return {**inputs, "decoder_input_ids": base.prepare_decoder_input_ids_from_labels(labels=labels)}


def model_loss(model: nn.Module, logits: Tensor, labels: Tensor) -> Tensor:
    """The model's own loss of ``logits`` against ``labels``, averaged over this batch's supervised items."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if labels.ndim >= 2 and getattr(config, "is_encoder_decoder", False):  # BART / T5 generation: unshifted CE
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                               ignore_index=IGNORE_INDEX)
    loss_function = getattr(base, "loss_function", None)
    if loss_function is None:
        raise ValueError(f"RegularizedTrainer: {type(base).__name__} has no `loss_function` and its labels of shape "
                         f"{tuple(labels.shape)} are not one class id per example; pass compute_loss_func=... to the "
                         f"trainer.")
    # every loss of transformers' LOSS_MAPPING takes what it needs from these and ignores the rest
    return loss_function(logits=logits, pooled_logits=logits, labels=labels, config=config,
                         vocab_size=getattr(config, "vocab_size", logits.shape[-1]))


def count_items(labels: Tensor, shift: bool) -> Optional[Tensor]:
    """The supervised items of a token-level batch (as ``Trainer`` counts them for ``num_items_in_batch``)."""
    return (labels[..., 1:] if shift else labels).ne(IGNORE_INDEX).sum()
