"""The regularizers on TRL's SFTTrainer through RegularizedTrainerMixin, and under gradient checkpointing (SFTConfig's
default): the checkpointed blocks re-run with the same noise and dropout, so the gradients are the unchekpointed ones."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from peft_tsrs import RegularizedTrainer, RegularizedTrainerMixin, RegularizerConfig

trl = pytest.importorskip("trl")
from test_causal_lm import collate, lm_rows, lora, make_args, tiny_llama  # noqa: E402
from test_llm_task import make_llama, make_tokenizer  # noqa: E402


class RegularizedSFTTrainer(RegularizedTrainerMixin, trl.SFTTrainer):
    """What the README shows: the regularizers added to TRL's SFTTrainer."""


def _sft_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": ["a dog:", "an oak:", "bread:"] * 4,
                              "completion": [" animal", " plant", " food"] * 4})


def test_sft_trainer_with_regularizers_trains_and_logs_the_terms(tmp_path):
    tokenizer = make_tokenizer()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, logging_steps=2, save_strategy="no", disable_tqdm=True, seed=0)
    assert args.gradient_checkpointing  # TRL's default: the regularizers' forward contexts must survive it
    trainer = RegularizedSFTTrainer(
        model=make_llama(tokenizer), args=args, train_dataset=_sft_dataset(), eval_dataset=_sft_dataset(),
        processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        regularizers=RegularizerConfig(tsrs_weight=1.0, pace_weight=0.5, pace_sigma=1.0))
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()  # completion-only loss: the prompt is not supervised
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert {"loss_task", "loss_tsrs", "loss_pace"} <= set(logs[-1])
    assert all(math.isfinite(h[k]) for h in logs for k in ("loss", "loss_task", "loss_tsrs", "loss_pace"))
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"] and math.isfinite(first["eval_loss"])


def test_sft_trainer_task_loss_is_sfts_own_loss(tmp_path):
    """No regularizer: the mixin's training loss is the one SFTTrainer computes (completion tokens only)."""
    tokenizer = make_tokenizer()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
    model = make_llama(tokenizer)
    ours = RegularizedSFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=tokenizer,
                                 regularizers=RegularizerConfig())
    theirs = trl.SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=tokenizer)
    batch = next(iter(ours.get_train_dataloader()))
    model.train()
    ours_loss = ours.compute_loss(model, {k: v.clone() for k, v in batch.items()})
    theirs_loss = theirs.compute_loss(model, {k: v.clone() for k, v in batch.items()})
    assert ours_loss.item() == pytest.approx(theirs_loss.item(), rel=1e-5)


@pytest.mark.parametrize("config", [
    RegularizerConfig(tsrs_weight=1.0),
    RegularizerConfig(pace_weight=0.5, pace_sigma=1.0, pace_mode="full"),
    RegularizerConfig(tsrs_weight=1.0, pace_weight=0.5, pace_sigma=1.0),
], ids=["tsrs", "pace", "tsrs_pace"])
def test_gradient_checkpointing_gives_the_same_gradients(config, tmp_path):
    """Noise, shared dropout and the doubled batch are still in place when backward re-runs a checkpointed block."""
    grads = []
    for checkpointing in (False, True):
        model = lora(tiny_llama(dropout=0.1), dropout=0.1)
        args = make_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing,
                         gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = RegularizedTrainer(model=model, args=args, train_dataset=Dataset.from_list(lm_rows()),
                                     data_collator=collate, regularizers=config)
        batch = collate(lm_rows()[:4])
        if checkpointing:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert trainer.model.base_model.model.is_gradient_checkpointing
        torch.manual_seed(0)
        trainer.training_step(trainer.model, dict(batch))
        assert not trainer._open_contexts  # closed after backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
