"""Classification metrics as an ``evaluate.Metric`` that works offline (``evaluate.load('accuracy')`` would fetch
its script from the Hub), plus the ``compute_metrics`` hook for ``Trainer``."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np


class ClassificationMetrics(evaluate.Metric):
    """Accuracy and macro-averaged F1 of single-label predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy and macro-F1 for single-label classification.",
            citation="",
            inputs_description="predictions and references: integer class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        accuracy = float((pred == ref).mean()) if len(ref) else 0.0
        f1s = []
        for c in np.unique(np.concatenate([pred, ref])):
            tp = np.sum((pred == c) & (ref == c))
            fp = np.sum((pred == c) & (ref != c))
            fn = np.sum((pred != c) & (ref == c))
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"accuracy": accuracy, "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``Trainer(compute_metrics=...)``: argmax of the logits against the labels."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return ClassificationMetrics().compute(predictions=np.argmax(logits, axis=-1), references=labels)
