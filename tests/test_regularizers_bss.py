"""Batch Spectral Shrinkage: the term by hand, its gradient, and in the trainer on the features the head reads — on the
task path's rows when TSRS / PACE add copies to the forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_vit
from peft import LoraConfig, get_peft_model
from test_trainer import batch_of, make_args, make_dataset, no_dropout_bert
from torch import nn

from peft_tsrs import RegularizedTrainer, RegularizerConfig
from peft_tsrs.regularizers import BSSRegularizer, batch_spectral_shrinkage, find_head

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# --- the functional term -----------------------------------------------------------------------------
def test_bss_by_hand_on_known_singular_values():
    # F = U diag(3, 2, 0.5) Vᵀ (4 × 3): singular values 3, 2, 0.5 whatever the rotations
    core = torch.zeros(4, 3, dtype=torch.float64)
    core[0, 0], core[1, 1], core[2, 2] = 3.0, 2.0, 0.5
    f = _orthogonal(4, 0) @ core @ _orthogonal(3, 1).T
    assert batch_spectral_shrinkage(f).item() == pytest.approx(0.25, rel=1e-5)  # the smallest only: 0.5²
    assert batch_spectral_shrinkage(f, k=2).item() == pytest.approx(0.25 + 4.0, rel=1e-5)
    assert batch_spectral_shrinkage(f, k=3).item() == pytest.approx(0.25 + 4.0 + 9.0, rel=1e-5)
    assert batch_spectral_shrinkage(f, k=5).item() == pytest.approx(f.pow(2).sum().item(), rel=1e-5)  # all: ‖F‖_F²
    assert batch_spectral_shrinkage(f).dtype == torch.float32
    assert batch_spectral_shrinkage(f.to(torch.bfloat16)).dtype == torch.float32


def test_bss_with_fewer_rows_than_features_takes_the_smallest_of_the_batch_values():
    f = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))  # B = 3 < d = 5: rank 3, three values
    expected = torch.linalg.eigvalsh(f @ f.T)  # σ² of F, ascending, none of them 0
    assert expected[0] > 1e-3
    torch.testing.assert_close(batch_spectral_shrinkage(f), expected[0])
    torch.testing.assert_close(batch_spectral_shrinkage(f, k=2), expected[:2].sum())


def test_bss_gradient_matches_the_closed_form():
    # d σ_min² / dF = 2 σ_min u vᵀ (u, v the singular vectors of σ_min); B ≥ d and B < d
    for shape in ((6, 4), (3, 5)):
        f = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
        batch_spectral_shrinkage(f).backward()
        u, s, vh = torch.linalg.svd(f.detach().double(), full_matrices=False)
        expected = 2 * s[-1] * torch.outer(u[:, -1], vh[-1])
        torch.testing.assert_close(f.grad.double(), expected, atol=1e-5, rtol=1e-4)


def test_bss_gradient_with_k_two_matches_autograd_of_the_eigenvalues():
    f = torch.randn(7, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(batch_spectral_shrinkage(f, k=2), f)
    g = f.detach().clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(torch.linalg.eigvalsh(g.T @ g)[:2].sum(), g)  # σ_i² = eigenvalues of FᵀF
    torch.testing.assert_close(grad.double(), reference, atol=1e-5, rtol=1e-4)


def test_bss_refuses_what_is_not_a_batch_matrix():
    with pytest.raises(ValueError, match=r"\(batch, features\) matrix, got shape \(2, 3, 4\)"):
        batch_spectral_shrinkage(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        batch_spectral_shrinkage(torch.randn(4, 3), k=0)


# --- configuration -------------------------------------------------------------------------------------
def test_off_by_default_and_validated():
    cfg = RegularizerConfig()
    assert (cfg.bss_weight, cfg.bss_k, cfg.uses_bss, cfg.is_noop) == (0.0, 1, False, True)
    on = RegularizerConfig(bss_weight=1e-3)
    assert on.uses_bss and not on.is_noop
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="bss_weight must be (a finite number|>= 0)"):
            RegularizerConfig(bss_weight=bad)
    with pytest.raises(ValueError, match="bss_k must be >= 1"):
        RegularizerConfig(bss_weight=1e-3, bss_k=0)


@pytest.mark.parametrize("recipe", ["tsrs.yaml", "tsrs_lora.yaml"])
def test_the_tsrs_recipes_turn_bss_on_with_the_official_weight(recipe):
    from peft_tsrs.app.recipes import load_recipe

    cfg = load_recipe([str(CONFIGS / "methods" / recipe)]).regularizers
    assert (cfg.bss_weight, cfg.bss_k, cfg.uses_tsrs) == (1e-3, 1, True)
    assert load_recipe([str(CONFIGS / "methods" / recipe)], ["regularizers.bss_weight=0"]).regularizers.uses_bss is False


def _pre_hooks(module: nn.Module) -> int:
    return len(module._forward_pre_hooks)


def test_no_hook_when_off_and_none_left_after_a_step(tmp_path):
    ds = make_dataset()
    model = no_dropout_bert()
    off = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds,
                             regularizers=RegularizerConfig(tsrs_weight=0.1))
    assert "bss" not in off.regularizers
    model.train()
    off.compute_loss(model, batch_of(ds))
    assert "loss_bss" not in off._components and _pre_hooks(model.classifier) == 0
    on = RegularizedTrainer(model=model, args=make_args(tmp_path), train_dataset=ds,
                            regularizers=RegularizerConfig(bss_weight=1e-3))
    assert list(on.regularizers) == ["bss"] and _pre_hooks(model.classifier) == 0
    on.compute_loss(model, batch_of(ds))
    assert len(on._components["loss_bss"]) == 1 and _pre_hooks(model.classifier) == 0


# --- in the trainer ------------------------------------------------------------------------------------
class _HeadInput:
    """Records what the head is called with (every call), next to the regularizer's own hook."""

    def __init__(self, head: nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handle = head.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].detach()))

    def __enter__(self) -> "_HeadInput":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _vit_no_dropout() -> nn.Module:
    model = make_tiny_vit()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _vit_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(n, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _bert_batch(n: int = 8) -> dict[str, torch.Tensor]:
    return batch_of(make_dataset(), n)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_total_loss_is_task_plus_weighted_bss_of_the_head_input(tmp_path, kind):
    model, batch = (no_dropout_bert(), _bert_batch()) if kind == "bert" else (_vit_no_dropout(), _vit_batch())
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), regularizers=RegularizerConfig(bss_weight=0.5))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    with _HeadInput(model.classifier) as head:  # by hand: BERT's pooled output, ViT's layer-normed CLS token
        logits = model(**inputs).logits
    (features,) = head.seen
    assert features.shape == (8, 16)
    if kind == "vit":
        cls = model.vit.layernorm(model.vit(**inputs).last_hidden_state)[:, 0]
        torch.testing.assert_close(features, cls.detach())
    bss = 0.5 * batch_spectral_shrinkage(features)
    assert bss > 0
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]) + bss)
    assert trainer._components["loss_bss"][-1] == pytest.approx(bss.item(), rel=1e-5)


