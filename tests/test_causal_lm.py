"""RegularizedTrainer beyond classification: causal LMs (Llama), seq2seq (BART, T5) and token classification.

The task loss is the model's own (labels shifted for a causal LM, ``-100`` ignored, ``num_items_in_batch`` honoured);
TSRS, PACE (full / lazy) and the distance constraint run on a decoder LM; the methods that need one class per example
(label correction, reweighting, PACE-fast) are refused with a message. Padded and unsupervised positions never move a
regularizer's term.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from peft_tsrs import PACEConfig, RegularizedTrainer, RegularizerConfig, RLRRConfig

VOCAB, PAD = 48, 0


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=PAD,
                         attention_dropout=dropout)
    return LlamaForCausalLM(config)


def lora(model, dropout: float = 0.0):
    return get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                            lora_dropout=dropout, init_lora_weights=False))


def lm_rows(n: int = 12, seed: int = 0) -> list[dict]:
    """Prompt + answer sequences of different lengths; the prompt is not supervised (-100)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(6, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = length // 2
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding: PAD ids, attention 0, labels -100."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = {"input_ids": PAD, "attention_mask": 0, "labels": -100}
    return {k: torch.tensor([r[k] + [p] * (width - len(r[k])) for r in rows]) for k, p in pad.items()}


def make_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=4, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=2, save_strategy="no",
                disable_tqdm=True, seed=0, remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


def trainer_for(model, tmp_path, config: RegularizerConfig | None = None, **kw) -> RegularizedTrainer:
    ds = Dataset.from_list(lm_rows())
    return RegularizedTrainer(model=model, args=make_args(tmp_path, **kw), train_dataset=ds, eval_dataset=ds,
                              data_collator=collate, regularizers=config or RegularizerConfig())


def terms(trainer: RegularizedTrainer, batch: dict, seed: int = 0) -> dict[str, float]:
    """The loss terms of one training step on ``batch`` (same noise for the same seed)."""
    trainer._components.clear()
    trainer.model.train()
    torch.manual_seed(seed)
    trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})
    out = {k: v[-1] for k, v in trainer._components.items()}
    trainer._components.clear()
    return out


# --------------------------------------------------------------------------- the task loss is the model's own
def test_task_loss_is_the_causal_lms_own_loss(tmp_path):
    model = lora(tiny_llama())
    trainer = trainer_for(model, tmp_path)
    batch = collate(lm_rows()[:4])
    model.train()
    own = model(**batch).loss
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(own.item(), rel=1e-6)
    # num_items_in_batch (the whole accumulated batch's supervised tokens): the sum over this batch / that count
    n = int((batch["labels"][:, 1:] != -100).sum()) * 3
    own_sum = model(**batch, num_items_in_batch=n).loss
    assert trainer.compute_loss(model, dict(batch), num_items_in_batch=n).item() == pytest.approx(own_sum.item(),
                                                                                                  rel=1e-6)


def test_compute_loss_func_is_honoured(tmp_path):
    seen = {}

    def doubled(outputs, labels, num_items_in_batch=None):
        seen["shape"] = tuple(outputs.logits.shape)
        logits = outputs.logits[:, :-1].reshape(-1, VOCAB)
        return 2 * torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    model = lora(tiny_llama())
    ds = Dataset.from_list(lm_rows())
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds, data_collator=collate,
                                 regularizers=RegularizerConfig(tsrs_weight=0.5, tsrs_task_loss_path="clean"),
                                 compute_loss_func=doubled)
    batch = collate(lm_rows()[:4])
    logged = terms(trainer, batch)
    model.eval()
    assert logged["loss_task"] == pytest.approx(2 * model(**batch).loss.item(), rel=1e-5)
    assert seen["shape"][0] == 4  # the clean rows only, not TSRS's noisy copy


def test_gradient_accumulation_gives_the_update_of_one_large_batch(tmp_path):
    """Rows of different numbers of supervised tokens: 2 x 4 accumulated = one batch of 8, token-weighted."""
    ds = Dataset.from_list(lm_rows(8))
    weights = []
    for batch, ga in ((8, 1), (4, 2)):
        model = lora(tiny_llama())
        args = make_args(tmp_path / str(ga), per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                         max_steps=1, learning_rate=1e-2, optim="sgd", max_grad_norm=0.0)
        RegularizedTrainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                           regularizers=RegularizerConfig(distance_norm="frob", distance_mode="penalty",
                                                          distance_penalty_weight=0.1)).train()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("model_name", ["bart", "t5"])
