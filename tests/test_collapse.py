"""Collapse check: predicted-class histograms, the single-class streak, and the trainer's warning and metric."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_trainer import make_args, make_dataset, no_dropout_bert

from peft_tsrs.trainer.collapse import CollapseMonitor, CollapseWarning, predicted_class_counts
from peft_tsrs.trainer import RegularizedTrainer
from peft_tsrs.config import RegularizerConfig


def one_hot_logits(classes: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


def test_counts_skip_ignored_labels_and_flatten_token_logits():
    logits = one_hot_logits([0, 2, 2, 1]).reshape(2, 2, 3)  # [batch, tokens, classes]
    labels = torch.tensor([[1, -100], [2, 2]])
    pred, true = predicted_class_counts(logits, labels, 3)
    assert pred.tolist() == [1, 1, 1]  # the -100 position (predicted 2) is skipped
    assert true.tolist() == [0, 1, 2]
    pred, true = predicted_class_counts((one_hot_logits([1, 1]),), None, 3)  # tuple output, no labels
    assert pred.tolist() == [0, 2, 0] and true.tolist() == [0, 0, 0]
    pred, _ = predicted_class_counts(torch.zeros(4, 5), None, 3)  # not [..., num_classes]: nothing counted
    assert pred.tolist() == [0, 0, 0]


def evaluation(monitor: CollapseMonitor, classes: list[int], labels: list[int], step: int):
    monitor.start()
    monitor.observe(one_hot_logits(classes), torch.tensor(labels))
    pred, true = monitor.stop()
    return monitor.update(pred, true, step)


def test_warns_once_after_patience_single_class_evaluations():
    monitor = CollapseMonitor(3, patience=2, advice=lambda: "Lower the learning rate.")
    labels = [0, 1, 2, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning before the streak completes fails the test
        assert evaluation(monitor, [1, 1, 1, 1], labels, 10) is None  # first single-class evaluation: tolerated
        assert evaluation(monitor, [1, 0, 1, 1], labels, 20) is None  # two classes: the streak restarts
        assert evaluation(monitor, [2, 2, 2, 2], labels, 30) is None
    with pytest.warns(CollapseWarning, match=r"class 2 in 2 evaluations in a row \(last at step 40\).*learning rate"):
        text = evaluation(monitor, [2, 2, 2, 2], labels, 40)
    assert text is not None and monitor.reported_at == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluation(monitor, [2, 2, 2, 2], labels, 50) is None  # reported once per monitor


def test_no_warning_when_the_labels_hold_one_class_or_nothing_was_counted():
    monitor = CollapseMonitor(3, patience=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluation(monitor, [1, 1], [1, 1], 1) is None  # predicting the only class present is right
        monitor.start()
        assert monitor.update(*monitor.stop(), step=2) is None  # no logits seen (prediction_loss_only)
    assert monitor.streak == 0


def test_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 classes"):
        CollapseMonitor(1)
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(3, patience=0)


def constant_head(model) -> None:
    """Zero the classifier weight and give class 0 a large bias: the prediction ignores the input."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))


@pytest.mark.parametrize("tsrs_weight, advice", [(0.5, r"lower tsrs_weight \(now 0\.5"), (0.0, "Lower learning_rate")])
def test_trainer_logs_predicted_classes_and_warns_on_collapse(tmp_path, tsrs_weight, advice):
    ds = make_dataset()
    model = no_dropout_bert()
    constant_head(model)
    cfg = RegularizerConfig(tsrs_weight=tsrs_weight, tsrs_inject_layer=1)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, eval_dataset=ds, regularizers=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        metrics = trainer.evaluate()
    assert metrics["eval_predicted_classes"] == 1
    with pytest.warns(CollapseWarning, match=advice):
        trainer.evaluate()
    assert trainer.collapse_monitor.reported_at == 0
    assert [h["eval_predicted_classes"] for h in trainer.state.log_history if "eval_predicted_classes" in h] == [1, 1]


def test_collapse_warning_as_error_stops_training(tmp_path):
    """`warnings.simplefilter("error", CollapseWarning)` turns the check into a stop: train() raises."""
    ds = make_dataset()
    model = no_dropout_bert()
    constant_head(model)
    for p in model.parameters():
        p.requires_grad_(False)  # nothing can learn: the head stays constant through training
    model.classifier.bias.requires_grad_(True)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=1, learning_rate=0.0, max_steps=5)
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        with pytest.raises(CollapseWarning, match="Lower learning_rate"):
            trainer.train()
    assert trainer.state.global_step == 2  # the second single-class evaluation stopped the run


def test_trainer_counts_every_class_of_a_healthy_model(tmp_path):
    ds = make_dataset()
    model = no_dropout_bert()
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # the random head's scores spread over the classes
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, eval_dataset=ds)
    with torch.no_grad():
        batch = {k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask")}
        expected = model(**batch).logits.argmax(-1).unique().numel()
    assert expected > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        for _ in range(3):
            assert trainer.evaluate()["eval_predicted_classes"] == expected
    assert trainer.collapse_monitor.streak == 0


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification"])
def test_no_check_without_a_single_predicted_class(tmp_path, problem_type):
    model = no_dropout_bert()
    model.config.problem_type = problem_type
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset())
    assert trainer.collapse_monitor is None