def test_bss_gradient_reaches_the_encoder_through_the_head_input(tmp_path):
    batch = _bert_batch()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    model = no_dropout_bert()
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), regularizers=RegularizerConfig(bss_weight=0.5))
    model.train()
    trainer.compute_loss(model, dict(batch)).backward()
    got = model.bert.pooler.dense.weight.grad.clone()
    model.zero_grad()
    pooled = model.bert(**inputs).pooler_output
    (F.cross_entropy(model.classifier(pooled), batch["labels"]) + 0.5 * batch_spectral_shrinkage(pooled)).backward()
    torch.testing.assert_close(got, model.bert.pooler.dense.weight.grad, atol=1e-6, rtol=1e-5)


def _step_with_head_input(tmp_path, model, batch, cfg):
    """One seeded training ``compute_loss``: (trainer, loss, outputs, the features the head saw)."""
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), regularizers=cfg)
    model.train()
    torch.manual_seed(0)
    with _HeadInput(model.classifier) as head:
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    (features,) = head.seen
    return trainer, loss, outputs, features


@pytest.mark.parametrize("kind", ["bert", "vit"])
@pytest.mark.parametrize("path", ["noisy", "clean"])
def test_with_tsrs_bss_reads_the_task_path_rows(tmp_path, kind, path):
    """The forward carries [clean, noisy] (2B rows); BSS is on the half the task loss uses."""
    model, batch = (no_dropout_bert(), _bert_batch()) if kind == "bert" else (_vit_no_dropout(), _vit_batch())
    cfg = RegularizerConfig(bss_weight=0.5, tsrs_weight=0.3, tsrs_noise_std=1.0, tsrs_inject_layer=0,
                            tsrs_task_loss_path=path)
    trainer, loss, outputs, features = _step_with_head_input(tmp_path, model, batch, cfg)
    assert features.shape[0] == 16
    task_rows = slice(8, 16) if path == "noisy" else slice(0, 8)
    other_rows = slice(0, 8) if path == "noisy" else slice(8, 16)
    bss = 0.5 * batch_spectral_shrinkage(features[task_rows])
    logged = trainer._components["loss_bss"][-1]
    assert logged == pytest.approx(bss.item(), rel=1e-5)
    assert logged != pytest.approx(0.5 * batch_spectral_shrinkage(features[other_rows]).item(), rel=1e-2)
    task = F.cross_entropy(outputs.logits[task_rows], batch["labels"])
    torch.testing.assert_close(loss, task + trainer._components["loss_tsrs"][-1] + bss)


