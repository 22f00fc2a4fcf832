"""peft_tsrs.app.run.FitAtEnd: the training set evaluated with the last epoch's model, without taking the place of
that epoch's validation (which the checkpoint selection needs)."""

from __future__ import annotations

from test_trainer import make_args, make_dataset, no_dropout_bert

from peft_tsrs import RegularizedTrainer
from peft_tsrs.app.run import FitAtEnd


def test_fit_at_end_evaluates_the_last_model_and_keeps_the_last_validation(tmp_path):
    train, val = make_dataset(), make_dataset(seed=1)
    args = make_args(tmp_path, num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch",
                     load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False)
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=args, train_dataset=train, eval_dataset=val)
    fit = FitAtEnd(train)
    trainer.add_callback(fit)
    fit.trainer = trainer
    trainer.train()
    assert fit.metrics is not None and "train_end_loss" in fit.metrics
    evals = [h["epoch"] for h in trainer.state.log_history if "eval_loss" in h]
    assert evals == [1.0, 2.0]  # the last epoch's validation still ran
    assert trainer.state.best_model_checkpoint is not None
