"""Run a recipe end to end: data, model, adapter, RegularizedTrainer, selection on validation, test, diagnostics, and a
Hub-ready output folder.

Output folder ``<output_dir>/<name>/``:

* ``adapter/`` — ``save_pretrained`` output (adapter weights + ``adapter_config.json``, or the full model for
  ``adapter.type: full``), tokenizer if any, and a model card ``README.md`` naming method, recipe and results;
* ``metrics.json`` — validation/test metrics of the selected epoch, timings, per-epoch history, diagnostics; an
  instruction task (``wordnet_chat``) also records its metrics before training (``before_training``: the zero-shot
  exact match of the base model, on validation and test);
* ``recipe.yaml`` — the resolved recipe; ``training_curves.png`` — losses and the validation score.

The folder is written under a temporary name next to it (``<output_dir>/.<name>.partial-*``) and renamed when the run
has finished: a run that fails (bad value, missing model, error or Ctrl-C during training) leaves no folder behind,
and a rerun under the same name replaces the previous run folder only once it has succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import torch
import yaml
from peft import PeftModel
from transformers import TrainerCallback, TrainingArguments, set_seed

from .. import diagnostics
from .adapters import apply_adapter
from .generation import GenerationEvalMixin
from ..metrics import compute_metrics
from .model_card import write_model_card
from .plots import plot_training_curves
from .recipes import Recipe
from .tasks import TaskData, build_model, build_task
from ..trainer import RegularizedTrainer

CHECKPOINTS = "checkpoints"


def training_arguments(recipe: Recipe, run_dir: str, progress: bool = True) -> TrainingArguments:
    """The HF TrainingArguments of a recipe: evaluate and checkpoint every epoch, keep the best on validation."""
    t = recipe.training
    return TrainingArguments(
        output_dir=os.path.join(run_dir, CHECKPOINTS),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the total steps
        lr_scheduler_type="constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler,
        eval_strategy="epoch" if t.max_steps <= 0 else "steps",
        eval_steps=None if t.max_steps <= 0 else max(1, t.max_steps // 2),
        save_strategy="epoch" if t.max_steps <= 0 else "steps",
        save_steps=max(1, t.max_steps // 2) if t.max_steps > 0 else 500,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=t.select_on,
        greater_is_better=True,
        logging_steps=t.logging_steps,
        seed=t.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


class GenerativeTrainer(GenerationEvalMixin, RegularizedTrainer):
    """The trainer of instruction tasks: RegularizedTrainer whose evaluations add generation exact match."""


class FitAtEnd(TrainerCallback):
    """Evaluates the training set (``train_end_*``) with the model as training left it, at the end of the last
    epoch: before ``load_best_model_at_end`` swaps in the checkpoint selected on validation. Whether a run reached
    the regime where the model fits its training labels is a property of where training ended, not of the
    selected checkpoint."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.trainer: Optional[RegularizedTrainer] = None
        self.metrics: Optional[dict[str, Any]] = None

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer is not None and self.metrics is None and state.global_step >= state.max_steps:
            # evaluate() clears the flags the epoch's end just set: the last validation and checkpoint must happen
            flags = {k: getattr(control, k) for k in ("should_evaluate", "should_save", "should_log")}
            self.metrics = self.trainer.evaluate(self.dataset, metric_key_prefix="train_end")
            for key, value in flags.items():
                setattr(self.trainer.control, key, value)
            return self.trainer.control


def trainer_class(data: TaskData) -> type:
    """The Trainer class a run uses: RegularizedTrainer, with generation evaluation for an instruction task."""
    return GenerativeTrainer if data.generative else RegularizedTrainer


