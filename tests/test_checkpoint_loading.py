"""Full-model checkpoints of architectures transformers renames on load (ViT): best-model restore and resume."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import make_tiny_bert, make_tiny_vit
from transformers import TrainingArguments, ViTForImageClassification

from peft_tsrs.trainer.checkpoint_loading import checkpoint_weight_names, load_renamed_checkpoint, needs_renamed_load
from peft_tsrs.trainer import RegularizedTrainer
from peft_tsrs.config import RegularizerConfig


def image_dataset(n: int = 16) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({
        "pixel_values": torch.randn(n, 1, 8, 8, generator=g).tolist(),
        "label": torch.randint(0, 3, (n,), generator=g).tolist(),
        "index": list(range(n)),
    }).with_format("torch")


def no_dropout_vit(seed: int = 0):
    model = make_tiny_vit(seed=seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=0.05, optim="sgd",
                lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                save_strategy="steps", save_steps=2, max_steps=4, logging_steps=1, train_sampling_strategy="sequential")
    base.update(kw)
    return TrainingArguments(**base)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_vit_checkpoint_names_differ_from_the_model_and_load_renamed(tmp_path):
    model = no_dropout_vit()
    model.save_pretrained(tmp_path)
    if not needs_renamed_load(model, str(tmp_path)):
        pytest.skip("this transformers version saves ViT under the model's own weight names")
    assert checkpoint_weight_names(str(tmp_path)) - set(model.state_dict())  # legacy names on disk
    other = make_tiny_vit(seed=1)
    load_renamed_checkpoint(other, str(tmp_path))
    for name, p in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], p), name


def test_bert_checkpoint_needs_no_renaming(tmp_path):
    model = make_tiny_bert()
    model.save_pretrained(tmp_path)
    assert not needs_renamed_load(model, str(tmp_path))
    assert not needs_renamed_load(torch.nn.Linear(2, 2), str(tmp_path))  # not a transformers model


def test_load_renamed_checkpoint_rejects_another_architecture(tmp_path):
    make_tiny_vit(layers=1).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="does not match ViTForImageClassification"):
        load_renamed_checkpoint(make_tiny_vit(layers=2), str(tmp_path))


def test_best_model_of_a_full_vit_run_is_fully_restored(tmp_path):
    model = no_dropout_vit()
    trainer = RegularizedTrainer(model=model, args=args(tmp_path), train_dataset=image_dataset(),
                          regularizers=RegularizerConfig(distance_norm="frob", distance_radius=10.0))
    trainer.train()
    final = params(model)
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-2")
    trainer._load_best_model()
    expected = ViTForImageClassification.from_pretrained(tmp_path / "checkpoint-2")
    restored = params(model)
    for name, p in expected.named_parameters():
        assert torch.equal(restored[name], p), name
    assert any(not torch.equal(final[n], restored[n]) for n in final if ".layers." in n)  # the blocks moved back


def test_resumed_full_vit_run_equals_uninterrupted(tmp_path):
    trainer = RegularizedTrainer(model=no_dropout_vit(), args=args(tmp_path), train_dataset=image_dataset())
    trainer.train()  # writes checkpoint-2 and checkpoint-4; resume from the middle one
    uninterrupted = params(trainer.model)
    # other initial weights: everything must come from the checkpoint
    resumed = RegularizedTrainer(model=no_dropout_vit(seed=3), args=args(tmp_path / "resumed"),
                          train_dataset=image_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    final = params(resumed.model)
    for name in uninterrupted:
        torch.testing.assert_close(final[name], uninterrupted[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rejected_checkpoint_leaves_the_model_untouched(tmp_path):
    make_tiny_vit(layers=1, seed=2).save_pretrained(tmp_path)
    model = make_tiny_vit(layers=2)
    before = params(model)
    with pytest.raises(RuntimeError):
        load_renamed_checkpoint(model, str(tmp_path))
    for name, p in params(model).items():
        assert torch.equal(p, before[name]), name
