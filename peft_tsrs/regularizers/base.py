"""The one protocol every regularizer follows, and the registry the trainer builds them from.

A training step, as the trainer runs it for the active regularizers ``regs`` (in registry order)::

    for r in regs: r.prepare(step)                 # change the batch: labels, halving, duplication
    with r.forward_context(step) for r in regs:    # hooks for the one forward (noise, shared dropout)
        outputs = model(**step.inputs)
        rows = arange(len(outputs.logits))
        for r in regs: rows = r.select(rows, step)       # the forward's rows the task loss is computed on ...
        logits = outputs.logits
        for r in regs: logits = r.select(logits, step)   # ... and their logits
        step.task_rows, step.logits = rows, logits
        for r in regs: r.relabel(step)             # change step.labels from this step's (detached) predictions
        terms = {name: t for r in regs for name, t in r.loss(step).items()}   # already weighted
    task = first r.task_loss(per_example, step) that is not None, else per_example.mean()
    loss = task·(example scale) + Σ terms·(batch scale)
    for r in regs: r.observe(step)                  # update state from this step's predictions
    ... optimizer step ...
    for r in regs: r.after_step()                   # e.g. projections

Composition: a single forward serves every regularizer. A regularizer that needs a second pass does not run one; it
adds rows to the batch instead — at the input in ``prepare`` (PACE's second copy) or at a block inside
``forward_context`` (TSRS's noisy copy) — and removes them again in ``select``. ``select`` runs in registry order, so
the regularizer that adds rows deepest in the forward (TSRS, at block I) is listed before the one that adds them at
the input (PACE): each undoes its own duplication in the reverse order of the forward. ``select`` cuts rows by their
position only, so the trainer runs the chain twice: on the forward's row numbers (``step.task_rows``, for a regularizer
that reads another per-row tensor of the forward, such as the features the head reads) and then on the logits; what a
regularizer keeps from ``select`` for its loss (PACE's second copy) is what the last call, on the logits, gave it.

Adding a regularizer: one file in this folder with a :class:`Regularizer` subclass (``enabled_by`` names the config
property that switches it on, ``create`` builds it), and one :func:`register_regularizer` line in
``regularizers/__init__.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Optional

from torch import Tensor, nn

__all__ = ["BuildContext", "Regularizer", "StepContext", "batch_rows", "build_regularizers", "map_batch",
           "register_regularizer", "registered_regularizers"]


def batch_rows(inputs: dict[str, Any]) -> int:
    """The batch size of model inputs: the first dimension of their first tensor with one."""
    for value in inputs.values():
        if isinstance(value, Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("the batch holds no tensor with a batch dimension.")


def map_batch(inputs: dict[str, Any], rows: int, fn: Callable[[Tensor], Tensor]) -> dict[str, Any]:
    """``inputs`` with ``fn`` applied to every tensor whose first dimension is ``rows``."""
    return {k: fn(v) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == rows else v
            for k, v in inputs.items()}


@dataclass
class BuildContext:
    """What a regularizer may need to build itself: the config, the model and (lazily) the training set.

    Args:
        config: The validated :class:`~peft_tsrs.RegularizerConfig`.
        model: The model being trained (possibly PEFT-wrapped).
        index_and_labels: Returns ``(indices, labels)`` of the training set (raises a clear error when the set has
            no index column); only called by regularizers that keep per-example state.
        num_labels: Returns the number of classes of the model's head.
    """

    config: Any
    model: nn.Module
    index_and_labels: Callable[[], tuple[Tensor, Tensor]]
    num_labels: Callable[[], int]


@dataclass
class StepContext:
    """One training step as the regularizers see it; ``prepare`` may replace the batch fields.

    Attributes:
        model: The model (in training mode).
        inputs: The model inputs, without labels and example index.
        labels: The labels of ``inputs``' rows: one class id per row (classification) or one per token (``(B, L)``,
            ``-100`` where nothing is predicted: causal LM, token classification, seq2seq).
        indices: The example indices (``None`` when the batch carries none).
        epoch: ``state.epoch`` (fractional).
        step: ``state.global_step``.
        batch_size: The rows of the batch as the trainer received it (the scale of per-example terms).
        gather: Concatenates a tensor over all processes (identity with one process).
        record: ``record(name, value)`` logs a per-step scalar, averaged over the logging interval.
        logits: The task path's logits after every ``select``; set by the trainer after the forward.
            ``relabel`` may replace ``labels`` once they are set.
        rows: The distinct examples in this step's forward (default ``batch_size``; fewer when a regularizer keeps
            part of the batch); copies of them that regularizers add share their dropout masks.
        task_rows: The positions of the task path's rows in the forward (``logits`` is ``outputs.logits[task_rows]``),
            to pick the same rows from another per-row tensor of the forward; set with ``logits``.
        positions: For token-level tasks, the ``(rows, L)`` bool mask of the logit positions the task loss reads
            (``logits[positions]`` are the supervised predictions; shifted by one for a causal LM); ``None`` when the
            logits are one row per example. Set with ``logits``.
    """

    model: nn.Module
    inputs: dict[str, Any]
    labels: Tensor
    indices: Optional[Tensor]
    epoch: float
    step: int
    batch_size: int
    gather: Callable[[Tensor], Tensor]
    record: Callable[[str, float], None]
    logits: Optional[Tensor] = field(default=None)
    task_rows: Optional[Tensor] = field(default=None)
    rows: Optional[int] = None
    positions: Optional[Tensor] = field(default=None)

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = self.batch_size


class Regularizer:
    """Base class: every hook is optional and does nothing by default."""

    #: Whether the batch must carry the config's ``index_column`` (per-example state).
    needs_index: bool = False
    #: The config property that switches this regularizer on (``None``: always on).
    enabled_by: ClassVar[Optional[str]] = None

    @classmethod
    def per_example_use(cls, config: Any) -> list[str]:
        """What this regularizer, as ``config`` sets it, does that needs one class prediction per example
        (single-label classification), by name; the trainer refuses those on other tasks (causal LM, token
        classification, seq2seq, regression) before anything is built. Empty by default."""
        return []

    @classmethod
    def from_config(cls, build: BuildContext) -> Optional["Regularizer"]:
        """The regularizer the config asks for, or ``None`` when ``enabled_by`` says it is off."""
        if cls.enabled_by is not None and not getattr(build.config, cls.enabled_by):
            return None
        return cls.create(build)

    @classmethod
    def create(cls, build: BuildContext) -> "Regularizer":
        """Build the regularizer from the (validated) config; the values it reads are trusted."""
        raise NotImplementedError(f"{cls.__name__} must implement create()")

    def prepare(self, step: StepContext) -> None:
        """Change the batch before the forward (labels, rows)."""

    def forward_context(self, step: StepContext) -> ContextManager[Any]:
        """A context around the step's one forward (hooks)."""
        return contextlib.nullcontext()

    def select(self, logits: Tensor, step: StepContext) -> Tensor:
        """Undo this regularizer's row duplication: the logits of the rows the task loss is computed on.

        The rows kept must depend on their positions only: the trainer also runs the chain on the forward's row numbers
        (before the logits) to set ``step.task_rows``."""
        return logits

    def relabel(self, step: StepContext) -> None:
        """Change ``step.labels`` from this step's predictions (``step.logits``, to be used detached) after every
        ``select`` and before any loss is built, so the task loss of this very step uses the new labels."""

    def loss(self, step: StepContext) -> dict[str, Tensor]:
        """Named, already weighted loss terms of this step (each a per-batch mean)."""
        return {}

    def task_loss(self, per_example: Tensor, step: StepContext) -> Optional[Tensor]:
        """A reduction of the per-example task losses replacing their mean, or ``None``."""
        return None

    def observe(self, step: StepContext) -> None:
        """Update state from this step's predictions (``step.logits``), after the loss is built."""

    def after_step(self) -> None:
        """Runs right after every optimizer step."""

    def logs(self) -> dict[str, float]:
        """Values added to every training log line."""
        return {}

    def collapse_advice(self, learning_rate: str) -> Optional[str]:
        """What to change when the model collapses to one class, if this regularizer can cause it
        (``learning_rate`` describes the run's learning rate, to name it as the other knob)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Training state a resumed run needs (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (``state`` holds every regularizer's entries)."""


_REGISTRY: dict[str, type[Regularizer]] = {}


def register_regularizer(name: str, cls: type[Regularizer]) -> type[Regularizer]:
    """Add ``cls`` to the registry under ``name`` (its position is the order of terms, ``select`` and logs)."""
    if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
        raise TypeError(f"register_regularizer({name!r}, ...) needs a Regularizer subclass, got {cls!r}.")
    _REGISTRY[name] = cls
    return cls


def registered_regularizers() -> dict[str, type[Regularizer]]:
    """The registry, in order."""
    return dict(_REGISTRY)


def build_regularizers(build: BuildContext) -> dict[str, Regularizer]:
    """The regularizers ``build.config`` switches on, by registry name, in registry order."""
    built = {name: cls.from_config(build) for name, cls in _REGISTRY.items()}
    return {name: reg for name, reg in built.items() if reg is not None}