def _diagnose(model, trainer: RegularizedTrainer, data: TaskData, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The papers' explanatory quantities on the trained model (merged effective weights). On an instruction task the
    loss is the model's own (answer tokens) and the batches are smaller (8 rows: a causal LM's logits are large)."""
    report = diagnostics.summarize(model, reference=reference)
    collate = data.collator
    rows = 8 if data.generative else 32
    val = data.splits["validation"]
    batch = collate([val[i] for i in range(min(rows, len(val)))])
    batch = {k: v.to(trainer.args.device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                              "token_type_ids", "pixel_values")}
    report["noise_sensitivity"] = diagnostics.noise_sensitivity(model, batch, noise_std=0.2, layer=0)
    train = data.splits["train"]
    train_batch = collate([train[i] for i in range(min(rows, len(train)))])
    labels = train_batch.pop("labels").to(trainer.args.device)
    train_batch = {k: v.to(trainer.args.device) for k, v in train_batch.items() if k != "index"}

    def loss_fn(m):
        if data.generative:  # answer tokens only (-100 elsewhere), shifted by the model
            return m(**train_batch, labels=labels).loss.float()
        return torch.nn.functional.cross_entropy(m(**train_batch).logits.float(), labels)

    sharp = diagnostics.sharpness_1d(model, loss_fn, radius=0.05, n_points=7)
    report["sharpness_1d"] = sharp["sharpness"]
    model.zero_grad(set_to_none=True)
    model.train()
    loss_fn(model).backward()
    report["gradient_norm"] = diagnostics.gradient_norm(model)
    model.zero_grad(set_to_none=True)
    model.eval()
    return report


def run_recipe(recipe: Recipe, progress: bool = True, keep_checkpoints: bool = False) -> dict[str, Any]:
    """Fine-tune as ``recipe`` says and write the run folder; returns the metrics dict (also in metrics.json).

    Everything is written into a temporary folder next to ``recipe.run_dir`` that becomes the run folder at the end;
    on any failure it is removed (and so are the parent folders this call created): a failed run leaves nothing.
    """
    recipe.validate()
    run_dir = recipe.run_dir
    _check_target(run_dir)
    parent = os.path.dirname(os.path.abspath(run_dir))
    created = _missing_folders(parent)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(run_dir))}.partial-"
    _remove_stale(parent, prefix)
    work = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        metrics, model_path = _run(recipe, work, progress, keep_checkpoints)
        _move_into_place(work, run_dir)
        if keep_checkpoints:
            _relocate_checkpoints(run_dir, work, model_path, metrics["base_model"])
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in reversed(created):  # only the folders this call made, and only if still empty
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    return metrics


RUN_MARKERS = ("recipe.yaml", "metrics.json", "adapter")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale(parent: str, prefix: str) -> None:
    """Temporary folders of this run name left by a process that no longer exists (killed with SIGKILL, out of
    memory): ``<prefix><pid>-<random>``. Those of a live process (a concurrent run of the same name) stay."""
    for entry in os.listdir(parent):
        pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _check_target(run_dir: str) -> None:
    """A run may replace an earlier run folder (a rerun under the same name), never another folder or a file."""
    if os.path.isfile(run_dir):
        raise ValueError(f"the run folder {run_dir} is a file; choose another name or output_dir.")
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not any(
            os.path.exists(os.path.join(run_dir, m)) for m in RUN_MARKERS):
        raise ValueError(f"{run_dir} exists and is not a peft-tsrs run folder (no recipe.yaml, metrics.json or "
                         f"adapter/); choose another name or output_dir, or remove it.")


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    return missing[::-1]


def _move_into_place(work: str, run_dir: str) -> None:
    """Rename the finished ``work`` folder to ``run_dir``; an earlier run folder there is replaced."""
    if not os.path.lexists(run_dir):
        os.rename(work, run_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(run_dir))}.old-",
                           dir=os.path.dirname(os.path.abspath(run_dir)))
    os.rmdir(old)
    os.rename(run_dir, old)
    try:
        os.rename(work, run_dir)
    except BaseException:
        os.rename(old, run_dir)  # put the earlier run back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _relocate_checkpoints(run_dir: str, work: str, model_path: str, base_model: str) -> None:
    """Kept checkpoints name the best checkpoint by its path in the temporary folder, and the base model by the
    local folder it was loaded from: point them at the run folder and at the recorded base model name."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        checkpoint = os.path.join(folder, name)
        path = os.path.join(checkpoint, "trainer_state.json")
        if os.path.isfile(path):
            with open(path) as fh:
                state = json.load(fh)
            best = state.get("best_model_checkpoint")
            if best and os.path.abspath(best).startswith(os.path.abspath(work) + os.sep):
                state["best_model_checkpoint"] = os.path.join(run_dir, os.path.relpath(best, work))
                with open(path, "w") as fh:
                    json.dump(state, fh, indent=2, sort_keys=True)
        if model_path == base_model:
            continue
        for file in ("adapter_config.json", "README.md"):  # PEFT's files: the folder path -> the recorded name
            path = os.path.join(checkpoint, file)
            if os.path.isfile(path):
                with open(path) as fh:
                    text = fh.read()
                with open(path, "w") as fh:
                    fh.write(text.replace(model_path, base_model))


