"""Regularized self-labeling (Li & Zhang, NeurIPS 2021): label correction and loss reweighting."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .base import BuildContext, Regularizer, StepContext

__all__ = ["LabelCorrector", "SelfLabeling", "reweight_temperature", "reweighted_loss"]


class LabelCorrector:
    """Per-example training labels that are overwritten by confident, disagreeing predictions.

    From epoch ``start_epoch`` on, a sample whose max probability exceeds ``threshold`` and whose argmax
    differs from its stored label gets the argmax as its new label (persistently). The labels are
    training state: checkpoint them with ``state_dict()``; in multi-process training gather
    ``(indices, probs)`` from all processes before ``update`` so every process applies the same changes.
    """

    def __init__(
        self, labels: Tensor, threshold: float = 0.9, start_epoch: int = 10, index_column: str = "idx"
    ) -> None:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                f"labels must be a 1-D integer tensor (one class id per training example), got "
                f"dtype {labels.dtype} and shape {tuple(labels.shape)}."
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a probability and must be in [0, 1], got {threshold}.")
        self.labels = labels.detach().long().cpu().clone()
        self.original = self.labels.clone()
        self.threshold = float(threshold)
        self.start_epoch = int(start_epoch)
        self.index_column = index_column

    def __len__(self) -> int:
        return self.labels.numel()

    def _indices(self, indices: Tensor) -> Tensor:
        idx = torch.as_tensor(indices).reshape(-1).long().cpu()
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise ValueError(
                f"example index {bad} from column {self.index_column!r} is outside [0, {n}); the column must hold "
                "each training example's position in the training set."
            )
        return idx

    def labels_for(self, indices: Tensor) -> Tensor:
        """The current (possibly corrected) labels of ``indices``, on the device of ``indices``."""
        device = indices.device if isinstance(indices, Tensor) else torch.device("cpu")
        return self.labels[self._indices(indices)].to(device)

    @torch.no_grad()
    def update(self, indices: Tensor, probs: Tensor, epoch: float) -> int:
        """Apply the correction rule to one batch; returns how many examples changed label."""
        if int(epoch) < self.start_epoch:
            return 0
        idx = self._indices(indices)
        if probs.ndim != 2 or probs.shape[0] != idx.numel():
            raise ValueError(
                f"probs must have shape (batch, num_classes) with batch={idx.numel()}, got {tuple(probs.shape)}."
            )
        conf, pred = probs.detach().float().cpu().max(dim=-1)
        candidates = (conf > self.threshold) & (pred != self.labels[idx])
        if not bool(candidates.any()):
            return 0
        changed = idx[candidates]
        unique = changed.unique()
        before = self.labels[unique].clone()
        self.labels[changed] = pred[candidates]
        return int((self.labels[unique] != before).sum())

    @property
    def num_corrected(self) -> int:
        """How many examples currently differ from their original label."""
        return int((self.labels != self.original).sum())

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels.clone(), "original": self.original.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        labels, original = torch.as_tensor(state["labels"]), torch.as_tensor(state["original"])
        if labels.numel() != len(self) or original.numel() != len(self):
            raise ValueError(
                f"LabelCorrector holds {len(self)} labels but the checkpoint has {labels.numel()}; the training "
                "set changed since the checkpoint was written."
            )
        self.labels = labels.long().cpu().clone()
        self.original = original.long().cpu().clone()


def reweight_temperature(t0: float, epoch: float, start_epoch: int) -> float:
    """``T = t0 · max(0.5, exp(−0.1 · (epoch − start_epoch)))``."""
    return t0 * max(0.5, math.exp(-0.1 * (epoch - start_epoch)))


def reweighted_loss(per_sample_loss: Tensor, temperature: float) -> Tensor:
    """``Σ_i w_i l_i`` with ``w = softmax(−l / T)`` over the batch, computed without gradient."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if per_sample_loss.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of per-sample losses, got shape {tuple(per_sample_loss.shape)}.")
    with torch.no_grad():
        weights = torch.softmax(-per_sample_loss.detach().float() / temperature, dim=0).to(per_sample_loss.dtype)
    return (weights * per_sample_loss).sum()


class SelfLabeling(Regularizer):
    """Regularized self-labeling's two training-time parts as a trainer regularizer, each optional: label correction
    (the batch trains on the stored, possibly corrected labels; confident disagreeing predictions overwrite them after
    the step) and loss reweighting (``softmax(−l_i / T)`` weights from ``reweight_start_epoch`` on)."""

    def __init__(self, corrector: Optional[LabelCorrector] = None, reweight_start_epoch: Optional[int] = None,
                 reweight_temperature: float = 1.0) -> None:
        self.corrector = corrector
        self.reweight_start_epoch = reweight_start_epoch
        self.temperature = reweight_temperature
        self.needs_index = corrector is not None

    enabled_by = "uses_self_labeling"

    @classmethod
    def create(cls, build: BuildContext) -> "SelfLabeling":
        cfg = build.config
        corrector = None
        if cfg.uses_label_correction:
            indices, labels = build.index_and_labels()
            initial = torch.full((int(indices.max()) + 1 if len(indices) else 0,), -100, dtype=torch.long)
            initial[indices] = labels
            corrector = LabelCorrector(initial, threshold=cfg.label_correction_threshold,
                                       start_epoch=cfg.label_correction_start_epoch, index_column=cfg.index_column)
        return cls(corrector, cfg.reweight_start_epoch, cfg.reweight_temperature)

    def prepare(self, step: StepContext) -> None:
        if self.corrector is not None:
            step.labels = self.corrector.labels_for(step.indices).to(step.labels.device)

    def task_loss(self, per_example: Tensor, step: StepContext) -> Optional[Tensor]:
        if self.reweight_start_epoch is None or step.epoch < self.reweight_start_epoch:
            return None
        temperature = reweight_temperature(self.temperature, step.epoch, self.reweight_start_epoch)
        step.record("reweight_temperature", temperature)
        return reweighted_loss(per_example, temperature)

    def observe(self, step: StepContext) -> None:
        if self.corrector is not None:
            probs = step.logits.detach().float().softmax(-1)
            self.corrector.update(step.gather(step.indices).cpu(), step.gather(probs).cpu(), step.epoch)

    def logs(self) -> dict[str, float]:
        return {} if self.corrector is None else {"n_labels_corrected": int(self.corrector.num_corrected)}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.corrector is None else {"label_corrector": self.corrector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.corrector is not None and "label_corrector" in state:
            self.corrector.load_state_dict(state["label_corrector"])
