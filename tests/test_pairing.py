"""Paired passes (TSRS clean/noisy, PACE's two copies) differ only by the method's own noise: identical dropout masks,
attention-kernel dropout included, and TSRS norms over real tokens only."""

from __future__ import annotations

import pytest
import torch
from conftest import bert_inputs, make_tiny_bert, make_tiny_vit, vit_inputs
from peft import get_peft_model
from transformers import TrainingArguments

from peft_tsrs import PACEConfig, RegularizerConfig
from peft_tsrs.regularizers import relative_perturbation
from peft_tsrs.trainer import RegularizedTrainer

FACTORIES = {"bert": (make_tiny_bert, bert_inputs), "vit": (make_tiny_vit, vit_inputs)}


def _terms(tmp_path, model, inputs, cfg: RegularizerConfig, attn: str = "sdpa") -> dict[str, float]:
    model.set_attn_implementation(attn)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = RegularizedTrainer(model=model, args=args, regularizers=cfg)
    model.train()
    batch = dict(inputs, labels=torch.tensor([0, 1, 2, 0]), index=torch.arange(4))
    torch.manual_seed(0)
    trainer.compute_loss(model, batch)
    return {name: values[-1] for name, values in trainer._components.items() if values}


def _model(kind: str, **kw):
    make, inputs = FACTORIES[kind]
    return make(layers=4, attention_dropout=0.1, **kw), inputs()  # hidden dropout 0.1 as well


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_tsrs_zero_noise_gives_exactly_zero_with_dropout_on(tmp_path, kind, attn):
    model, inputs = _model(kind)
    terms = _terms(tmp_path, model, inputs, RegularizerConfig(tsrs_weight=1.0, tsrs_noise_std=0.0), attn)
    assert terms["loss_tsrs"] == 0.0
    model, inputs = _model(kind)
    assert _terms(tmp_path, model, inputs, RegularizerConfig(tsrs_weight=1.0, tsrs_noise_std=0.2), attn)["loss_tsrs"] > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_pace_full_zero_sigma_gives_exactly_zero_with_dropout_on(tmp_path, kind, attn):
    model, inputs = _model(kind)
    model = get_peft_model(model, PACEConfig(sigma=0.0))
    terms = _terms(tmp_path, model, inputs, RegularizerConfig(pace_weight=1.0, pace_mode="full"), attn)
    assert terms["loss_pace"] == 0.0


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_pace_full_with_tsrs_both_noises_zero_gives_two_zero_terms(tmp_path, kind):
    model, inputs = _model(kind)
    model = get_peft_model(model, PACEConfig(sigma=0.0))
    cfg = RegularizerConfig(pace_weight=1.0, pace_mode="full", tsrs_weight=1.0, tsrs_noise_std=0.0)
    terms = _terms(tmp_path, model, inputs, cfg)
    assert terms["loss_pace"] == 0.0 and terms["loss_tsrs"] == 0.0
    # TSRS noise on, PACE noise off: both PACE copies get the same TSRS noise, so the PACE term stays 0
    model, inputs = _model(kind)
    model = get_peft_model(model, PACEConfig(sigma=0.0))
    cfg = RegularizerConfig(pace_weight=1.0, pace_mode="full", tsrs_weight=1.0, tsrs_noise_std=0.5)
    terms = _terms(tmp_path, model, inputs, cfg)
    assert terms["loss_pace"] == 0.0 and terms["loss_tsrs"] > 0.0


def test_pace_lazy_half_batch_pairs_its_own_rows(tmp_path):
    model, inputs = _model("bert")
    model = get_peft_model(model, PACEConfig(sigma=0.0))
    cfg = RegularizerConfig(pace_weight=1.0, pace_mode="lazy", pace_lazy_every=1, tsrs_weight=1.0, tsrs_noise_std=0.0)
    terms = _terms(tmp_path, model, inputs, cfg)
    assert terms["loss_pace"] == 0.0 and terms["loss_tsrs"] == 0.0


# --- padding ------------------------------------------------------------------------------------------------
def test_relative_perturbation_masks_padded_positions_by_hand():
    clean = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]])  # (B=1, L=3, D=2); position 2 is padding
    noisy = torch.tensor([[[3.0, 1.0], [2.0, 4.0], [-50.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # real tokens: ‖diff‖ = sqrt(1 + 4), ‖clean‖ = 5
    assert relative_perturbation(clean, noisy, mask=mask).item() == pytest.approx(5**0.5 / 5)
    assert relative_perturbation(clean, noisy).item() != pytest.approx(5**0.5 / 5)
    # a mask that does not match the leading shape (pooled features) is ignored
    assert relative_perturbation(clean[:, 0], noisy[:, 0], mask=mask).item() == pytest.approx(1 / 3)


def test_tsrs_term_ignores_padded_positions(tmp_path):
    """Changing what sits at padded positions changes no real token (BERT masks them) and so not the term."""
    model = make_tiny_bert(layers=4)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inputs = bert_inputs()
    inputs["attention_mask"][1, -3:] = 0
    cfg = RegularizerConfig(tsrs_weight=1.0, tsrs_noise_std=0.2)
    first = _terms(tmp_path, model, inputs, cfg)["loss_tsrs"]
    padded = {k: v.clone() for k, v in inputs.items()}
    padded["input_ids"][1, -3:] = 7  # other tokens at the padded positions
    padded["input_ids"][0, -2:] = 3
    assert _terms(tmp_path, model, padded, cfg)["loss_tsrs"] == pytest.approx(first, rel=1e-6)
