"""Diagnostics: stable rank, effective weights through PEFT wrappers, distance, gradient norm, noise sensitivity,
sharpness."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_vit
from peft import IA3Config, LoraConfig, get_peft_model
from torch import nn

from peft_tsrs.diagnostics import (
    distance_travelled,
    effective_weights,
    gradient_norm,
    noise_sensitivity,
    sharpness_1d,
    snapshot_effective_weights,
    stable_rank,
    stable_ranks,
    summarize,
)

LORA_TARGETS = {"vit": ["q_proj", "v_proj", "fc1"], "bert": ["query", "value", "intermediate.dense"]}


def _lora(kind: str, make, **extra):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS[kind], init_lora_weights=False, **extra)
    return get_peft_model(make(), config)


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


# --------------------------------------------------------------------------------------------- stable rank
def test_stable_rank_hand_built():
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    u, v = torch.randn(5), torch.randn(9)
    assert stable_rank(torch.outer(u, v)) == pytest.approx(1.0, rel=1e-5)
    assert stable_rank(torch.diag(torch.tensor([3.0, 4.0]))) == pytest.approx(25 / 16)
    assert stable_rank(torch.zeros(4, 3)) == 0.0
    kernel = torch.randn(8, 3, 3, 3)
    assert stable_rank(kernel) == pytest.approx(stable_rank(kernel.reshape(8, 27)))
    assert stable_rank(torch.eye(3, dtype=torch.float64) * 2) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="matrix"):
        stable_rank(torch.ones(3))


# --------------------------------------------------------------------------------------------- effective weights
def test_effective_weights_plain_model(tiny):
    make, _, _ = tiny
    model = make()
    eff = effective_weights(model)
    expected = _linear_weights(model)
    assert eff.keys() == expected.keys()
    assert all(torch.equal(eff[n], expected[n]) for n in eff)
    ranks = stable_ranks(model, include=r"classifier")
    assert list(ranks) == ["classifier"]


def test_effective_weights_lora_equal_merged(tiny):
    make, _, kind = tiny
    peft_model = _lora(kind, make)
    eff = {n: w.clone() for n, w in effective_weights(peft_model).items()}
    merged = _linear_weights(copy.deepcopy(peft_model).merge_and_unload())
    assert eff.keys() == merged.keys()
    for name in eff:
        torch.testing.assert_close(eff[name], merged[name], rtol=1e-5, atol=1e-6)
    base = _linear_weights(make())
    changed = [n for n in eff if not torch.equal(eff[n], base[n])]
    assert changed and all(any(t in n for t in LORA_TARGETS[kind]) for n in changed)
    with peft_model.disable_adapter():  # adapters off: the base weights
        assert all(torch.equal(w, base[n]) for n, w in effective_weights(peft_model).items())
    peft_model.merge_adapter()  # merged: still the same effective weights
    for name, weight in effective_weights(peft_model).items():
        torch.testing.assert_close(weight, eff[name], rtol=1e-5, atol=1e-6)


def test_effective_weights_modules_to_save_and_ia3():
    model = _lora("vit", make_tiny_vit, modules_to_save=["classifier"])
    copy_ = model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        copy_.weight.add_(1.0)
    eff = effective_weights(model)
    assert torch.equal(eff["classifier"], copy_.weight)
    assert not any("modules_to_save" in n or "original_module" in n for n in eff)

    # IA3 has no get_delta_weight: the weight is read off the layer's forward
    ia3 = get_peft_model(make_tiny_vit(), IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"]))
    with torch.no_grad():
        for name, param in ia3.named_parameters():
            if "ia3_l" in name:
                param.uniform_(0.5, 1.5)
    eff = {n: w.clone() for n, w in effective_weights(ia3).items()}
    merged = _linear_weights(copy.deepcopy(ia3).merge_and_unload())
    for name in merged:
        torch.testing.assert_close(eff[name], merged[name], rtol=1e-5, atol=1e-5)


def test_effective_weights_rlrr_equal_merged():
    from peft_tsrs import RLRRConfig

    config = RLRRConfig(init_weights=False, target_modules=["q_proj", "fc1"], ssf=True)
    model = get_peft_model(make_tiny_vit(), config)
    eff = {n: w.clone() for n, w in effective_weights(model).items()}
    base = _linear_weights(make_tiny_vit())
    patch = "vit.embeddings.patch_embeddings.projection"  # SSF after the patch embedding folds into its kernel
    assert not torch.equal(eff[patch], base[patch])
    merged = _linear_weights(copy.deepcopy(model).merge_and_unload())
    assert eff.keys() == merged.keys()
    for name in eff:
        torch.testing.assert_close(eff[name], merged[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- distance, gradients
def test_distance_travelled_and_gradient_norm(tiny):
    make, inputs, kind = tiny
    model = _lora(kind, make)
    start = snapshot_effective_weights(model)
    assert all(d == 0.0 for d in distance_travelled(model, start).values())
    model.train()
    loss = nn.functional.cross_entropy(model(**inputs()).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad]
    assert gradient_norm(model) == pytest.approx(float(torch.cat(grads).norm()), rel=1e-5)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    moved = distance_travelled(model, start)
    assert all((d > 0) == any(t in n for t in LORA_TARGETS[kind]) for n, d in moved.items())
    # against the plain pretrained model (names match through the PEFT wrapper)
    from_plain = distance_travelled(model, make())
    assert from_plain.keys() == moved.keys()
    summary = summarize(model, reference=start, per_layer=True)
    json.dumps(summary)
    assert summary["distance_total"] == pytest.approx(sum(moved.values()))
    assert summary["num_layers"] == len(moved) and summary["stable_rank_median"] > 0


def test_gradient_norm_and_distance_errors():
    model = make_tiny_vit()
    with pytest.raises(ValueError, match="backward"):
        gradient_norm(model)
    with pytest.raises(ValueError, match="shares no layer"):
        distance_travelled(model, {"nothing": torch.zeros(1)})


# --------------------------------------------------------------------------------------------- noise sensitivity
def test_noise_sensitivity(tiny):
    make, inputs, kind = tiny
    model = make().train()
    x = inputs()
    assert noise_sensitivity(model, x, noise_std=0.0) == 0.0
    value = noise_sensitivity(model, x, noise_std=0.5, layer=1, n_samples=2)
    assert value > 0
    assert noise_sensitivity(model, x, noise_std=0.5, layer=1, n_samples=2) == value  # seeded
    assert all(m.training for m in model.modules())  # training mode restored
    assert noise_sensitivity(_lora(kind, make), x, noise_std=0.5) > 0  # through the PEFT wrapper
    with pytest.raises(ValueError, match="2 blocks"):
        noise_sensitivity(model, x, layer=5)


# --------------------------------------------------------------------------------------------- sharpness
def test_sharpness_restores_parameters(tiny):
    make, inputs, kind = tiny
    model = _lora(kind, make).train()
    x, y = inputs(), torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(**x).logits, y)

    out = sharpness_1d(model, loss_fn, radius=0.5, n_points=5)
    assert out["alphas"] == pytest.approx([-0.5, -0.25, 0.0, 0.25, 0.5])
    assert len(out["losses"]) == 5 and out["losses"][2] == pytest.approx(out["loss_at_zero"])
    assert out["sharpness"] > 0
    json.dumps(out)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # bit for bit
    assert all(m.training for m in model.modules())
    assert sharpness_1d(model, loss_fn, radius=0.5, n_points=5) == out  # deterministic given the seed
    frozen = make().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        sharpness_1d(frozen, loss_fn)