def best_checkpoint(trainer: RegularizedTrainer, keep_checkpoints: bool) -> Optional[dict[str, Any]]:
    """What the run selected on validation: step, metric and its value. The adapter/ folder holds that checkpoint's
    weights (``load_best_model_at_end``); ``folder`` is its path inside the run folder when the checkpoints are kept
    (``--keep-checkpoints``), else ``None`` (the checkpoints are deleted at the end of the run)."""
    state = trainer.state
    if state.best_model_checkpoint is None:
        return None
    name = os.path.basename(os.path.normpath(state.best_model_checkpoint))
    step = state.best_global_step
    if step is None and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
        step = int(name[len("checkpoint-"):])
    metric = trainer.args.metric_for_best_model
    return {
        "step": step,
        "metric": metric if metric.startswith("eval_") else f"eval_{metric}",
        "value": state.best_metric,
        "folder": f"{CHECKPOINTS}/{name}" if keep_checkpoints else None,
    }


def _run(recipe: Recipe, run_dir: str, progress: bool, keep_checkpoints: bool) -> tuple[dict[str, Any], str]:
    """The run itself, writing into ``run_dir`` (the temporary folder); returns the metrics and the folder the base
    model was loaded from."""
    with open(os.path.join(run_dir, "recipe.yaml"), "w") as fh:
        yaml.safe_dump(recipe.to_dict(), fh, sort_keys=False)
    set_seed(recipe.training.seed)
    data = build_task(recipe)
    model = build_model(recipe, data)
    reference = diagnostics.snapshot_effective_weights(model) if recipe.diagnostics else {}
    model = apply_adapter(model, recipe)
    trainable, total = _count_parameters(model)

    cls = trainer_class(data)
    kwargs: dict[str, Any] = {"compute_metrics": compute_metrics}
    if data.generative:  # scored by generation (GenerationEvalMixin), not from the logits
        kwargs = {"compute_metrics": None, "generation": data.generation}
    trainer = cls(
        model=model, args=training_arguments(recipe, run_dir, progress), train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"], data_collator=data.collator, regularizers=recipe.regularizers,
        **kwargs,
    )
    fit_at_end = FitAtEnd(data.splits["train"])
    trainer.add_callback(fit_at_end)
    fit_at_end.trainer = trainer
    before = None
    if data.generative:  # the base model's zero-shot score (test too: reported, never used to select)
        before = {split: _strip_prefix(trainer.evaluate(data.splits[split], metric_key_prefix=split), split)
                  for split in ("validation", "test")}
    start = time.perf_counter()
    train_output = trainer.train()
    train_time = time.perf_counter() - start
    validation = trainer.evaluate(data.splits["validation"], metric_key_prefix="validation")
    test = trainer.evaluate(data.splits["test"], metric_key_prefix="test")
    # the regime the run ended in: how well the selected model fits its training labels (noisy ones included)
    fit = _strip_prefix(trainer.evaluate(data.splits["train"], metric_key_prefix="train"), "train")
    model.eval()

    monitor = getattr(trainer, "collapse_monitor", None)  # RegularizedTrainer's (classification) collapse check
    metrics: dict[str, Any] = {
        "name": recipe.name,
        "method": recipe.method,
        "task": recipe.task.name,
        "base_model": data.model_id or recipe.model.name,
        "shots_per_class": recipe.task.shots_per_class,
        "label_noise": recipe.task.label_noise,
        "seed": recipe.training.seed,
        "metric": recipe.task.metrics[0],  # the task's score: accuracy, or exact_match of an instruction task
        "validation": _strip_prefix(validation, "validation"),
        "test": _strip_prefix(test, "test"),
        "train": fit,
        # the training set at the end of training (the last epoch's model, before the selected one is loaded)
        "train_end": _strip_prefix(fit_at_end.metrics or {}, "train_end"),
        # the task's score on the training set minus on the test set
        "generalization_gap": round(fit[recipe.task.metrics[0]] - test[f"test_{recipe.task.metrics[0]}"], 6),
        "peak_memory_mb": peak_memory_mb(),
        "best_checkpoint": best_checkpoint(trainer, keep_checkpoints),
        "train_time_s": round(train_time, 2),
        "train_steps": train_output.global_step,
        "seconds_per_step": round(train_time / max(1, train_output.global_step), 4),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "n_train": len(data.splits["train"]),
        "history": trainer.state.log_history,
        # step of the CollapseWarning (every validation example predicted as one class, evaluations in a row)
        "collapsed_at_step": None if monitor is None else monitor.reported_at,
    }
    if before is not None:
        metrics["before_training"] = before
        # the validation score at step 0 heads the history (and the validation curve), as the later evaluations
        step0 = {f"eval_{k}": v for k, v in before["validation"].items() if k != "epoch"}
        metrics["history"] = [{**step0, "epoch": 0.0, "step": 0}, *metrics["history"]]
    if recipe.diagnostics:
        metrics["diagnostics"] = _diagnose(model, trainer, data, reference)
    _save_outputs(recipe, model, data, metrics, run_dir)
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, CHECKPOINTS), ignore_errors=True)
    return metrics, data.model_path


