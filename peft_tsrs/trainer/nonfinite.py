"""Non-finite losses and gradients: stop with an error naming what went non-finite, or skip the step.

A NaN or infinity in one batch (a NaN in the inputs, a diverging regularizer term, an overflow in the backward pass)
used to flow through ``backward`` and the optimizer step into every trainable tensor, and the logs hid it:
``transformers.Trainer`` replaces a non-finite step loss by the running average of the interval
(``TrainingArguments.logging_nan_inf_filter``, on by default), so a run whose every step was NaN logged a loss of 0.0
while its weights were all NaN. :class:`NonFiniteGuard` checks, at every step,

* the task loss and each regularizer term (before ``backward``), and
* the gradients of the trainable parameters (before the optimizer step, after clipping),

and applies the policy ``on_nonfinite`` of :class:`~peft_tsrs.RegularizedTrainingArguments`: ``"stop"`` (default)
raises :class:`NonFiniteLossError` before anything non-finite reaches the weights, naming the term and the step;
``"skip"`` leaves that batch out of the update (its loss becomes a zero with zero gradients, so the other batches of a
gradient-accumulation step still count) and, when the gradients are non-finite or every batch of the optimizer step was
left out, skips the optimizer step (the gradients are discarded, so the optimizer leaves the weights and its moments
untouched); the logs count both (``nonfinite_losses_skipped``, ``nonfinite_steps_skipped``). Under mixed precision
with a loss scaler (``fp16``), overflowing gradients are left to the scaler, which skips those steps and lowers its
scale itself. The trainer also refuses to save non-finite weights (:func:`check_weights`), so a checkpoint or adapter
written by it is finite.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

ON_NONFINITE = ("stop", "skip")
TASK_TERM = "loss_task"  # the trainer's name of the task loss among the step's terms
_HOW_TO_SKIP = ("To skip such steps instead, set on_nonfinite='skip' in RegularizedTrainingArguments "
                "(--on_nonfinite skip).")


class NonFiniteLossError(RuntimeError):
    """A loss term, the gradients or the weights became NaN or infinite during training. Raised before the optimizer
    step (or the save) that would have written them into the weights, so the model and its checkpoints stay finite."""


def _describe(name: str) -> str:
    return "the task loss (cross-entropy)" if name == TASK_TERM else f"the regularizer term {name!r}"


def loss_message(name: str, value: float, step: int, learning_rate: float) -> str:
    """What went non-finite at ``step`` (counted from 1, as in the logs) and what to look at."""
    if name == TASK_TERM:
        cause = (f"the model's logits are not finite: look for NaN/inf in this batch's inputs, or weights that "
                 f"diverged (lower learning_rate, now {learning_rate:g})")
    else:
        cause = (f"check that regularizer's options (lower its weight) and learning_rate (now {learning_rate:g}), "
                 f"and look for NaN/inf in this batch's inputs")
    return f"{_describe(name)} is {value} at step {step}: {cause}."


def zero_loss(model: nn.Module) -> Tensor:
    """A loss of 0 whose gradient is exactly 0 for every trainable parameter (``nan_loss * 0`` would backpropagate
    ``0 · NaN = NaN``); it reaches every trainable parameter, so distributed gradient hooks still fire."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros((), requires_grad=True)
    return sum(p.sum() for p in params) * 0.0