def test_seq2seq_task_loss_is_the_models_own_loss(model_name, tmp_path):
    """Encoder-decoder generation: decoder inputs built from the labels the model's way, unshifted cross-entropy."""
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if model_name == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, dropout=0.0))
    else:
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=PAD,
            decoder_start_token_id=PAD, dropout_rate=0.0))
    rows = lm_rows(4)
    batch = collate([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"],
                      "labels": r["input_ids"][:5]} for r in rows])
    batch["labels"][0, 3:] = -100
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=Dataset.from_list(rows),
                                 data_collator=collate, regularizers=RegularizerConfig())
    model.train()
    own = model(**batch).loss
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(own.item(), rel=1e-6)
    logged = terms(RegularizedTrainer(model=model, args=make_args(tmp_path), data_collator=collate,
                                      train_dataset=Dataset.from_list(rows),
                                      regularizers=RegularizerConfig(tsrs_weight=1.0, tsrs_task_loss_path="clean")), batch)
    assert logged["loss_task"] == pytest.approx(own.item(), rel=1e-5) and math.isfinite(logged["loss_tsrs"])


def test_token_classification_task_loss_is_the_models_own_loss(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"],
             "labels": [t % 5 if lab != -100 else -100 for t, lab in zip(r["input_ids"], r["labels"])]}
            for r in lm_rows(4)]
    batch = collate(rows)
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=Dataset.from_list(rows),
                                 data_collator=collate,
                                 regularizers=RegularizerConfig(tsrs_weight=1.0, tsrs_task_loss_path="clean"))
    logged = terms(trainer, batch)
    model.train()
    assert logged["loss_task"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    assert logged["loss_tsrs"] > 0


# --------------------------------------------------------------------------- every regularizer on a decoder LM
REGULARIZED = {
    "tsrs": (RegularizerConfig(tsrs_weight=1.0, tsrs_noise_std=0.5), {"loss_tsrs"}),
    "pace_full": (RegularizerConfig(pace_weight=0.5, pace_sigma=1.0, pace_mode="full"), {"loss_pace"}),
    "pace_lazy": (RegularizerConfig(pace_weight=0.5, pace_sigma=1.0, pace_mode="lazy", pace_lazy_every=1),
                  {"loss_pace"}),
    "tsrs_pace": (RegularizerConfig(tsrs_weight=1.0, pace_weight=0.5, pace_sigma=1.0), {"loss_tsrs", "loss_pace"}),
    "tsrs_bss": (RegularizerConfig(tsrs_weight=1.0, bss_weight=1e-3), {"loss_tsrs", "loss_bss"}),
    "distance_penalty": (RegularizerConfig(distance_norm="frob", distance_mode="penalty",
                                           distance_penalty_weight=0.1), {"loss_distance"}),
    "distance_project": (RegularizerConfig(distance_norm="frob", distance_mode="project", distance_radius=0.05),
                         set()),
}


@pytest.mark.parametrize("name", sorted(REGULARIZED))
def test_each_regularizer_trains_a_lora_causal_lm(name, tmp_path):
    config, expected = REGULARIZED[name]
    model = lora(tiny_llama(dropout=0.1), dropout=0.1)
    trainer = trainer_for(model, tmp_path, config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)
    assert expected | {"loss_task"} <= set(logs[-1]), logs[-1]
    assert all(math.isfinite(h[k]) for h in logs for k in expected)
    first, second = trainer.evaluate(), trainer.evaluate()  # no noise, no dropout at evaluation
    assert first["eval_loss"] == second["eval_loss"] and math.isfinite(first["eval_loss"])
    batch = collate(lm_rows()[:4])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_distance_projection_bounds_the_lora_update(tmp_path):
    """The distance constraint on a LoRA adapter: the update ΔW = scaling·B@A of every layer stays within the radius
    (anchored at 0) after every step, while the adapter still learns."""
    from peft.tuners.lora import LoraLayer

    model = lora(tiny_llama())
    radius = 0.05
    trainer = trainer_for(model, tmp_path, RegularizerConfig(distance_norm="frob", distance_mode="project",
                                                             distance_radius=radius), learning_rate=0.1)
    trainer.train()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    norms = [float(m.get_delta_weight("default").norm()) for m in layers]
    assert all(n <= radius * (1 + 1e-5) for n in norms), norms
    assert max(norms) > radius * 0.5  # the projection bounds the update, it does not zero it


@pytest.mark.parametrize("name", ["tsrs", "pace_full", "tsrs_pace", "tsrs_bss"])
def test_padded_positions_do_not_move_any_term(name, tmp_path):
    """Changing only the token ids under attention_mask 0 (labels -100) leaves every term where it was."""
    config, expected = REGULARIZED[name]
    trainer = trainer_for(lora(tiny_llama()), tmp_path, config)
    batch = collate(lm_rows()[:4])
    assert (batch["attention_mask"] == 0).any()
    before = terms(trainer, batch)
    changed = dict(batch)
    changed["input_ids"] = torch.where(batch["attention_mask"] == 0, torch.randint(3, VOCAB, batch["input_ids"].shape),
                                       batch["input_ids"])
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    after = terms(trainer, changed)
    assert set(before) == expected | {"loss_task"}
    for key in before:
        assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-9), key


