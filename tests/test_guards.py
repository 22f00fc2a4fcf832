"""Guards of the training run: non-finite options refused, a NaN/inf loss or gradient stopped (or skipped) before it
reaches the weights or a checkpoint, an empty training set and out-of-range labels refused with a clear error."""

from __future__ import annotations

import dataclasses
import typing

import datasets
import pytest
import torch
from conftest import make_tiny_vit
from peft import get_peft_model
from safetensors.torch import load_file
from test_trainer import batch_of, make_args, make_dataset, no_dropout_bert
from transformers import HfArgumentParser

from peft_tsrs import (NonFiniteLossError, RegularizedTrainer, RegularizedTrainingArguments, RegularizerConfig,
                       RLRRConfig)


# --------------------------------------------------------------------------------------------- non-finite options
def _float_fields() -> list[str]:
    hints = typing.get_type_hints(RegularizerConfig)
    return [f.name for f in dataclasses.fields(RegularizerConfig) if hints[f.name] in (float, typing.Optional[float])]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", _float_fields())
def test_every_float_option_refuses_nan_and_inf(name, value):
    """NaN passed every range check (``nan < 0`` is false): a NaN weight switched its term off unnoticed, an
    infinite one trained every weight to NaN."""
    with pytest.raises(ValueError, match=rf"RegularizerConfig.{name} must be a finite number, got {value}; set a real"):
        RegularizerConfig(**{name: value})


def test_the_finite_check_covers_every_float_field():
    assert {"tsrs_weight", "tsrs_noise_std", "pace_weight", "distance_radius", "distance_ratio",
            "reweight_temperature"} <= set(_float_fields())


def test_nan_on_the_command_line_of_an_hf_script_is_refused(tmp_path):
    parser = HfArgumentParser(RegularizedTrainingArguments)
    with pytest.raises(ValueError, match=r"RegularizerConfig.tsrs_weight must be a finite number, got nan"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--tsrs_weight", "nan"])
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--on_nonfinite", "skip"])
    assert args.on_nonfinite == "skip"
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        RegularizedTrainingArguments(output_dir=str(tmp_path), on_nonfinite="ignore")


def test_a_non_finite_loss_in_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import peft_tsrs.app.run as run
    from peft_tsrs.app.cli import main
    from test_cli import QUICK

    def diverge(*args, **kwargs):
        raise NonFiniteLossError("the task loss (cross-entropy) is nan at step 3: look at the inputs.")

    monkeypatch.setattr(run, "build_task", diverge)
    assert main(["train", "--output-dir", str(tmp_path / "out"), "--no-progress", "-o", *QUICK]) == 2
    err = capsys.readouterr().err
    assert err == "peft-tsrs: error: the task loss (cross-entropy) is nan at step 3: look at the inputs.\n"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- non-finite training
def vit_dataset(n: int = 8, nan_rows: tuple[int, ...] = (), seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 1, 8, 8, generator=g)
    pixels[list(nan_rows)] = float("nan")
    return datasets.Dataset.from_dict({"pixel_values": pixels.tolist(),
                                       "label": torch.randint(0, 3, (n,), generator=g).tolist()})


def rlrr_vit():
    return get_peft_model(make_tiny_vit(), RLRRConfig(init_weights=False, modules_to_save=["classifier"]))


def guard_args(tmp_path, **kw) -> RegularizedTrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
                    learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                    logging_steps=1, seed=0)
    defaults.update(kw)
    return RegularizedTrainingArguments(**defaults)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_saved_tensors_finite(folder) -> int:
    """Every checkpoint's adapter holds finite tensors; returns how many checkpoints there are."""
    checkpoints = sorted(folder.glob("checkpoint-*"))
    for checkpoint in checkpoints:
        tensors = load_file(checkpoint / "adapter_model.safetensors")
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values()), checkpoint
    return len(checkpoints)


