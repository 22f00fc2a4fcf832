"""PACE's noise on LoRA and RLRR adapters (``RegularizerConfig.pace_sigma``): ``z ~ N(1, σ_d²)`` on the adapter branch
with the paper's depth schedule, only in the trainer's training forward; refusals when there is no noise source."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import bert_inputs, make_tiny_bert
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from peft_tsrs import PACEConfig, RegularizerConfig, RLRRConfig
from peft_tsrs.regularizers import adapter_noise, pace_noise_sites
from peft_tsrs.regularizers.adapter_noise import row_shared_noise
from peft_tsrs.trainer import RegularizedTrainer

HEAD = ["classifier"]
LAYERS = 4
LABELS = torch.tensor([0, 1, 2, 0])


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def lora(model=None, **kw):
    """LoRA with a random (non-zero) B, so the branch is not 0 at step 0."""
    model = make_tiny_bert(layers=LAYERS) if model is None else model
    config = dict(r=2, target_modules=["query", "value", "dense"], init_lora_weights=False, lora_dropout=0.1,
                  modules_to_save=HEAD)
    return get_peft_model(model, LoraConfig(**{**config, **kw}))


def rlrr(model=None):
    model = make_tiny_bert(layers=LAYERS) if model is None else model
    return get_peft_model(model, RLRRConfig(init_weights=False, modules_to_save=HEAD))


ADAPTERS = {"lora": lora, "rlrr": rlrr}


def dataset(n: int = 8) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({
        "input_ids": torch.randint(1, 50, (n, 6), generator=g).tolist(), "attention_mask": [[1] * 6] * n,
        "label": torch.randint(0, 3, (n,), generator=g).tolist(), "index": list(range(n)),
    })


def trainer_for(tmp_path, model, cfg: RegularizerConfig) -> RegularizedTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    return RegularizedTrainer(model=model, args=args, train_dataset=dataset(), regularizers=cfg)


def step_terms(tmp_path, model, cfg: RegularizerConfig, backward: bool = False) -> dict[str, float]:
    """One training ``compute_loss`` (and optionally its backward) on a 4-row batch; the logged terms."""
    trainer = trainer_for(tmp_path, model, cfg)
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(bert_inputs(), labels=LABELS, index=torch.arange(4)))
    if backward:
        loss.backward()
    return {name: values[-1] for name, values in trainer._components.items() if values}


def hooks_on(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --- where the noise acts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_noise_in_training_forwards_inside_the_context_only(kind):
    model = no_dropout(ADAPTERS[kind]())
    x = bert_inputs()
    sites = pace_noise_sites(model, 1.0)
    model.train()
    clean = model(**x).logits
    assert torch.equal(clean, model(**x).logits)  # no dropout: training forwards are deterministic outside
    with adapter_noise(sites, rows=4):
        a, b = model(**x).logits, model(**x).logits
        assert not torch.allclose(a, b) and not torch.allclose(a, clean)
        model.eval()
        evaluated = model(**x).logits  # eval: no noise even inside the context
        assert torch.equal(evaluated, model(**x).logits)
        torch.testing.assert_close(evaluated, clean)
        model.train()
        with model.disable_adapter():  # disabled adapters: no branch, and no head noise either
            assert torch.equal(model(**x).logits, model(**x).logits)
    assert torch.equal(model(**x).logits, clean)  # the hooks are gone
    assert hooks_on(model) == 0


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_no_noise_on_merged_adapters(kind):
    model = no_dropout(ADAPTERS[kind]())
    x = bert_inputs()
    sites = pace_noise_sites(model, 1.0)
    model.base_model.merge_adapter()
    model.train()
    with adapter_noise(sites, rows=4):
        assert torch.equal(model(**x).logits, model(**x).logits)


def test_hooks_are_removed_after_an_exception():
    model = lora()
    with pytest.raises(RuntimeError, match="boom"):
        with adapter_noise(pace_noise_sites(model, 1.0), rows=4):
            assert hooks_on(model) > 0
            raise RuntimeError("boom")
    assert hooks_on(model) == 0


def _layer(model, name: str = "layer.1.attention.self.query"):
    return next(m for n, m in model.named_modules() if n.endswith(name))


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_noise_multiplies_the_adapter_branch_per_sample_and_channel(kind):
    """``y = base(x) + z ⊙ Δ(x)``: the base output is untouched, z is shared over tokens ('BC') and varies over
    samples and channels, with the site's σ_d as its spread."""
    model = no_dropout(ADAPTERS[kind]()).train()
    layer = _layer(model)
    x = torch.randn(64, 5, 16)
    with torch.no_grad():
        base = layer.base_layer(x)
        branch = layer(x) - base  # no hook: the clean branch
        with adapter_noise(pace_noise_sites(model, 1.0), rows=64):
            noisy = layer(x)
    z = (noisy - base).mul(branch).sum(1) / branch.square().sum(1)  # least squares z per (sample, channel)
    torch.testing.assert_close(noisy, base + z[:, None] * branch, rtol=1e-4, atol=1e-5)
    assert 0.7 < float(z.std()) < 1.3 and abs(float(z.mean()) - 1) < 0.1  # block 1 of 4 at σ=1: σ_d = 1
    assert (z[0] - z[1]).abs().max() > 1e-2 and (z[:, 0] - z[:, 1]).abs().max() > 1e-2