def peak_memory_mb() -> float:
    """The peak memory of this process so far, in MiB: the accelerator's allocated peak on CUDA, else the resident
    set's high-water mark (``ru_maxrss``: the whole process, model and data included)."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k.removeprefix(f"{prefix}_"): v for k, v in metrics.items()}


def score(metrics: dict[str, Any], split: str = "test") -> float:
    """The task's score of a finished run on ``split``: ``metrics[split][metrics['metric']]`` (runs written before
    ``metric`` was recorded: accuracy)."""
    return metrics[split][metrics.get("metric", "accuracy")]


def _count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _save_outputs(recipe: Recipe, model, data: TaskData, metrics: dict[str, Any], run_dir: str) -> None:
    adapter_dir = os.path.join(run_dir, "adapter")
    os.makedirs(adapter_dir, exist_ok=True)
    if isinstance(model, PeftModel):
        # The base model was loaded from a local folder (the venv's MiniLM, the ViT cache); the adapter config and
        # PEFT's `base_model:adapter:` tag record the Hub id / descriptive name instead (set only now: during
        # training PEFT's checkpoint saves look the base config up by this name, which would ask the Hub).
        record_base_model(model, metrics["base_model"])
        # the app never resizes the embeddings: no vocabulary check against the base model (a Hub request)
        model.save_pretrained(adapter_dir, save_embedding_layers=False)
    else:
        model.save_pretrained(adapter_dir)
    write_model_card(adapter_dir, recipe, metrics)
    if data.processor is not None:
        data.processor.save_pretrained(adapter_dir)
    with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2, default=float)
    plot_training_curves(metrics["history"], os.path.join(run_dir, "training_curves.png"), title=recipe.name,
                         metric=metrics["metric"])


def record_base_model(model: PeftModel, name: str) -> None:
    """Make ``model`` record ``name`` as its base model when saved (adapter config ``base_model_name_or_path``,
    PEFT's model card tag) instead of the folder it was loaded from."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
    base = model.get_base_model()
    base.name_or_path = name
    if getattr(base, "config", None) is not None:
        base.config.name_or_path = name


def load_metrics(run_dir: str) -> Optional[dict[str, Any]]:
    """The metrics.json of a run folder, or ``None`` if the run has not finished."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)
