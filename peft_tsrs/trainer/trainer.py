"""`RegularizedTrainer`: a ``transformers.Trainer`` that adds the regularizers of a :class:`RegularizerConfig` to
the loss; :class:`RegularizedTrainerMixin` adds them to any ``Trainer`` subclass.

The trainer knows no regularizer by name: it builds the ones the config switches on from the registry of
:mod:`peft_tsrs.regularizers` and runs each step through their common protocol (``prepare`` → one forward inside
their ``forward_context`` → ``select`` → ``relabel`` → ``loss`` → ``observe``; ``after_step`` after every optimizer
step). See ``peft_tsrs/regularizers/base.py`` for the protocol and how regularizers that need a second pass share one
forward.

Every evaluation also logs ``<split>_predicted_classes`` (how many classes the model predicts there) and warns
(:class:`~peft_tsrs.trainer.collapse.CollapseWarning`) when two evaluations in a row predict one class for every
example, a collapse that too large a learning rate or TSRS weight can cause.

A NaN or infinity in the task loss, a regularizer term or the gradients stops training with a
:class:`~peft_tsrs.trainer.NonFiniteLossError` naming it, before it reaches the weights (or skips the step, with
``on_nonfinite="skip"``; see :mod:`peft_tsrs.trainer.nonfinite`); non-finite weights are never saved. An empty
training set and labels outside ``[0, num_labels)`` are refused with a ``ValueError`` saying what to change.

Loss scaling follows the Trainer's ``num_items_in_batch`` convention, so gradient accumulation and several processes
give the same update as one large batch. Regularizer state (corrected labels, PACE-fast store) is saved in every
checkpoint and restored by ``train(resume_from_checkpoint=...)``; updates are gathered across processes so every
process holds the same state.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import RegularizerConfig
from ..regularizers import BuildContext, Regularizer, StepContext, build_regularizers, registered_regularizers
from ..regularizers.base import batch_rows
from ..regularizers.blocks import unwrap_model
from .checkpoint_loading import load_renamed_checkpoint, needs_renamed_load
from .collapse import CollapseMonitor
from .nonfinite import TASK_TERM, NonFiniteGuard, check_weights, zero_loss
from .task_loss import (
    IGNORE_INDEX,
    count_items,
    decoder_inputs,
    is_single_label_classifier,
    model_loss,
    supervised_positions,
)
from .training_args import RegularizedTrainingArguments

STATE_FILE = "tsrs_state.pt"
LABEL_COLUMNS = ("label", "labels")
_NOT_SINGLE_LABEL = ("regression", "multi_label_classification")  # no single predicted class to count
# Fields of a PEFT adapter config that hold a stored recipe: the current name first, then the deprecated one.
RECIPE_FIELDS = ("regularizers", "tsrs")


def recipe_from_model(model: nn.Module) -> Optional[RegularizerConfig]:
    """The regularizer recipe stored in the active PEFT adapter config, if any."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapter", None)
    names = [active] if isinstance(active, str) else list(active or configs)
    for name in names:
        for field_name in RECIPE_FIELDS:
            recipe = getattr(configs.get(name), field_name, None)
            if recipe:
                return recipe if isinstance(recipe, RegularizerConfig) else RegularizerConfig.from_dict(recipe)
    return None


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``model`` (under PEFT / accelerate wrappers) runs with gradient checkpointing on."""
    base = unwrap_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the first: transformers >= 5.x
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


class _AfterOptimizerStep(TrainerCallback):
    """Runs every regularizer's ``after_step`` right after each optimizer step."""

    def __init__(self, regularizers: list[Regularizer]) -> None:
        self.regularizers = regularizers

    def on_optimizer_step(self, args, state, control, **kwargs):
        for regularizer in self.regularizers:
            regularizer.after_step()