def test_row_shared_noise_draws_per_row_and_repeats_over_stacked_copies():
    torch.manual_seed(0)
    z = row_shared_noise(torch.zeros(6, 5, 4), 1.0, rows=6)  # PACE's two copies are input rows: independent
    assert z.shape == (6, 1, 4) and not torch.allclose(z[:3], z[3:])
    z = row_shared_noise(torch.zeros(12, 5, 4), 1.0, rows=6)  # TSRS's clean and noisy copy of those 6 rows
    torch.testing.assert_close(z[:6], z[6:])
    assert not torch.allclose(z[:3], z[3:6])
    assert torch.equal(row_shared_noise(torch.zeros(6, 4), 0.0, rows=6), torch.ones(6, 4))


# --- the depth schedule --------------------------------------------------------------------------------------------
def _suffix(name: str) -> str:
    """``encoder.layer.1.attention.self.query`` / ``classifier`` from a site's or the tuner's module name."""
    return name.removeprefix("base_model.model.").removeprefix("bert.").removesuffix(".lora_B.default")


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_depth_schedule_matches_the_pace_tuner(kind):
    sigma = 1.2
    model = ADAPTERS[kind]()
    sites = {_suffix(s.name): s.sigma for s in pace_noise_sites(model, sigma)}
    assert not any(name.startswith("encoder.layer.0.") for name in sites)  # block 0: no noise
    assert sites["classifier"] == pytest.approx(sigma / LAYERS)
    assert sites["encoder.layer.1.attention.self.query"] == pytest.approx(sigma)
    assert sites[f"encoder.layer.{LAYERS - 1}.output.dense"] == pytest.approx(2 * sigma / LAYERS)
    # the PACE tuner on the same layers gives the same σ per layer
    targets = ["query", "value", "dense"] if kind == "lora" else None
    tuner = get_peft_model(make_tiny_bert(layers=LAYERS), PACEConfig(sigma=sigma, target_modules=targets,
                                                                     modules_to_save=HEAD))
    expected = {_suffix(name): value for name, value in tuner.base_model.sigmas().items() if value > 0}
    assert set(sites) == set(expected)
    for name, value in expected.items():
        assert sites[name] == pytest.approx(value), name


def test_zero_sigma_has_no_site_and_pace_tuner_keeps_its_own_noise():
    assert pace_noise_sites(lora(), 0.0) == []
    tuner = get_peft_model(make_tiny_bert(layers=LAYERS), PACEConfig(sigma=0.5, modules_to_save=HEAD))
    assert pace_noise_sites(tuner, None) == [] and pace_noise_sites(tuner, 0.5) == []


# --- refusals ------------------------------------------------------------------------------------------------------
def test_pace_weight_on_lora_without_pace_sigma_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no source of PACE's noise.*Set pace_sigma="):
        trainer_for(tmp_path, lora(), RegularizerConfig(pace_weight=0.5))
    with pytest.raises(ValueError, match=r"Set pace_sigma=.*with a LoRA or RLRR adapter"):
        trainer_for(tmp_path, make_tiny_bert(), RegularizerConfig(pace_weight=0.5, pace_mode="lazy"))
    trainer_for(tmp_path, lora(), RegularizerConfig(pace_weight=0.5, pace_sigma=0.0))  # on purpose: accepted
    trainer_for(tmp_path, lora(), RegularizerConfig(pace_sigma=1.0))  # PACE off: nothing to refuse


def test_pace_sigma_on_a_model_without_lora_or_rlrr_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"pace_sigma=1.0 .* BertForSequenceClassification has none"):
        trainer_for(tmp_path, make_tiny_bert(), RegularizerConfig(pace_weight=0.5, pace_sigma=1.0))


def test_pace_sigma_contradicting_the_pace_adapter_is_refused(tmp_path):
    def tuner():
        return get_peft_model(make_tiny_bert(), PACEConfig(sigma=0.5, modules_to_save=HEAD))

    with pytest.raises(ValueError, match=r"pace_sigma=1.0 contradicts the PACE adapter's own sigma \(0.5\)"):
        trainer_for(tmp_path, tuner(), RegularizerConfig(pace_weight=0.5, pace_sigma=1.0))
    trainer_for(tmp_path, tuner(), RegularizerConfig(pace_weight=0.5, pace_sigma=0.5))
    trainer_for(tmp_path, tuner(), RegularizerConfig(pace_weight=0.5))


def test_lora_variants_are_refused(tmp_path):
    with pytest.raises(ValueError, match="DoRA"):
        trainer_for(tmp_path, lora(use_dora=True), RegularizerConfig(pace_weight=0.5, pace_sigma=1.0))