def test_with_tsrs_and_pace_bss_reads_the_first_noisy_copy(tmp_path):
    """PACE duplicates at the input, TSRS at block 0: [clean 1, clean 2, noisy 1, noisy 2], task path = noisy 1."""
    batch = _bert_batch()
    model = no_dropout_bert()
    cfg = RegularizerConfig(bss_weight=0.5, tsrs_weight=0.3, tsrs_noise_std=1.0, tsrs_inject_layer=0,
                            pace_weight=0.7, pace_sigma=0.0)  # a plain model: PACE's pairing without its noise
    trainer, loss, outputs, features = _step_with_head_input(tmp_path, model, batch, cfg)
    assert features.shape[0] == 32
    bss = 0.5 * batch_spectral_shrinkage(features[16:24])
    assert trainer._components["loss_bss"][-1] == pytest.approx(bss.item(), rel=1e-5)
    first, second = outputs.logits[16:24], outputs.logits[24:32]
    pace = 0.7 * (first - second).pow(2).sum(-1).mean()
    expected = F.cross_entropy(first, batch["labels"]) + trainer._components["loss_tsrs"][-1] + pace + bss
    torch.testing.assert_close(loss, expected)


def test_through_a_peft_modules_to_save_head(tmp_path):
    batch = _bert_batch()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    model = get_peft_model(no_dropout_bert(), LoraConfig(target_modules=["query", "value"], init_lora_weights=False,
                                                         modules_to_save=["classifier"]))
    name, head = find_head(model)
    assert name == "classifier" and type(head).__name__ == "ModulesToSaveWrapper"
    trainer = RegularizedTrainer(model=model, args=make_args(tmp_path), regularizers=RegularizerConfig(bss_weight=0.5))
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with _HeadInput(head) as seen:
        logits = model(**inputs).logits
    expected = F.cross_entropy(logits, batch["labels"]) + 0.5 * batch_spectral_shrinkage(seen.seen[0])
    torch.testing.assert_close(loss, expected)


def test_a_head_that_reads_a_sequence_is_refused():
    head = nn.Linear(4, 2)
    reg = BSSRegularizer(head, weight=1e-3, head_name="score")
    with pytest.raises(RuntimeError, match=r"head 'score' .* shape \(2, 5, 4\).*set bss_weight=0"):
        with reg.forward_context(None):  # type: ignore[arg-type]
            head(torch.randn(2, 5, 4))
    assert _pre_hooks(head) == 0  # removed on the way out


def test_find_head_names_what_it_looked_for():
    with pytest.raises(ValueError, match="classification head of Sequential.*'classifier', 'score'"):
        find_head(nn.Sequential(nn.Linear(2, 2)))