class RegularizedTrainerMixin:
    """Adds the regularizers of a :class:`RegularizerConfig` to a ``transformers.Trainer`` subclass:
    ``class MyTrainer(RegularizedTrainerMixin, SomeTrainer)``.

    Args:
        regularizers: The recipe. When ``None``: the regularizer fields of ``args`` if it is a
            :class:`RegularizedTrainingArguments` with non-default values, else the recipe stored in the PEFT
            adapter config, else no regularizer (plain fine-tuning).
        tsrs: Deprecated name of ``regularizers``.
        *args, **kwargs: As for the ``Trainer`` class it is mixed into.
    """

    def __init__(self, *args: Any, regularizers: Optional[RegularizerConfig] = None,
                 tsrs: Optional[RegularizerConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if tsrs is not None:
            warnings.warn("the `tsrs=` argument is renamed `regularizers=`; the old name will be removed.",
                          FutureWarning, stacklevel=2)
        config = regularizers if regularizers is not None else tsrs
        if config is None and isinstance(self.args, RegularizedTrainingArguments):
            config = self.args.regularizer_config()
        if config is None:
            config = recipe_from_model(self.model)
        self.regularizer_config: RegularizerConfig = config if config is not None else RegularizerConfig()
        # We scale the loss ourselves (see _scales): no extra division by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._components: dict[str, list[float]] = defaultdict(list)
        self._open_contexts: list[contextlib.ExitStack] = []  # kept until backward under gradient checkpointing
        # what the task loss looks like: one class per example, or labels shifted by one (causal LM; Trainer's rule)
        self._classifier = is_single_label_classifier(self.model)
        self._shifts = bool(getattr(self, "_loss_shifts_labels", False))
        self.regularizers: dict[str, Regularizer] = build_regularizers(BuildContext(
            config=self.regularizer_config, model=self.model, index_and_labels=self._index_and_labels,
            num_labels=self._num_labels,
        ))
        self.needs_index = any(r.needs_index for r in self.regularizers.values())
        if not self._classifier:
            self._refuse_per_example(f"no single class per example ({type(unwrap_model(self.model)).__name__})")
        reweights = any(type(r).task_loss is not Regularizer.task_loss for r in self.regularizers.values())
        if reweights and (self.compute_loss_func is not None or self.label_smoother is not None):
            raise ValueError("RegularizedTrainer: loss reweighting (reweight_start_epoch) weights the per-example "
                             "cross-entropy and cannot be combined with compute_loss_func or label_smoothing_factor; "
                             "use one or the other.")
        self.add_callback(_AfterOptimizerStep(list(self.regularizers.values())))
        self.nonfinite_guard = NonFiniteGuard(
            getattr(self.args, "on_nonfinite", "stop"), processes=self.accelerator.num_processes,
            any_process=self._any_process, loss_scaling=lambda: self.accelerator.scaler is not None,
            learning_rate=self.args.learning_rate,
        )
        self.add_callback(self.nonfinite_guard)
        self.collapse_monitor: Optional[CollapseMonitor] = self._build_collapse_monitor()

    @property
    def tsrs(self) -> RegularizerConfig:
        """Deprecated name of :attr:`regularizer_config`."""
        return self.regularizer_config

    # ------------------------------------------------------------------ input checks
    def train(self, *args: Any, **kwargs: Any):
        self._check_train_dataset()
        return super().train(*args, **kwargs)

    def _check_train_dataset(self) -> None:
        """An empty training set, or (when the dataset has a label column, read without its transforms) a label
        outside ``[0, num_labels)``, fails here with what to change instead of in torch's sampler or loss."""
        ds = self.train_dataset
        if ds is None or not hasattr(ds, "__len__"):
            return
        if len(ds) == 0:
            raise ValueError("RegularizedTrainer: the training set is empty (train_dataset has 0 examples); check the "
                             "filtering and the split that built it.")
        names = getattr(ds, "column_names", None)
        column = next((c for c in LABEL_COLUMNS if c in (names or ())), None)
        classes = self._single_label_classes()
        if column is None or classes is None or not hasattr(ds, "with_format"):
            return
        labels = torch.as_tensor(ds.with_format("numpy")[column])
        if labels.ndim == 1 and not labels.is_floating_point():
            self._check_labels(labels, classes, f"train_dataset column {column!r}")

    def _single_label_classes(self) -> Optional[int]:
        """``model.config.num_labels`` of a single-label classifier, else ``None``."""
        if not self._classifier:
            return None
        config = getattr(self.model, "config", None)
        num = getattr(config, "num_labels", None)
        if not isinstance(num, int) or getattr(config, "problem_type", None) in _NOT_SINGLE_LABEL:
            return None
        return num

    @staticmethod
    def _check_labels(labels: torch.Tensor, classes: int, where: str = "the batch") -> None:
        """``ValueError`` naming the first label outside ``[0, classes)`` (``IGNORE_INDEX`` is allowed)."""
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= classes))
        if bool(bad.any()):
            values = labels[bad]
            raise ValueError(
                f"RegularizedTrainer: label {int(values[0])} in {where} is out of range for a model with {classes} "
                f"classes ({values.numel()} label(s) outside [0, {classes}); {IGNORE_INDEX} marks an ignored example). "
                f"Set num_labels in the model config to the number of classes (e.g. from_pretrained(..., "
                f"num_labels={max(int(labels.max()) + 1, classes)})) or map the labels to 0..{classes - 1}.")

    # ------------------------------------------------------------------ what the regularizers may ask for
    def _num_labels(self) -> int:
        config = getattr(self.model, "config", None)
        num = getattr(config, "num_labels", None)
        if not num:
            raise ValueError("RegularizedTrainer: PACE-fast needs `model.config.num_labels` to size its logit store.")
        return int(num)

    def _index_and_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._classifier:  # asked while the regularizers are built
            self._refuse_per_example(f"no single class per example ({type(unwrap_model(self.model)).__name__})")
        ds = self.train_dataset
        column = self.regularizer_config.index_column
        names = getattr(ds, "column_names", None)
        if names is None or column not in names:
            raise ValueError(
                f"RegularizedTrainer: label correction and PACE-fast need a stable per-example index column "
                f"{column!r} in train_dataset (found columns: {names}). Add one with "
                f"`ds = ds.map(lambda _, i: {{{column!r}: i}}, with_indices=True)` or set "
                f"RegularizerConfig.index_column."
            )
        label_column = next((c for c in LABEL_COLUMNS if c in names), None)
        if label_column is None:
            raise ValueError(f"RegularizedTrainer: train_dataset has no 'label'/'labels' column (columns: {names}).")
        indices = torch.as_tensor(ds[column], dtype=torch.long)
        if len(indices) and (indices.min() < 0 or len(torch.unique(indices)) != len(indices)):
            raise ValueError(f"RegularizedTrainer: column {column!r} must hold distinct non-negative example indices.")
        return indices, torch.as_tensor(ds[label_column], dtype=torch.long)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.regularizer_config.index_column not in self._signature_columns:
            self._signature_columns.append(self.regularizer_config.index_column)

    # ------------------------------------------------------------------ loss
    def _scales(self, local_batch: int, num_items_in_batch) -> tuple[float, float]:
        """(scale of per-example-mean terms, scale of per-batch terms) so that accumulation and processes average."""
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if num_items_in_batch is None:
            return 1.0 / ga, 1.0 / ga
        total = float(num_items_in_batch)
        world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return local_batch * world / total, 1.0 / ga

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.accelerator.num_processes > 1 else tensor

    def _any_process(self, flag: bool) -> bool:
        return bool(self._gather(torch.tensor([flag], device=self.args.device)).any())

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:  # the forward contexts a checkpointed step kept open for its backward
            while self._open_contexts:
                self._open_contexts.pop().close()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        indices = inputs.pop(self.regularizer_config.index_column, None)
        if not model.training:  # evaluation: the model's (or compute_loss_func's / label smoother's) own loss
            labels = inputs.get("labels")
            classes = self._single_label_classes()
            if classes is not None and labels is not None and labels.ndim == 1 and not labels.is_floating_point():
                self._check_labels(labels, classes)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("RegularizedTrainer: the batch has no `labels`; the dataset needs a 'label' column "
                             "(classification) or a 'labels' column (token-level tasks: -100 where nothing is "
                             "predicted).")
        return self._training_loss(model, inputs, labels, indices, return_outputs, num_items_in_batch)

    def _training_loss(self, model, inputs, labels, indices, return_outputs, num_items_in_batch):
        if self.needs_index and indices is None:
            column = self.regularizer_config.index_column
            raise ValueError(f"RegularizedTrainer: the batch has no {column!r} column (needed by label correction / "
                             f"PACE-fast). Keep it in the dataset and do not drop it in the collator.")
        per_class = labels.ndim == 1 and not labels.is_floating_point() and self._classifier
        if not per_class:
            self._refuse_per_example(f"labels of shape {tuple(labels.shape)}")
        inputs = decoder_inputs(model, inputs, labels)
        regularizers = list(self.regularizers.values())
        step = StepContext(
            model=model, inputs=inputs, labels=labels, indices=indices, epoch=float(self.state.epoch or 0.0),
            step=self.state.global_step, batch_size=batch_rows(inputs), rows=batch_rows(inputs), gather=self._gather,
            record=lambda name, value: self._components[name].append(value),
        )
        for regularizer in regularizers:
            regularizer.prepare(step)
        stack = contextlib.ExitStack()
        with stack:
            for regularizer in regularizers:
                stack.enter_context(regularizer.forward_context(step))
            outputs = model(**step.inputs)
            logits = outputs.logits
            rows = torch.arange(logits.shape[0], device=logits.device)
            for regularizer in regularizers:  # the positions of the task path's rows, then their logits
                rows = regularizer.select(rows, step)
            for regularizer in regularizers:
                logits = regularizer.select(logits, step)
            token_level = step.labels.ndim >= 2 and not step.labels.is_floating_point()
            step.task_rows, step.logits = rows, logits
            step.positions = supervised_positions(step.labels, self._shifts) if token_level else None
            for regularizer in regularizers:
                regularizer.relabel(step)
            terms: dict[str, torch.Tensor] = {}
            for regularizer in regularizers:
                terms.update(regularizer.loss(step))
            if _checkpointing(model) and torch.is_grad_enabled():
                # gradient checkpointing re-runs the blocks' forwards during backward: their noise and shared
                # dropout must still be there (the same draws: the checkpoint restores the RNG state)
                self._open_contexts.append(stack.pop_all())

        task, task_scaled = self._task_loss(model, step, logits, per_class, token_level, regularizers,
                                            num_items_in_batch)
        _, batch_scale = self._scales(step.batch_size, num_items_in_batch)
        loss = task_scaled + sum(t * batch_scale for t in terms.values())

        values = {name: float(t.detach()) for name, t in {TASK_TERM: task, **terms}.items()}
        if self.nonfinite_guard.skip_loss(values, self.state.global_step):  # raises under on_nonfinite="stop"
            loss = zero_loss(model)  # nothing of this batch reaches the update, nor the regularizers' state
            return (loss, outputs) if return_outputs else loss
        for name, value in values.items():
            self._components[name].append(value)
        for regularizer in regularizers:
            regularizer.observe(step)
        return (loss, outputs) if return_outputs else loss

    def _task_loss(self, model, step: StepContext, logits: torch.Tensor, per_class: bool, token_level: bool,
                   regularizers: list[Regularizer], num_items_in_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(task loss as logged, its share of the step's loss)``: ``compute_loss_func`` or the label smoother when
        the trainer has one, else the model's own loss (per example for single-label classification, where
        regularizers may reweight it). The share is scaled like ``Trainer``'s: gradient accumulation and several
        processes give the update of one large batch."""
        labels = step.labels
        world = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        ga = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        custom = self.compute_loss_func is not None or self.label_smoother is not None
        if custom:  # normalized by num_items_in_batch (the whole accumulated batch) when the Trainer gives it
            output = CausalLMOutput(logits=logits)  # what the model would return: `.logits` / `['logits']`
            if self.compute_loss_func is not None:
                task = self.compute_loss_func(output, labels, num_items_in_batch=num_items_in_batch)
            else:
                task = self.label_smoother(output, labels, shift_labels=token_level and self._shifts,
                                           num_items_in_batch=num_items_in_batch)
            return task, (task * world if num_items_in_batch is not None else task / ga)
        if per_class:
            if not labels.is_floating_point():
                self._check_labels(labels, logits.shape[-1])
            per_example = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=IGNORE_INDEX)
            task = next((t for t in (r.task_loss(per_example, step) for r in regularizers) if t is not None), None)
            if task is None:
                task = per_example.mean()
            # a PACE-lazy half batch stands for the whole batch: its mean gets the whole batch's weight
            items = step.batch_size
        else:
            task = model_loss(model, logits, labels)
            items = count_items(labels, self._shifts) if token_level else step.batch_size
            if step.rows != step.batch_size and token_level:  # PACE-lazy's half batch stands for the whole batch
                items = items * step.batch_size / max(step.rows, 1)
        if num_items_in_batch is None:
            return task, task / ga
        return task, task * (items * world / num_items_in_batch)

    def _refuse_per_example(self, what: str) -> None:
        """Regularizers that need one class prediction per example, on a task that has none: a clear error."""
        names = [name for cls in registered_regularizers().values()
                 for name in cls.per_example_use(self.regularizer_config)]
        if names:
            raise ValueError(self._per_example_message(", ".join(names), what))

    @staticmethod
    def _per_example_message(names: str, what: str) -> str:
        return (f"RegularizedTrainer: {names} cannot run on this model: it needs one class prediction per example "
                f"(single-label classification), and this model's task has {what}. Label correction and reweighting "
                f"need a class per example, PACE-fast stores one row of logits per example. Turn them off for this task "
                f"(label_correction_threshold=None, reweight_start_epoch=None; pace_mode='full' or 'lazy').")

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._components:
            names = sorted(self._components)
            means = torch.tensor([sum(v) / len(v) for v in (self._components[n] for n in names)],
                                 device=self.args.device)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            # 6 significant digits, so a small term (BSS at weight 1e-3) does not round to 0
            logs.update({n: float(f"{float(m):.6g}") for n, m in zip(names, means)})
            self._components.clear()
        if "loss" in logs:
            for regularizer in self.regularizers.values():
                logs.update(regularizer.logs())
            logs.update(self.nonfinite_guard.logs())
        super().log(logs, start_time)

    # ------------------------------------------------------------------ collapse check
    def _build_collapse_monitor(self) -> Optional[CollapseMonitor]:
        """Counts each evaluation's predicted classes (logged as ``<split>_predicted_classes``) and warns once when
        the model predicts a single class several evaluations in a row; ``None`` for models without
        ``config.num_labels`` >= 2, for regression / multi-label models and for other tasks (causal LM, ...)."""
        if not self._classifier:
            return None
        config = getattr(self.model, "config", None)
        num = getattr(config, "num_labels", None)
        if not isinstance(num, int) or num < 2 or getattr(config, "problem_type", None) in _NOT_SINGLE_LABEL:
            return None
        return CollapseMonitor(num, advice=self._collapse_advice)

    def _collapse_advice(self) -> str:
        lr = f"learning_rate (now {self.args.learning_rate:g})"
        advice = (r.collapse_advice(lr) for r in self.regularizers.values())
        return next((a for a in advice if a), f"Lower {lr}.")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        monitor = self.collapse_monitor
        if monitor is None or not monitor.counting:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        # the logits are needed for the count even when the caller keeps only the loss (no compute_metrics)
        loss, logits, labels = super().prediction_step(model, inputs, False, ignore_keys=ignore_keys)
        monitor.observe(logits, labels)
        return (loss, None, None) if prediction_loss_only else (loss, logits, labels)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        monitor = self.collapse_monitor
        if monitor is None:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        monitor.start()
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            pred, true = monitor.stop()
        if self.accelerator.num_processes > 1:  # every process evaluates its shard: sum the histograms
            both = torch.stack([pred, true]).to(self.args.device, torch.float64)
            pred, true = self.accelerator.reduce(both, reduction="sum").round().long().cpu()
        if int(pred.sum()):
            output.metrics[f"{metric_key_prefix}_predicted_classes"] = int((pred > 0).sum())
        monitor.update(pred, true, self.state.global_step, metric_key_prefix)
        return output

    # ------------------------------------------------------------------ state in checkpoints
    def regularizer_state(self) -> dict[str, Any]:
        """Everything a resumed run needs besides model, optimizer and RNG states."""
        state: dict[str, Any] = {"tsrs_config": self.regularizer_config.to_dict()}
        for regularizer in self.regularizers.values():
            state.update(regularizer.state_dict())
        return state

    def load_regularizer_state(self, state: dict[str, Any]) -> None:
        for regularizer in self.regularizers.values():
            regularizer.load_state_dict(state)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # sharded parameters: not checked here
            check_weights(self.model, self.state.global_step)  # before anything is written
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.regularizer_state(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._load_renamed(self.model if model is None else model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            self.load_regularizer_state(torch.load(path, map_location="cpu", weights_only=True))

    def _load_best_model(self) -> None:
        folder = self.state.best_model_checkpoint
        if not (folder and self._load_renamed(self.model, folder)):
            super()._load_best_model()

    def _load_renamed(self, model: nn.Module, folder: str) -> bool:
        """Load a full-model checkpoint saved under renamed weights (see ``peft_tsrs.checkpoint_loading``); ``False``
        when Trainer's own loading is right (adapters, matching names, DeepSpeed / FSDP)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not needs_renamed_load(model, folder):
            return False
        load_renamed_checkpoint(model, folder)
        return True


class RegularizedTrainer(RegularizedTrainerMixin, Trainer):
    """``transformers.Trainer`` with TSRS, PACE consistency, distance constraints and self-labeling as loss hooks
    (see :class:`RegularizedTrainerMixin` for the arguments)."""