def test_pace_consistency_reads_the_supervised_positions_only(tmp_path):
    """The PACE term is the mean over supervised (non -100, shifted) positions of Σ_vocab (logits₁ − logits₂)²:
    supervising the prompt too changes it (same noise), and it matches the term computed by hand from the logits."""
    config = RegularizerConfig(pace_weight=1.0, pace_sigma=1.0, pace_mode="full")
    model = lora(tiny_llama())
    trainer = trainer_for(model, tmp_path, config)
    batch = collate(lm_rows()[:4])
    answer_only = terms(trainer, batch)["loss_pace"]
    everything = dict(batch)
    everything["labels"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    assert terms(trainer, everything)["loss_pace"] != pytest.approx(answer_only, rel=1e-3)

    captured = {}
    hook = model.register_forward_hook(lambda m, a, out: captured.__setitem__("logits", out.logits.detach()))
    try:
        assert terms(trainer, batch)["loss_pace"] == pytest.approx(answer_only, rel=1e-6)
    finally:
        hook.remove()
    first, second = captured["logits"].chunk(2)
    supervised = torch.zeros_like(batch["labels"], dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    by_hand = ((first[supervised] - second[supervised]) ** 2).sum(-1).mean()
    assert answer_only == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("config, message", [
    (RegularizerConfig(pace_weight=0.5, pace_sigma=1.0, pace_mode="fast"), "PACE-fast cannot run on this model"),
    (RegularizerConfig(label_correction_threshold=0.9), "label correction cannot run on this model"),
    (RegularizerConfig(reweight_start_epoch=1), "reweighting cannot run on this model"),
])
def test_per_example_methods_are_refused_on_a_causal_lm(config, message, tmp_path):
    with pytest.raises(ValueError, match=message) as info:
        trainer_for(lora(tiny_llama()), tmp_path, config)
    assert "LlamaForCausalLM" in str(info.value) and "Turn them off" in str(info.value)


# --------------------------------------------------------------------------- RLRR / PACE tuners on a Llama
@pytest.mark.parametrize("tuner", ["rlrr", "pace"])
def test_save_load_merge_equality_on_a_llama(tuner, tmp_path):
    targets = ["q_proj", "v_proj", "up_proj"]
    config = RLRRConfig(target_modules=targets, r=4) if tuner == "rlrr" else PACEConfig(target_modules=targets, r=4)
    model = get_peft_model(tiny_llama(), config)
    trainer_for(model, tmp_path, RegularizerConfig(), learning_rate=5e-2, max_steps=3).train()
    batch = collate(lm_rows()[:4])
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        assert not torch.allclose(trained, _base_logits(model, batch), atol=1e-5)  # the adapter learned something
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)
        merged = loaded.merge_and_unload().eval()
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-4, atol=1e-4)
    assert type(merged) is LlamaForCausalLM


def _base_logits(model, batch):
    with model.disable_adapter():
        return model(**batch).logits


def test_bss_on_a_causal_lm_reads_the_features_of_the_supervised_tokens(tmp_path):
    """No classification head: BSS takes what lm_head reads at the positions the loss predicts, one row per token."""
    from peft_tsrs.regularizers.bss import batch_spectral_shrinkage

    model = lora(tiny_llama())
    trainer = trainer_for(model, tmp_path, RegularizerConfig(bss_weight=1.0))
    assert trainer.regularizers["bss"].head_name == "lm_head"
    batch = collate(lm_rows()[:4])
    captured = {}
    hook = model.base_model.model.lm_head.register_forward_pre_hook(
        lambda m, args: captured.__setitem__("features", args[0].detach()))
    try:
        logged = terms(trainer, batch)["loss_bss"]
    finally:
        hook.remove()
    supervised = torch.zeros_like(batch["labels"], dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    expected = batch_spectral_shrinkage(captured["features"][supervised])
    assert logged == pytest.approx(expected.item(), rel=1e-4)