def test_a_nan_in_the_inputs_stops_training_naming_the_term_and_saves_nothing_non_finite(tmp_path):
    """It used to train every trainable tensor to NaN and log a loss of 0.0 (Trainer's logging_nan_inf_filter
    replaces a NaN step loss by the running average, zero at the start)."""
    model = rlrr_vit()
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path, save_strategy="steps", save_steps=1),
                                 train_dataset=vit_dataset(nan_rows=(5,)))
    with pytest.raises(NonFiniteLossError, match=r"^The task loss \(cross-entropy\) is nan at step [12]: the model's "
                                                 r"logits are not finite: look for NaN/inf in this batch's inputs.*"
                                                 r"on_nonfinite='skip'"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainable(model).values())
    assert assert_saved_tensors_finite(tmp_path / "out") == trainer.state.global_step  # the steps before, finite


def test_a_non_finite_regularizer_term_is_named(tmp_path):
    ds = make_dataset()
    cfg = RegularizerConfig(tsrs_weight=1.0, tsrs_noise_std=1e30, tsrs_task_loss_path="clean")  # noisy pass overflows
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path), train_dataset=ds, regularizers=cfg)
    before = trainable(trainer.model)
    with pytest.raises(NonFiniteLossError, match=r"^The regularizer term 'loss_tsrs' is nan at step 1: check that "
                                                 r"regularizer's options"):
        trainer.train()
    after = trainable(trainer.model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # stopped before the first update


def test_skip_leaves_the_batch_out_and_counts_it(tmp_path):
    model = rlrr_vit()
    before = trainable(model)
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path, num_train_epochs=2, on_nonfinite="skip"),
                                 train_dataset=vit_dataset(nan_rows=(5,)))
    with pytest.warns(RuntimeWarning, match=r"The task loss \(cross-entropy\) is nan at step \d: .* Batch left out of "
                                            r"the update \(on_nonfinite='skip'\)"):
        trainer.train()
    after = trainable(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the other batches trained
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert logged[-1]["nonfinite_losses_skipped"] == 2  # the NaN example, once per epoch
    assert logged[-1]["nonfinite_steps_skipped"] == 2  # ... alone in its optimizer step: no step at all


def test_a_step_whose_every_batch_is_skipped_leaves_weights_and_optimizer_alone(tmp_path):
    """Zero gradients would still move AdamW's weights (momentum) and decay them; the step is skipped instead."""
    model = rlrr_vit()
    before = trainable(model)
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path, on_nonfinite="skip", weight_decay=0.1),
                                 train_dataset=vit_dataset(nan_rows=tuple(range(8))))
    with pytest.warns(RuntimeWarning, match="Batch left out of the update"):
        trainer.train()
    after = trainable(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert trainer.nonfinite_guard.logs() == {"nonfinite_losses_skipped": 2, "nonfinite_steps_skipped": 2}


def test_skip_with_gradient_accumulation_keeps_the_finite_micro_batch(tmp_path):
    model = rlrr_vit()
    before = trainable(model)
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path, on_nonfinite="skip",
                                                              gradient_accumulation_steps=2),
                                 train_dataset=vit_dataset(nan_rows=(5,)))
    with pytest.warns(RuntimeWarning, match="Batch left out of the update"):
        trainer.train()
    after = trainable(model)
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the finite half of the step trained
    assert trainer.nonfinite_guard.logs() == {"nonfinite_losses_skipped": 1, "nonfinite_steps_skipped": 0}