def non_finite_names(named: list[tuple[str, Tensor]]) -> list[str]:
    """The names of the tensors holding NaN or ±inf."""
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()  # one sync
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_weights(model: nn.Module, step: int) -> None:
    """Raise :class:`NonFiniteLossError` when a trainable parameter holds NaN/inf (called before every save)."""
    bad = non_finite_names([(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad])
    if bad:
        raise NonFiniteLossError(
            f"not saving: {len(bad)} trainable tensor(s) hold NaN/inf at step {step} (e.g. {bad[0]!r}); the "
            f"training diverged. Lower learning_rate or the regularizer weights and train again.")


def _first(message: str) -> str:
    return message[0].upper() + message[1:]


class NonFiniteGuard(TrainerCallback):
    """Applies the ``on_nonfinite`` policy to the step's loss terms (:meth:`skip_loss`, called by the trainer before
    the loss is returned) and to the gradients (``on_pre_optimizer_step``).

    Args:
        policy: ``"stop"`` or ``"skip"`` (validated by :class:`~peft_tsrs.RegularizedTrainingArguments`).
        processes: The number of training processes.
        any_process: ``any_process(flag)`` is true when ``flag`` is true on some process (identity for one process);
            with several processes, a ``"stop"`` is decided together at the optimizer step so all of them stop.
        loss_scaling: Returns whether a gradient scaler handles overflowing gradients itself (fp16).
        learning_rate: The configured learning rate (named in the messages).
    """

    def __init__(self, policy: str, processes: int, any_process: Callable[[bool], bool],
                 loss_scaling: Callable[[], bool], learning_rate: float) -> None:
        self.policy = policy
        self.processes = processes
        self.any_process = any_process
        self.loss_scaling = loss_scaling
        self.learning_rate = learning_rate
        self.losses_skipped = 0
        self.steps_skipped = 0
        self._pending: Optional[str] = None  # a "stop" another process must learn of at the optimizer step
        self._kept = self._left_out = False  # whether a batch of the current optimizer step was kept / left out
        self._warned = False

    def skip_loss(self, values: dict[str, float], step: int) -> bool:
        """Whether this batch's loss must be replaced by :func:`zero_loss` because one of ``values`` (the terms by
        name, :data:`TASK_TERM` first) is non-finite; raises under ``"stop"`` (with one process)."""
        bad = next(((name, v) for name, v in values.items() if not math.isfinite(v)), None)
        if bad is None:
            self._kept = True
            return False
        message = loss_message(*bad, step=step + 1, learning_rate=self.learning_rate)
        if self.policy == "stop":
            if self.processes == 1:
                raise NonFiniteLossError(f"{_first(message)} Training stopped before this batch's backward pass: the "
                                         f"weights and saved checkpoints are finite. {_HOW_TO_SKIP}")
            self._pending = self._pending or message
        else:
            self.losses_skipped += 1
            self._left_out = True
            self._warn(message, "Batch left out of the update")
        return True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        scaler = self.loss_scaling()
        grads = [] if scaler else [
            (n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        bad = non_finite_names(grads)
        message, self._pending = self._pending, None
        kept, left_out = self._kept, self._left_out
        self._kept = self._left_out = False
        if bad and message is None:
            message = (f"the gradients of {len(bad)} trainable tensor(s) are NaN/inf at step {state.global_step + 1} "
                       f"(e.g. {bad[0]!r}) although the loss is finite: an overflow in the backward pass; lower "
                       f"learning_rate (now {self.learning_rate:g}) or the regularizer weights, or set max_grad_norm.")
        # Several processes decide together (one small all-reduce per step), so they all stop or skip alike; the
        # gradients themselves are already synchronized.
        if self.policy == "stop":
            stop = message is not None
            if self.processes > 1:
                stop = self.any_process(stop)
            if stop:
                message = message or f"another training process met a non-finite loss at step {state.global_step + 1}."
                raise NonFiniteLossError(f"{_first(message)} Training stopped before the optimizer step: the weights "
                                         f"and saved checkpoints are finite. {_HOW_TO_SKIP}")
            return
        if self.processes > 1:
            kept = self.any_process(kept)
        if bad or (left_out and not kept):  # non-finite gradients, or every batch of this step was left out
            for p in model.parameters():
                if p.grad is not None and scaler:
                    p.grad.zero_()  # the loss scaler's step needs gradients to inspect
                else:
                    p.grad = None  # the optimizer leaves the parameter alone: no momentum step, no weight decay
            self.steps_skipped += 1
            if bad:
                self._warn(message, "Optimizer step skipped")

    def _warn(self, message: str, what: str) -> None:
        if not self._warned:  # once per run; the logs count the rest
            self._warned = True
            warnings.warn(f"{_first(message)} {what} (on_nonfinite='skip'); the logs count the skipped batches and "
                          f"steps (nonfinite_losses_skipped, nonfinite_steps_skipped).", RuntimeWarning, stacklevel=3)

    def logs(self) -> dict[str, Any]:
        """The skip counts so far, for the training logs (nothing while none was skipped)."""
        counts = {"nonfinite_losses_skipped": self.losses_skipped, "nonfinite_steps_skipped": self.steps_skipped}
        return counts if any(counts.values()) else {}
