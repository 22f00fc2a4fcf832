"""Regularized self-labeling (Li & Zhang, NeurIPS 2021): label correction and loss reweighting.

Epochs are counted from 1, as in the official code: a training step belongs to epoch
:func:`epoch_number` ``= floor(state.epoch) + 1`` of the Trainer's fractional, 0-based ``state.epoch``. A start epoch
``s`` (``label_correction_start_epoch``, ``reweight_start_epoch``) therefore switches its part on for the steps with
``state.epoch >= s − 1``: the paper's "from epoch 10" is the tenth epoch, ``9 <= state.epoch < 10``; ``0`` and ``1``
both mean from the first step. (Releases before this one counted from 0, starting one epoch later: add 1 to a start
epoch of an older recipe to reproduce it.)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import TEMPERATURE_SCHEDULES
from .base import BuildContext, Regularizer, StepContext

__all__ = ["LabelCorrector", "SelfLabeling", "epoch_number", "reweight_temperature", "reweighted_loss",
           "scheduled_temperature"]


def epoch_number(epoch: float) -> int:
    """The 1-based number of the epoch a step at the Trainer's fractional, 0-based ``state.epoch`` belongs to:
    ``floor(epoch) + 1`` (``0 <= state.epoch < 1`` is epoch 1), the official code's epoch counter."""
    return math.floor(epoch) + 1


class LabelCorrector:
    """Per-example training labels that are overwritten by confident, disagreeing predictions.

    From epoch ``start_epoch`` on (counted from 1: steps with ``epoch_number(epoch) >= start_epoch``, i.e.
    ``state.epoch >= start_epoch − 1``), a sample whose max probability exceeds ``threshold`` and whose argmax
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

    def active(self, epoch: float) -> bool:
        """Whether correction runs at a step taken at ``state.epoch`` ``epoch`` (its epoch number >= start_epoch)."""
        return epoch_number(epoch) >= self.start_epoch

    @torch.no_grad()
    def update(self, indices: Tensor, probs: Tensor, epoch: float) -> int:
        """Apply the correction rule to one batch (``epoch``: ``state.epoch``); returns how many examples changed
        label."""
        if not self.active(epoch):
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
    """``T = t0 · max(0.5, exp(−0.1 · (epoch − start_epoch)))``, the formula as written (see
    :func:`scheduled_temperature` for the value a training step uses)."""
    return t0 * max(0.5, math.exp(-0.1 * (epoch - start_epoch)))


def scheduled_temperature(t0: float, epoch: float, start_epoch: int, schedule: str = "epoch") -> float:
    """The reweighting temperature of a step taken at ``state.epoch`` ``epoch``, reweighting from the 1-based epoch
    ``start_epoch``.

    ``"epoch"`` (official): T starts at ``t0`` and is updated once per epoch, when the 1-based epoch ``e`` ends and
    ``e > start_epoch``, to ``t0·max(0.5, exp(−0.1(e − start_epoch)))``. During a step, ``e = floor(state.epoch)``
    epochs have ended, so ``T = reweight_temperature(t0, max(floor(epoch), start_epoch), start_epoch)``: ``t0`` in
    epochs ``start_epoch`` and ``start_epoch + 1``, then one value per epoch down to the floor ``t0/2``.
    ``"step"`` (earlier releases): the formula at every step with the fractional epoch from the 0-based start,
    ``reweight_temperature(t0, epoch, max(start_epoch, 1) − 1)`` (``t0`` at the first reweighted step, then a smooth
    decay).
    """
    if schedule == "step":
        return reweight_temperature(t0, epoch, max(start_epoch, 1) - 1)
    if schedule != "epoch":
        raise ValueError(f"schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}.")
    return reweight_temperature(t0, max(math.floor(epoch), start_epoch), start_epoch)


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
    """Regularized self-labeling's two training-time parts as a trainer regularizer, each optional.

    Label correction: the batch trains on the stored, possibly corrected labels. With ``correction_timing=
    "before_loss"`` (official) :meth:`relabel` first lets this step's confident, disagreeing predictions (the detached
    logits of the step's forward) overwrite the stored labels, so the task loss already uses the corrected labels;
    with ``"after_loss"`` the correction happens in :meth:`observe` and counts from the example's next visit.
    Loss reweighting: ``softmax(−l_i / T)`` weights from the 1-based epoch ``reweight_start_epoch`` on, with T from
    :func:`scheduled_temperature` (``temperature_schedule``).
    """

    def __init__(self, corrector: Optional[LabelCorrector] = None, reweight_start_epoch: Optional[int] = None,
                 reweight_temperature: float = 1.0, temperature_schedule: str = "epoch",
                 correction_timing: str = "before_loss") -> None:
        self.corrector = corrector
        self.reweight_start_epoch = reweight_start_epoch
        self.temperature = reweight_temperature
        self.temperature_schedule = temperature_schedule
        self.correction_timing = correction_timing
        self.needs_index = corrector is not None

    enabled_by = "uses_self_labeling"

    @classmethod
    def per_example_use(cls, config: Any) -> list[str]:
        # a stored class per example, and a loss per example to reweight
        return [name for name, on in (("label correction", config.label_correction_threshold is not None),
                                      ("reweighting", config.reweight_start_epoch is not None)) if on]

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
        return cls(corrector, cfg.reweight_start_epoch, cfg.reweight_temperature,
                   temperature_schedule=cfg.reweight_temperature_schedule,
                   correction_timing=cfg.label_correction_timing)

    def prepare(self, step: StepContext) -> None:
        if self.corrector is not None:
            step.labels = self.corrector.labels_for(step.indices).to(step.labels.device)

    def _correct(self, step: StepContext) -> None:
        probs = step.logits.detach().float().softmax(-1)
        self.corrector.update(step.gather(step.indices).cpu(), step.gather(probs).cpu(), step.epoch)

    def relabel(self, step: StepContext) -> None:
        corrector = self.corrector
        if corrector is None or self.correction_timing != "before_loss" or not corrector.active(step.epoch):
            return
        self._correct(step)
        step.labels = corrector.labels_for(step.indices).to(step.labels.device)

    def task_loss(self, per_example: Tensor, step: StepContext) -> Optional[Tensor]:
        if self.reweight_start_epoch is None or epoch_number(step.epoch) < self.reweight_start_epoch:
            return None
        temperature = scheduled_temperature(self.temperature, step.epoch, self.reweight_start_epoch,
                                            self.temperature_schedule)
        step.record("reweight_temperature", temperature)
        return reweighted_loss(per_example, temperature)

    def observe(self, step: StepContext) -> None:
        if self.corrector is not None and self.correction_timing == "after_loss":
            self._correct(step)

    def logs(self) -> dict[str, float]:
        return {} if self.corrector is None else {"n_labels_corrected": int(self.corrector.num_corrected)}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.corrector is None else {"label_corrector": self.corrector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.corrector is not None and "label_corrector" in state:
            self.corrector.load_state_dict(state["label_corrector"])
