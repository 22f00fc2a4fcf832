"""RegularizedTrainer: loss composition, scaling, schedules, projection, checkpoint state, configuration routes."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_bert
from peft import LoraConfig, get_peft_model
from transformers import HfArgumentParser, TrainingArguments

from peft_tsrs import RLRRConfig
from peft_tsrs.regularizers import consistency_mse
from peft_tsrs.trainer import STATE_FILE, RegularizedTrainer
from peft_tsrs.trainer.training_args import RegularizedTrainingArguments
from peft_tsrs.config import RegularizerConfig

N = 24


def make_dataset(n: int = N, seed: int = 0, index: bool = True) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    data = {
        "input_ids": torch.randint(1, 50, (n, 6), generator=g).tolist(),
        "attention_mask": [[1] * 6] * n,
        "label": torch.randint(0, 3, (n,), generator=g).tolist(),
    }
    if index:
        data["index"] = list(range(n))
    return datasets.Dataset.from_dict(data)


def no_dropout_bert(**kw):
    model = make_tiny_bert(**kw)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def make_args(tmp_path, **kw) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1,
                    learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                    logging_steps=1, seed=0)
    defaults.update(kw)
    return TrainingArguments(**defaults)


def batch_of(ds: datasets.Dataset, n: int = 8) -> dict[str, torch.Tensor]:
    rows = ds[:n]
    return {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"]),
            "labels": torch.tensor(rows["label"]), "index": torch.tensor(rows["index"])}


def test_plain_trainer_matches_cross_entropy(tmp_path):
    ds = make_dataset()
    model = no_dropout_bert()
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds)
    assert trainer.regularizer_config.is_noop
    model.train()
    batch = batch_of(ds)
    loss = trainer.compute_loss(model, batch)
    expected = F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
    torch.testing.assert_close(loss, expected)


def test_pace_full_loss_is_task_plus_weighted_mse(tmp_path):
    """With TSRS noise as the only randomness, the terms recombine exactly into the returned loss."""
    ds = make_dataset()
    model = no_dropout_bert()
    cfg = RegularizerConfig(pace_weight=0.7, pace_mode="full", pace_sigma=0.0, tsrs_weight=0.3, tsrs_inject_layer=1)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, regularizers=cfg)
    model.train()
    batch = batch_of(ds)
    torch.manual_seed(5)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    logits = outputs.logits  # [clean x, clean x, noisy x, noisy x]: 4B rows
    assert logits.shape[0] == 4 * 8
    clean, noisy = logits.chunk(2)
    first, second = noisy.chunk(2)  # task path = noisy (official default)
    task = F.cross_entropy(first, batch["labels"])
    pace = 0.7 * consistency_mse(first, second)
    tsrs = torch.tensor(trainer._components["loss_tsrs"][-1])  # the logged component
    assert trainer.regularizers["tsrs"].stability._records == []  # block outputs released once the loss is built
    torch.testing.assert_close(loss, task + pace + tsrs)
    # the clean pass of both copies is identical: dropout is off and PACE noise off (pace_sigma=0)
    torch.testing.assert_close(clean[:8], clean[8:])


def test_gradient_accumulation_equals_large_batch(tmp_path):
    """GA=2 x batch 4 gives the same parameters as batch 8 (deterministic terms: PACE-fast and distance penalty)."""
    ds = make_dataset(8)
    cfg = RegularizerConfig(pace_weight=0.5, pace_mode="fast", pace_sigma=0.0, distance_norm="frob",
                            distance_radius=1.0, distance_mode="penalty", distance_penalty_weight=0.1)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        model = get_peft_model(no_dropout_bert(), LoraConfig(target_modules=["query", "value"],
                                                             init_lora_weights=False, modules_to_save=["classifier"]))
        args = make_args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2,
                         optim="sgd", lr_scheduler_type="constant", train_sampling_strategy="sequential")
        trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds, regularizers=cfg)
        trainer.train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-6, rtol=1e-5)


def test_distance_projection_keeps_weights_within_radius(tmp_path):
    ds = make_dataset()
    model = no_dropout_bert()
    cfg = RegularizerConfig(distance_norm="frob", distance_radius=0.05, distance_depth_scale=2.0,
                     distance_head_radius=0.5)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path, learning_rate=5e-2, num_train_epochs=2),
                          train_dataset=ds, regularizers=cfg)
    trainer.train()
    radii, distances = trainer.regularizers["distance"].constraint.radii(), trainer.regularizers["distance"].constraint.distances()
    assert distances and max(distances.values()) > 0
    for name, dist in distances.items():
        assert dist <= radii[name] * (1 + 1e-5), name
    assert trainer.regularizers["distance"].constraint.max_violation() <= 1e-5
    assert any(math.isclose(d, radii[n], rel_tol=1e-4) for n, d in distances.items()), "radius never reached"


def test_distance_projection_on_rlrr_effective_update(tmp_path):
    ds = make_dataset()
    model = get_peft_model(no_dropout_bert(), RLRRConfig(init_weights="kaiming", modules_to_save=["classifier"]))
    cfg = RegularizerConfig(distance_norm="inf-op", distance_radius=1e-3)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path, learning_rate=5e-2), train_dataset=ds, regularizers=cfg)
    trainer.train()
    assert trainer.regularizers["distance"].constraint.max_violation() <= 1e-6
    for module in model.modules():
        if hasattr(module, "rlrr_L"):
            delta = module.get_delta_weight("default")
            assert delta.abs().sum(dim=1).max() <= 1e-3 * (1 + 1e-4)


def test_label_correction_and_reweighting_follow_schedule(tmp_path):
    """Start epochs count from 1 (official): correction from the 2nd epoch, reweighting from the 1st; T anneals once
    per epoch, with the number of epochs already ended."""
    ds = make_dataset()
    cfg = RegularizerConfig(label_correction_threshold=0.34, label_correction_start_epoch=2,
                     reweight_start_epoch=1, reweight_temperature=2.0)
    model = no_dropout_bert()
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path, num_train_epochs=3), train_dataset=ds, regularizers=cfg)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, 10))  # 3 steps per epoch, one log line per step
    for h in logs:
        ended = (h["step"] - 1) // 3  # epochs ended before this step = floor(state.epoch) when it was taken
        if ended < 1:  # the 1st epoch: no correction yet
            assert h["n_labels_corrected"] == 0
        expected = 2.0 * max(0.5, math.exp(-0.1 * max(0, ended - 1)))  # T0, T0, T0·e^-0.1
        assert h["reweight_temperature"] == pytest.approx(expected, rel=1e-5)  # logs keep 6 significant digits
    assert logs[-1]["n_labels_corrected"] > 0
    corrected = trainer.regularizers["self_labeling"].corrector.labels
    assert (corrected != torch.tensor(ds["label"])).sum() == logs[-1]["n_labels_corrected"]


@pytest.mark.parametrize("timing", ["before_loss", "after_loss"])
def test_corrected_labels_are_trained_on_in_the_same_step(tmp_path, timing):
    """Official: the labels are corrected from this step's predictions first, then the loss uses them."""
    ds = make_dataset()
    model = no_dropout_bert()
    model.eval()
    batch = batch_of(ds)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    wrong = (logits.argmax(-1) + 1) % 3  # every stored label disagrees with the prediction
    rows = {i: int(label) for i, label in enumerate(wrong)}
    ds = ds.map(lambda ex, i: {"label": rows.get(i, ex["label"])}, with_indices=True)
    cfg = RegularizerConfig(label_correction_threshold=0.01, label_correction_start_epoch=0,
                            label_correction_timing=timing)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, regularizers=cfg)
    model.train()
    loss = trainer.compute_loss(model, batch_of(ds))
    corrector = trainer.regularizers["self_labeling"].corrector
    assert torch.equal(corrector.labels[:8], logits.argmax(-1))  # corrected either way...
    trained_on = logits.argmax(-1) if timing == "before_loss" else wrong  # ...but used now only before the loss
    torch.testing.assert_close(loss, F.cross_entropy(logits, trained_on))


