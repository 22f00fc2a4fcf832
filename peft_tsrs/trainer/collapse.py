"""Detect a classifier that has collapsed to one output for every input, and say what to change.

A fine-tuned classifier can fall into a state where its prediction no longer depends on the input: every evaluation
example gets the same class, the task loss sits at ``ln(num_labels)`` and, because the path from the input to the
logits carries almost no signal, the task gradient is too weak to leave it. Too large a learning rate does this to
LoRA on MiniLM; the TSRS noise-stability term makes it likelier, because an input-independent representation is
perfectly noise-stable (``‖h̃ − h‖ / ‖h‖ = 0`` once the blocks stop reading their input).

:class:`CollapseMonitor` counts the predicted classes of each evaluation. When ``patience`` evaluations in a row
predict a single class (while the labels hold several), it emits one :class:`CollapseWarning` naming the setting to
change.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..regularizers.blocks import first_tensor

__all__ = ["CollapseMonitor", "CollapseWarning", "predicted_class_counts"]

IGNORE_INDEX = -100


class CollapseWarning(UserWarning):
    """The model predicted one class for every evaluation example, several evaluations in a row."""


def _logits_of(output: Any) -> Optional[Tensor]:
    try:
        return first_tensor(output)
    except TypeError:
        return None


def predicted_class_counts(logits: Any, labels: Optional[Tensor], num_classes: int) -> tuple[Tensor, Tensor]:
    """``(predicted, true)`` class histograms (length ``num_classes``) of one batch; positions labelled ``-100`` are
    skipped. Empty histograms when the logits are missing or not ``[..., num_classes]``."""
    empty = torch.zeros(num_classes, dtype=torch.long)
    logits = _logits_of(logits)
    if logits is None or logits.ndim < 2 or logits.shape[-1] != num_classes:
        return empty, empty.clone()
    preds = logits.detach().argmax(-1).reshape(-1).cpu()
    true = empty.clone()
    if isinstance(labels, Tensor) and labels.numel() == preds.numel():
        flat = labels.detach().reshape(-1).cpu()
        keep = flat != IGNORE_INDEX
        preds, flat = preds[keep], flat[keep]
        true = torch.bincount(flat.clamp(0, num_classes - 1), minlength=num_classes)
    return torch.bincount(preds, minlength=num_classes), true


class CollapseMonitor:
    """Counts the classes predicted during one evaluation and tracks single-class evaluations in a row.

    Args:
        num_classes: Size of the logits' last dimension.
        patience: Single-class evaluations in a row that count as a collapse (the first evaluation after a random
            head can legitimately predict one class; a healthy run leaves that state by the next one).
        advice: Called with no argument when the collapse is reported; returns what the user should change.
    """

    def __init__(self, num_classes: int, patience: int = 2, advice: Callable[[], str] = lambda: "") -> None:
        if num_classes < 2:
            raise ValueError(f"CollapseMonitor needs at least 2 classes, got num_classes={num_classes}.")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}.")
        self.num_classes = num_classes
        self.patience = patience
        self.advice = advice
        self.streak = 0
        self.reported_at: Optional[int] = None  # the step of the warning, once given
        self.last_predicted: Optional[Tensor] = None  # predicted-class histogram of the last finished evaluation
        self._pred: Optional[Tensor] = None
        self._true: Optional[Tensor] = None

    def start(self) -> None:
        """Begin counting one evaluation."""
        self._pred = torch.zeros(self.num_classes, dtype=torch.long)
        self._true = torch.zeros(self.num_classes, dtype=torch.long)

    @property
    def counting(self) -> bool:
        return self._pred is not None

    def observe(self, logits: Any, labels: Optional[Tensor]) -> None:
        """Add one batch of the running evaluation."""
        if self._pred is None or self._true is None:
            return
        pred, true = predicted_class_counts(logits, labels, self.num_classes)
        self._pred += pred
        self._true += true

    def stop(self) -> tuple[Tensor, Tensor]:
        """End counting; returns the ``(predicted, true)`` histograms of the evaluation."""
        pred, true = self._pred, self._true
        self._pred = self._true = None
        empty = torch.zeros(self.num_classes, dtype=torch.long)
        return (empty, empty.clone()) if pred is None or true is None else (pred, true)

    def update(self, pred: Tensor, true: Tensor, step: int, split: str = "eval") -> Optional[str]:
        """Record one finished evaluation's histograms (summed over processes); returns the warning text when this
        evaluation completes a collapse (once per monitor), else ``None``."""
        if int(pred.sum()) == 0:  # nothing counted (no logits returned): no evidence either way
            return None
        self.last_predicted = pred.clone()
        several_labels = int((true > 0).sum()) >= 2 or int(true.sum()) == 0
        single = int((pred > 0).sum()) == 1 and several_labels
        self.streak = self.streak + 1 if single else 0
        if self.streak < self.patience or self.reported_at is not None:
            return None
        self.reported_at = step
        cls = int(pred.argmax())
        text = (f"every {split} example was predicted as class {cls} in {self.streak} evaluations in a row (last at "
                f"step {step}): the model's output no longer depends on its input (a collapse), so its task loss "
                f"cannot fall below the labels' entropy (at most ln(num_labels) = {math.log(self.num_classes):.3f}).")
        advice = self.advice()
        text = f"{text} {advice}" if advice else text
        warnings.warn(text, CollapseWarning, stacklevel=2)
        return text
