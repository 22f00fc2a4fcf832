"""`TSRSTrainer`: a ``transformers.Trainer`` that adds the regularizers of a :class:`TSRSConfig` to the loss.

Terms (each optional, composable, for any classification model: plain, LoRA, RLRR or PACE):

* TSRS noise stability — noise at the input of block I through hooks; the blocks below I run once, the blocks from I
  on run on ``[clean; noisy]``; ``λ · mean_{i≥N} ‖h̃_i − h_i‖ / ‖h_i‖``.
* PACE consistency — ``full`` duplicates the batch in one forward with shared dropout masks, ``lazy`` does so on half
  a batch every k steps, ``fast`` compares with the logits stored at the example's previous visit.
* Layer-wise distance constraint — projection after every optimizer step, or a soft penalty.
* Regularized self-labeling — label correction and loss reweighting with the temperature schedule.

Every evaluation also logs ``<split>_predicted_classes`` (how many classes the model predicts there) and warns
(:class:`~peft_tsrs.collapse.CollapseWarning`) when two evaluations in a row predict one class for every example, a
collapse that too large a learning rate or TSRS weight can cause.

Loss scaling follows the Trainer's ``num_items_in_batch`` convention, so gradient accumulation and several processes
give the same update as one large batch. Regularizer state (corrected labels, PACE-fast store) is saved in every
checkpoint and restored by ``train(resume_from_checkpoint=...)``; updates are gathered across processes so every
process holds the same state.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint_loading import load_renamed_checkpoint, needs_renamed_load
from .collapse import CollapseMonitor
from ..regularizers import (
    DistanceConstraint,
    FastConsistencyStore,
    LabelCorrector,
    NoiseStability,
    consistency_mse,
    find_blocks,
    lazy_should_apply,
    reweight_temperature,
    reweighted_loss,
    shared_dropout,
)
from .training_args import TSRSTrainingArguments
from ..config import TSRSConfig

STATE_FILE = "tsrs_state.pt"
LABEL_COLUMNS = ("label", "labels")
_NOT_SINGLE_LABEL = ("regression", "multi_label_classification")  # no single predicted class to count


def recipe_from_model(model: nn.Module) -> Optional[TSRSConfig]:
    """The ``tsrs`` recipe stored in the active PEFT adapter config, if any."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapter", None)
    names = [active] if isinstance(active, str) else list(active or configs)
    for name in names:
        recipe = getattr(configs.get(name), "tsrs", None)
        if recipe:
            return recipe if isinstance(recipe, TSRSConfig) else TSRSConfig.from_dict(recipe)
    return None


def _batch_size(inputs: dict[str, Any]) -> int:
    for value in inputs.values():
        if torch.is_tensor(value) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("TSRSTrainer: the batch holds no tensor with a batch dimension.")


def _map_batch(inputs: dict[str, Any], batch: int, fn) -> dict[str, Any]:
    return {k: fn(v) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch else v for k, v in inputs.items()}


class _ProjectAfterStep(TrainerCallback):
    """Runs the distance projection right after each optimizer step."""

    def __init__(self, constraint: DistanceConstraint) -> None:
        self.constraint = constraint

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.constraint.project()