def test_missing_index_column_names_the_column(tmp_path):
    ds = make_dataset(index=False)
    with pytest.raises(ValueError, match="'index'.*with_indices=True"):
        RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path), train_dataset=ds,
                    regularizers=RegularizerConfig(label_correction_threshold=0.9))


def test_checkpoint_holds_regularizer_state_and_resume_reproduces_run(tmp_path):
    ds = make_dataset()
    cfg = RegularizerConfig(pace_weight=0.5, pace_mode="fast", pace_sigma=1.0, label_correction_threshold=0.34,
                     label_correction_start_epoch=1, tsrs_weight=0.5, tsrs_inject_layer=1)

    def run(out, resume=None, max_steps=9):
        torch.manual_seed(0)
        model = get_peft_model(make_tiny_bert(), RLRRConfig(modules_to_save=["classifier"]))
        args = make_args(tmp_path, output_dir=str(out), num_train_epochs=3, max_steps=max_steps,
                         save_strategy="steps", save_steps=3)
        trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds, regularizers=cfg)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    state = torch.load(tmp_path / "full" / "checkpoint-6" / STATE_FILE, weights_only=True)
    assert set(state) >= {"label_corrector", "fast_store", "tsrs_config"}
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-6"))
    losses = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    resumed_losses = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    for step in (7, 8, 9):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-5)
    assert torch.equal(full.regularizers["self_labeling"].corrector.labels, resumed.regularizers["self_labeling"].corrector.labels)
    torch.testing.assert_close(full.regularizers["pace"].store.stored, resumed.regularizers["pace"].store.stored)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_hf_argument_parser_flags_reach_the_trainer(tmp_path):
    parser = HfArgumentParser(RegularizedTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--tsrs_weight", "1.0", "--tsrs_inject_layer", "1", "--pace_weight", "0.1",
        "--pace_mode", "lazy", "--pace_sigma", "0", "--report_to", "none", "--use_cpu", "true",
    ])
    trainer = RegularizedTrainer(model=make_tiny_bert(), args=args, train_dataset=make_dataset())
    assert trainer.regularizer_config.tsrs_weight == 1.0 and trainer.regularizer_config.pace_mode == "lazy"
    assert trainer.regularizer_config.pace_sigma == 0.0
    assert "tsrs" in trainer.regularizers
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--pace_mode", "sometimes"])