# --- through the trainer -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_full_mode_term_positive_with_sigma_and_exactly_zero_without(tmp_path, kind):
    """Dropout 0.1 everywhere (hidden, attention probabilities, LoRA's own): shared between the copies, so only the
    noise makes them differ."""
    model = ADAPTERS[kind](make_tiny_bert(layers=LAYERS, attention_dropout=0.1))
    assert step_terms(tmp_path, model, RegularizerConfig(pace_weight=1.0, pace_sigma=1.0))["loss_pace"] > 0
    model = ADAPTERS[kind](make_tiny_bert(layers=LAYERS, attention_dropout=0.1))
    assert step_terms(tmp_path, model, RegularizerConfig(pace_weight=1.0, pace_sigma=0.0))["loss_pace"] == 0.0


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_noise_without_consistency_when_the_weight_is_zero(tmp_path, kind, mode):
    """pace_sigma > 0 with pace_weight 0: the training loss is the task loss of one noisy copy (no pair, no term, no
    store); it used to be a silent no-op."""
    cfg = RegularizerConfig(pace_weight=0.0, pace_sigma=2.0, pace_mode=mode)
    assert not cfg.is_noop and not cfg.needs_index and not cfg.uses_pace
    model = no_dropout(ADAPTERS[kind]())
    trainer = trainer_for(tmp_path, model, cfg)
    pace = trainer.regularizers["pace"]
    assert pace.store is None and pace.noise_sites
    batch = dict(bert_inputs(), labels=LABELS)
    model.train()
    torch.manual_seed(0)
    noisy = trainer.compute_loss(model, dict(batch))
    clean = torch.nn.functional.cross_entropy(model(**bert_inputs()).logits, LABELS)
    assert "loss_pace" not in trainer._components and not torch.allclose(noisy, clean)
    torch.manual_seed(0)
    assert torch.equal(noisy, trainer.compute_loss(model, dict(batch)))  # one copy, drawn from the seed
    model.eval()
    assert torch.allclose(trainer.compute_loss(model, dict(batch)), clean)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_no_noise_in_evaluation_nor_after_the_training_step(tmp_path, kind):
    model = no_dropout(ADAPTERS[kind]())
    trainer = trainer_for(tmp_path, model, RegularizerConfig(pace_weight=1.0, pace_sigma=2.0))
    batch = dict(bert_inputs(), labels=LABELS, index=torch.arange(4))
    model.train()
    assert trainer._components == {}
    trainer.compute_loss(model, batch)
    assert trainer._components["loss_pace"][-1] > 0
    assert hooks_on(model) == 0
    x = bert_inputs()
    assert torch.equal(model(**x).logits, model(**x).logits)  # training mode, outside the trainer: no noise
    model.eval()
    first = trainer.compute_loss(model, batch)
    assert torch.equal(first, trainer.compute_loss(model, batch))


@pytest.mark.parametrize("mode", ["full", "lazy", "fast"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_training_step_is_finite_and_trains_only_the_adapter(tmp_path, kind, mode):
    model = ADAPTERS[kind](make_tiny_bert(layers=LAYERS, attention_dropout=0.1))
    cfg = RegularizerConfig(pace_weight=0.5, pace_mode=mode, pace_lazy_every=1, pace_sigma=1.0)
    terms = step_terms(tmp_path, model, cfg, backward=True)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values()) and terms["loss_pace"] > 0
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(p.requires_grad for n, p in model.named_parameters() if n in trained)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    prefix = "lora_" if kind == "lora" else "rlrr_"
    assert any(prefix in n and float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if n in trained)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_with_tsrs_the_clean_and_noisy_copies_share_z(tmp_path, kind):
    """TSRS with zero noise: its clean and noisy copies see the same PACE z (and dropout), so its term is exactly 0
    while PACE's two copies, with independent z, differ."""
    model = ADAPTERS[kind](make_tiny_bert(layers=LAYERS, attention_dropout=0.1))
    cfg = RegularizerConfig(pace_weight=1.0, pace_sigma=1.0, tsrs_weight=1.0, tsrs_noise_std=0.0, tsrs_inject_layer=1)
    terms = step_terms(tmp_path, model, cfg)
    assert terms["loss_tsrs"] == 0.0 and terms["loss_pace"] > 0
    model = ADAPTERS[kind](make_tiny_bert(layers=LAYERS, attention_dropout=0.1))
    cfg = RegularizerConfig(pace_weight=1.0, pace_sigma=1.0, tsrs_weight=1.0, tsrs_inject_layer=1)
    terms = step_terms(tmp_path, model, cfg, backward=True)
    assert terms["loss_tsrs"] > 0 and terms["loss_pace"] > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_lora_pace_trains_end_to_end(tmp_path):
    model = lora(make_tiny_bert(layers=LAYERS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", logging_steps=1)
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=dataset(),
                                 regularizers=RegularizerConfig(pace_weight=0.5, pace_sigma=1.0))
    trainer.train()
    logged = [h["loss_pace"] for h in trainer.state.log_history if "loss_pace" in h]
    assert len(logged) == 3 and all(v > 0 for v in logged)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert hooks_on(model) == 0