class TSRSTrainer(Trainer):
    """``Trainer`` with TSRS, PACE consistency, distance constraints and self-labeling as loss hooks.

    Args:
        tsrs: The recipe. When ``None``: the ``TSRSConfig`` fields of ``args`` if it is a
            :class:`TSRSTrainingArguments` with non-default values, else the ``tsrs`` recipe stored in the PEFT adapter
            config, else no regularizer (plain fine-tuning).
        *args, **kwargs: As for ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, tsrs: Optional[TSRSConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if tsrs is None and isinstance(self.args, TSRSTrainingArguments):
            tsrs = self.args.tsrs_config()
        if tsrs is None:
            tsrs = recipe_from_model(self.model)
        self.tsrs: TSRSConfig = tsrs if tsrs is not None else TSRSConfig()
        self.tsrs.validate()
        # We scale the loss ourselves (see _scales): no extra division by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._components: dict[str, list[float]] = defaultdict(list)
        self._build_regularizers()
        self.collapse_monitor: Optional[CollapseMonitor] = self._build_collapse_monitor()

    # ------------------------------------------------------------------ construction
    def _build_regularizers(self) -> None:
        cfg, model = self.tsrs, self.model
        self.noise_stability: Optional[NoiseStability] = None
        self.distance: Optional[DistanceConstraint] = None
        self.label_corrector: Optional[LabelCorrector] = None
        self.fast_store: Optional[FastConsistencyStore] = None
        if cfg.uses_tsrs:
            _, blocks = find_blocks(model, cfg.tsrs_block_path)
            inject = len(blocks) // 2 if cfg.tsrs_inject_layer is None else cfg.tsrs_inject_layer
            self.noise_stability = NoiseStability(
                model, inject_layer=inject, measure_from=cfg.tsrs_measure_from, noise_std=cfg.tsrs_noise_std,
                weight=cfg.tsrs_weight, block_path=cfg.tsrs_block_path,
            )
        if cfg.uses_distance:
            self.distance = DistanceConstraint(
                model, norm=cfg.distance_norm, radius=cfg.distance_radius, ratio=cfg.distance_ratio,
                depth_scale=cfg.distance_depth_scale, head_radius=cfg.distance_head_radius, mode=cfg.distance_mode,
                penalty_weight=cfg.distance_penalty_weight, block_path=cfg.tsrs_block_path,
            )
            if cfg.distance_mode == "project":
                self.add_callback(_ProjectAfterStep(self.distance))
        if cfg.needs_index:
            indices, labels = self._index_and_labels()
            num_examples = int(indices.max()) + 1 if len(indices) else 0
            if cfg.uses_label_correction:
                initial = torch.full((num_examples,), -100, dtype=torch.long)
                initial[indices] = labels
                self.label_corrector = LabelCorrector(
                    initial, threshold=cfg.label_correction_threshold, start_epoch=cfg.label_correction_start_epoch,
                    index_column=cfg.index_column,
                )
            if cfg.uses_pace and cfg.pace_mode == "fast":
                self.fast_store = FastConsistencyStore(num_examples, self._num_labels(), index_column=cfg.index_column)

    def _num_labels(self) -> int:
        config = getattr(self.model, "config", None)
        num = getattr(config, "num_labels", None)
        if not num:
            raise ValueError("TSRSTrainer: PACE-fast needs `model.config.num_labels` to size its logit store.")
        return int(num)

    def _index_and_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.train_dataset
        column = self.tsrs.index_column
        names = getattr(ds, "column_names", None)
        if names is None or column not in names:
            raise ValueError(
                f"TSRSTrainer: label correction and PACE-fast need a stable per-example index column {column!r} in "
                f"train_dataset (found columns: {names}). Add one with "
                f"`ds = ds.map(lambda _, i: {{{column!r}: i}}, with_indices=True)` or set TSRSConfig.index_column."
            )
        label_column = next((c for c in LABEL_COLUMNS if c in names), None)
        if label_column is None:
            raise ValueError(f"TSRSTrainer: train_dataset has no 'label'/'labels' column (columns: {names}).")
        indices = torch.as_tensor(ds[column], dtype=torch.long)
        if len(indices) and (indices.min() < 0 or len(torch.unique(indices)) != len(indices)):
            raise ValueError(f"TSRSTrainer: column {column!r} must hold distinct non-negative example indices.")
        return indices, torch.as_tensor(ds[label_column], dtype=torch.long)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.tsrs.index_column not in self._signature_columns:
            self._signature_columns.append(self.tsrs.index_column)

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        indices = inputs.pop(self.tsrs.index_column, None)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("TSRSTrainer: the batch has no `labels`; the dataset needs a 'label' column.")
        if not model.training:
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits.float(), labels)
            return (loss, outputs) if return_outputs else loss
        return self._training_loss(model, inputs, labels, indices, return_outputs, num_items_in_batch)

    def _training_loss(self, model, inputs, labels, indices, return_outputs, num_items_in_batch):
        cfg = self.tsrs
        epoch = float(self.state.epoch or 0.0)
        batch = full_batch = _batch_size(inputs)
        if cfg.needs_index and indices is None:
            raise ValueError(f"TSRSTrainer: the batch has no {cfg.index_column!r} column (needed by label "
                             f"correction / PACE-fast). Keep it in the dataset and do not drop it in the collator.")
        if self.label_corrector is not None:
            labels = self.label_corrector.labels_for(indices).to(labels.device)

        paired = cfg.uses_pace and (
            cfg.pace_mode == "full"
            or (cfg.pace_mode == "lazy" and lazy_should_apply(self.state.global_step, cfg.pace_lazy_every))
        )
        if paired and cfg.pace_mode == "lazy":  # half a batch, duplicated: the cost of one normal step
            half = max(1, batch // 2)
            inputs = _map_batch(inputs, batch, lambda t: t[:half])
            labels = labels[:half]
            indices = None if indices is None else indices[:half]
            batch = half
        if paired:
            inputs = _map_batch(inputs, batch, lambda t: torch.cat([t, t], 0))

        with contextlib.ExitStack() as stack:
            if paired:
                stack.enter_context(shared_dropout(model))
            if self.noise_stability is not None:
                stack.enter_context(self.noise_stability.capture())
            outputs = model(**inputs)
            logits = outputs.logits
            terms: dict[str, torch.Tensor] = {}
            if self.noise_stability is not None:
                clean, noisy = self.noise_stability.split(logits)
                logits = noisy if cfg.tsrs_task_loss_path == "noisy" else clean
                terms["loss_tsrs"] = self.noise_stability.loss()
                self.noise_stability.release()
        if logits.ndim != 2:
            raise ValueError(f"TSRSTrainer supports single-label classification (logits of shape (batch, classes)); "
                             f"got logits of shape {tuple(logits.shape)}.")
        if paired:
            logits, second = logits.chunk(2, dim=0)
            terms["loss_pace"] = cfg.pace_weight * consistency_mse(logits.float(), second.float())
        elif cfg.uses_pace and cfg.pace_mode == "fast":
            terms["loss_pace"] = cfg.pace_weight * self.fast_store.loss(indices, logits.float())
            # every process stores every process's logits, so the store is identical everywhere
            self.fast_store.update(self._gather(indices), self._gather(logits.detach().float()))

        per_example = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100)
        reweighting = cfg.uses_reweighting and epoch >= cfg.reweight_start_epoch
        if reweighting:
            temperature = reweight_temperature(cfg.reweight_temperature, epoch, cfg.reweight_start_epoch)
            task = reweighted_loss(per_example, temperature)
            self._components["reweight_temperature"].append(temperature)
        else:
            task = per_example.mean()
        if self.distance is not None and cfg.distance_mode == "penalty":
            terms["loss_distance"] = self.distance.penalty()

        # a PACE-lazy half batch stands for the whole batch: its mean gets the whole batch's weight
        example_scale, batch_scale = self._scales(full_batch, num_items_in_batch)
        loss = task * example_scale + sum(t * batch_scale for t in terms.values())

        self._record(task, terms)
        if self.label_corrector is not None:
            probs = logits.detach().float().softmax(-1)
            self.label_corrector.update(self._gather(indices).cpu(), self._gather(probs).cpu(), epoch)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _record(self, task: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self._components["loss_task"].append(float(task.detach()))
        for name, value in terms.items():
            self._components[name].append(float(value.detach()))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._components:
            names = sorted(self._components)
            means = torch.tensor([sum(v) / len(v) for v in (self._components[n] for n in names)],
                                 device=self.args.device)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs.update({n: round(float(m), 6) for n, m in zip(names, means)})
            self._components.clear()
        if "loss" in logs and self.label_corrector is not None:
            logs["n_labels_corrected"] = int(self.label_corrector.num_corrected)
        if "loss" in logs and self.distance is not None:
            logs["distance_max_violation"] = round(float(self.distance.max_violation()), 6)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ collapse check
    def _build_collapse_monitor(self) -> Optional[CollapseMonitor]:
        """Counts each evaluation's predicted classes (logged as ``<split>_predicted_classes``) and warns once when
        the model predicts a single class several evaluations in a row; ``None`` for models without
        ``config.num_labels`` >= 2 and for regression / multi-label models."""
        config = getattr(self.model, "config", None)
        num = getattr(config, "num_labels", None)
        if not isinstance(num, int) or num < 2 or getattr(config, "problem_type", None) in _NOT_SINGLE_LABEL:
            return None
        return CollapseMonitor(num, advice=self._collapse_advice)

    def _collapse_advice(self) -> str:
        lr = f"learning_rate (now {self.args.learning_rate:g})"
        if self.noise_stability is None:
            return f"Lower {lr}."
        return (f"With TSRS this is the noise-stability term's trivial minimum (an input-independent representation "
                f"is perfectly noise-stable): lower tsrs_weight (now {self.tsrs.tsrs_weight:g}; try 10x smaller) or "
                f"{lr}.")

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
        state: dict[str, Any] = {"tsrs_config": self.tsrs.to_dict()}
        if self.label_corrector is not None:
            state["label_corrector"] = self.label_corrector.state_dict()
        if self.fast_store is not None:
            state["fast_store"] = self.fast_store.state_dict()
        return state

    def load_regularizer_state(self, state: dict[str, Any]) -> None:
        if self.label_corrector is not None and "label_corrector" in state:
            self.label_corrector.load_state_dict(state["label_corrector"])
        if self.fast_store is not None and "fast_store" in state:
            self.fast_store.load_state_dict(state["fast_store"])

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