def test_recipe_inside_adapter_config_is_saved_and_used(tmp_path):
    recipe = RegularizerConfig(tsrs_weight=1.0, tsrs_inject_layer=1, distance_norm="frob", distance_ratio=0.1)
    model = get_peft_model(make_tiny_bert(), RLRRConfig(regularizers=recipe, modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert stored["regularizers"]["tsrs_weight"] == 1.0 and stored["regularizers"]["distance_ratio"] == 0.1
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset())
    assert trainer.regularizer_config == recipe
    explicit = RegularizerConfig(pace_weight=0.2, pace_sigma=0.5)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset(),
                                 regularizers=explicit)
    assert trainer.regularizer_config == explicit


@pytest.mark.parametrize("kwargs,match", [
    ({"tsrs_weight": -1.0}, "tsrs_weight must be >= 0"),
    ({"pace_mode": "sometimes"}, "pace_mode must be one of"),
    ({"pace_sigma": -0.1}, "pace_sigma must be >= 0"),
    ({"pace_sigma": float("nan")}, "pace_sigma must be a finite number"),
    ({"pace_sigma": float("inf")}, "pace_sigma must be a finite number"),
    ({"distance_norm": "frob"}, "exactly one of distance_radius"),
    ({"distance_norm": "l2", "distance_radius": 1.0}, "distance_norm must be one of"),
    ({"distance_norm": "frob", "distance_radius": -1.0}, "distance_radius must be > 0"),
    ({"label_correction_threshold": 1.5}, "label_correction_threshold"),
    ({"label_correction_timing": "later"}, "label_correction_timing must be one of"),
    ({"reweight_temperature_schedule": "hourly"}, "reweight_temperature_schedule must be one of"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegularizerConfig(**kwargs)


def test_unknown_recipe_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown RegularizerConfig key.*tsrs_weight"):
        RegularizerConfig.from_dict({"tsrs_wieght": 1.0})


def test_tsrs_inject_layer_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="inject_layer"):
        RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path), train_dataset=make_dataset(),
                    regularizers=RegularizerConfig(tsrs_weight=1.0, tsrs_inject_layer=7))


def test_evaluation_uses_clean_path_and_true_labels(tmp_path):
    ds = make_dataset()
    model = no_dropout_bert()
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, eval_dataset=ds,
                          regularizers=RegularizerConfig(tsrs_weight=1.0, tsrs_inject_layer=0, tsrs_noise_std=5.0))
    metrics = trainer.evaluate()
    model.eval()
    rows = ds[:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(rows["input_ids"]),
                       attention_mask=torch.tensor(rows["attention_mask"])).logits
    assert metrics["eval_loss"] == pytest.approx(float(F.cross_entropy(logits, torch.tensor(rows["label"]))), rel=1e-5)
