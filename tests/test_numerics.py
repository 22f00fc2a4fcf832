"""Numerics: NaN/Inf guards, reduced-precision training steps, merge tolerance in bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_vit, vit_inputs
from peft import get_peft_model
from test_trainer import make_args, make_dataset
from tuner_checks import logits

from peft_tsrs import RLRRConfig, RegularizerConfig, RegularizedTrainer
from peft_tsrs.regularizers import relative_perturbation

ALL_TERMS = RegularizerConfig(tsrs_weight=1.0, tsrs_inject_layer=1, pace_weight=0.5, pace_mode="full", pace_sigma=1.0,
                       distance_norm="frob", distance_radius=1.0, label_correction_threshold=0.9,
                       label_correction_start_epoch=0, reweight_start_epoch=0)


def test_relative_perturbation_of_zero_activations_is_finite():
    zeros = torch.zeros(2, 3, 4)
    assert torch.isfinite(relative_perturbation(zeros, zeros))
    assert relative_perturbation(zeros, zeros) == 0
    assert torch.isfinite(relative_perturbation(zeros, torch.ones(2, 3, 4)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_is_finite(tmp_path, dtype):
    ds = make_dataset()
    model = get_peft_model(make_tiny_bert(), RLRRConfig(init_weights="kaiming", modules_to_save=["classifier"]))
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, regularizers=ALL_TERMS)
    model.train()
    rows = ds[:8]
    batch = {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"]),
             "labels": torch.tensor(rows["label"]), "index": torch.tensor(rows["index"])}
    with torch.autocast("cpu", dtype=dtype):
        loss = trainer.compute_loss(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bf16_trainer_run_is_finite(tmp_path):
    """`TrainingArguments(bf16=True)` on CPU: every logged term finite."""
    model = get_peft_model(make_tiny_bert(), RLRRConfig(modules_to_save=["classifier"]))
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path, bf16=True, max_steps=3), train_dataset=make_dataset(),
                          regularizers=ALL_TERMS)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs
    for h in logs:
        for key in ("loss", "loss_task", "loss_tsrs", "loss_pace"):
            assert torch.isfinite(torch.tensor(h[key])), (key, h)


def test_bf16_merge_tolerance():
    """Stated tolerance: merging in bf16 keeps logits within 0.05 (absolute) of the unmerged bf16 model."""
    model = get_peft_model(make_tiny_vit().to(torch.bfloat16), RLRRConfig(init_weights=False, ssf=True)).eval()
    x = {"pixel_values": vit_inputs()["pixel_values"].to(torch.bfloat16)}
    before = logits(model, x).float()
    model.merge_adapter()
    assert (logits(model, x).float() - before).abs().max() <= 0.05