def test_a_skipped_batch_gives_exactly_zero_gradients(tmp_path):
    """``nan_loss * 0`` would backpropagate 0 · NaN = NaN into every gradient; the skipped batch's loss is a fresh zero
    reaching every trainable parameter, so gradient accumulation keeps the other micro-batches' gradients intact."""
    model = rlrr_vit()
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path, on_nonfinite="skip"),
                                 train_dataset=vit_dataset())
    pixels = torch.randn(4, 1, 8, 8)
    pixels[1] = float("nan")
    model.train()
    with pytest.warns(RuntimeWarning, match="Batch left out of the update"):
        loss = trainer.compute_loss(model, {"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 0])})
    assert float(loss.detach()) == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert trainer.nonfinite_guard.logs() == {"nonfinite_losses_skipped": 1, "nonfinite_steps_skipped": 0}


def _poison_gradients(model) -> None:
    """A finite loss whose backward overflows: the classifier's gradient becomes NaN."""
    weight = next(p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    weight.register_hook(lambda grad: grad * float("nan"))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_gradients_never_reach_the_weights(tmp_path, policy):
    model = rlrr_vit()
    _poison_gradients(model)
    before = trainable(model)
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path, on_nonfinite=policy, save_strategy="steps",
                                                              save_steps=1),
                                 train_dataset=vit_dataset())
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"^The gradients of \d+ trainable tensor\(s\) are NaN/inf at "
                                                     r"step 1 \(e.g. '.*'\) although the loss is finite"):
            trainer.train()
    else:
        with pytest.warns(RuntimeWarning, match=r"Optimizer step skipped \(on_nonfinite='skip'\)"):
            trainer.train()
        assert trainer.state.log_history[-2]["nonfinite_steps_skipped"] == 2
    after = trainable(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # no step was taken with those gradients
    assert assert_saved_tensors_finite(tmp_path / "out") == (2 if policy == "skip" else 0)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = rlrr_vit()
    trainer = RegularizedTrainer(model=model, args=guard_args(tmp_path), train_dataset=vit_dataset())
    layer = next(p for n, p in model.named_parameters() if p.requires_grad and "rlrr_L" in n)
    with torch.no_grad():
        layer[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"not saving: 1 trainable tensor\(s\) hold NaN/inf .*rlrr_L"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists() or not any((tmp_path / "final").iterdir())


# --------------------------------------------------------------------------------------------- bad data
def test_an_empty_training_set_is_refused(tmp_path):
    """It failed in torch's sampler with `num_samples should be a positive integer value, but got num_samples=0`."""
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path), train_dataset=make_dataset(0))
    with pytest.raises(ValueError, match=r"the training set is empty \(train_dataset has 0 examples\); check the "
                                         r"filtering and the split"):
        trainer.train()


def _with_labels(ds: datasets.Dataset, labels: list[int]) -> datasets.Dataset:
    return ds.remove_columns("label").add_column("label", labels)


def test_an_out_of_range_label_in_the_dataset_is_refused_before_training(tmp_path):
    """It failed mid-training with torch's `IndexError: Target 5 is out of bounds`."""
    ds = make_dataset(8)
    labels = [0, 1, 2, -100, 5, 1, 5, 0]
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path),
                                 train_dataset=_with_labels(ds, labels))
    with pytest.raises(ValueError, match=r"label 5 in train_dataset column 'label' is out of range for a model with 3 "
                                         r"classes \(2 label\(s\) outside \[0, 3\); -100 marks an ignored example\)\. "
                                         r"Set num_labels in the model config .*num_labels=6"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_ignored_labels_still_train(tmp_path):
    ds = _with_labels(make_dataset(8), [0, 1, 2, -100, 2, 1, -100, 0])
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path), train_dataset=ds)
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("training", [True, False])
def test_an_out_of_range_label_in_a_batch_is_named(tmp_path, training):
    """A dataset without columns (here a list of examples) is checked in the loss, training and evaluation alike."""
    ds = make_dataset(8)
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path), train_dataset=ds)
    batch = batch_of(ds)
    batch["labels"][2] = -1
    trainer.model.train(training)
    with pytest.raises(ValueError, match=r"label -1 in the batch is out of range for a model with 3 classes"):
        trainer.compute_loss(trainer.model, batch)


def test_an_out_of_range_label_in_a_plain_list_dataset_fails_clearly(tmp_path):
    rows = make_dataset(8)
    examples = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": 7 if i == 3 else 0}
                for i, r in enumerate(rows)]
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path), train_dataset=examples)
    with pytest.raises(ValueError, match=r"label 7 in the batch is out of range for a model with 3 classes.*"
                                         r"num_labels=8"):
        trainer.train()
