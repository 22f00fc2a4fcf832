"""RLRR tuner: parametrization, init, exact merge/unmerge, save/load, PEFT behaviour, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_vit, vit_inputs
from peft import PeftModel, get_peft_model
from torch import nn
from tuner_checks import assert_gradients_only_on_trainable, assert_merge_roundtrip, base_weights, logits

from peft_tsrs import RLRRConfig
from peft_tsrs.tuners.rlrr import Linear as RLRRLinear
from peft_tsrs.tuners.rlrr import ScaleShift

HEAD = ["classifier"]


def test_default_targets_follow_installed_module_names(tiny):
    make, _, kind = tiny
    model = get_peft_model(make(), RLRRConfig())
    names = sorted(model.base_model.targeted_module_names)
    if kind == "vit":
        suffixes = {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    else:
        suffixes = {"self.query", "self.key", "self.value", "attention.output.dense", "intermediate.dense",
                    "output.dense"}
    assert len(names) == 2 * 6
    assert all(any(n.endswith(s) for s in suffixes) for n in names)
    assert not any("pooler" in n for n in names)


def test_identity_init_is_the_pretrained_model(tiny):
    make, inputs, _ = tiny
    x = inputs()
    ref = logits(make(), x)
    model = get_peft_model(make(), RLRRConfig(ssf=True, modules_to_save=HEAD)).eval()
    assert torch.equal(logits(model, x), ref)


def test_official_kaiming_init_is_not_identity(tiny):
    make, inputs, _ = tiny
    x = inputs()
    ref = logits(make(), x)
    model = get_peft_model(make(), RLRRConfig(init_weights="kaiming", ssf=True)).eval()
    assert not torch.allclose(logits(model, x), ref)
    layer = next(m for m in model.modules() if isinstance(m, RLRRLinear))
    assert torch.count_nonzero(layer.rlrr_L["default"]) > 0 and torch.count_nonzero(layer.rlrr_shift["default"]) == 0
    ssf = next(m for m in model.modules() if isinstance(m, ScaleShift))
    assert 0.0 < (ssf.rlrr_ssf_scale["default"] - 1).abs().max() < 0.2


def test_forward_matches_formula():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    layer = RLRRLinear(lin, "default", RLRRConfig(r=2, init_weights="random"))
    x = torch.randn(3, 5)
    L, R, shift = layer.rlrr_L["default"], layer.rlrr_R["default"], layer.rlrr_shift["default"]
    w = lin.weight + lin.weight * (L @ R)
    expected = x @ w.T + lin.bias + shift
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.get_delta_weight("default"), lin.weight * (L @ R))


@pytest.mark.parametrize("ssf", [False, True])
def test_merge_unmerge_exact(tiny, ssf):
    make, inputs, _ = tiny
    model = get_peft_model(make(), RLRRConfig(r=2, init_weights=False, ssf=ssf, modules_to_save=HEAD))
    assert_merge_roundtrip(model, inputs())


def test_merge_and_unload_gives_plain_model(tiny):
    make, inputs, _ = tiny
    x = inputs()
    model = get_peft_model(make(), RLRRConfig(init_weights=False, ssf=True, modules_to_save=HEAD)).eval()
    out = logits(model, x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (RLRRLinear, ScaleShift)) for m in merged.modules())
    assert not any("rlrr_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, x), out, atol=1e-5, rtol=1e-4)


def test_safe_merge_rejects_nan(tiny):
    make, inputs, _ = tiny
    model = get_peft_model(make(), RLRRConfig(init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, RLRRLinear))
    weights = base_weights(model)
    with torch.no_grad():
        layer.rlrr_L["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for name, w in base_weights(model).items():
        assert torch.equal(w, weights[name])


def test_save_load_round_trip_bit_identical(tiny, tmp_path):
    make, inputs, _ = tiny
    x = inputs()
    model = get_peft_model(make(), RLRRConfig(r=2, init_weights=False, ssf=True, modules_to_save=HEAD)).eval()
    with torch.no_grad():  # make the head differ from the fresh base's, so it must be saved too
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    out = logits(model, x)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert torch.equal(logits(loaded, x), out)
    assert isinstance(loaded.peft_config["default"], RLRRConfig) and loaded.peft_config["default"].r == 2


def test_update_after_training_step_has_rlrr_structure(tiny):
    """ΔW = W0 ⊙ (rank ≤ r matrix) after real optimizer steps."""
    make, inputs, _ = tiny
    x = inputs()
    for r in (1, 2):
        # float64 so that reading ΔW back from merged weights is not drowned in rounding
        model = get_peft_model(make().double(), RLRRConfig(r=r, modules_to_save=HEAD))
        x = {k: v.double() if v.is_floating_point() else v for k, v in inputs().items()}
        before = {n: m.get_base_layer().weight.detach().clone()
                  for n, m in model.named_modules() if isinstance(m, RLRRLinear)}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            opt.zero_grad()
            model(**x, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
            opt.step()
        merged = model.merge_and_unload()
        for name, w0 in before.items():
            w = merged.get_submodule(name.removeprefix("base_model.model.")).weight.detach()
            ratio = (w - w0) / w0
            assert torch.linalg.matrix_rank(ratio, rtol=1e-8) <= r
            assert (w - w0).abs().max() > 0


def test_gradient_reaches_only_trainable_parameters(tiny):
    make, inputs, _ = tiny
    model = get_peft_model(make(), RLRRConfig(ssf=True, modules_to_save=HEAD))
    assert_gradients_only_on_trainable(model, inputs(), ("rlrr_", "classifier.modules_to_save"))


def test_trainable_parameter_count():
    model = get_peft_model(make_tiny_bert(), RLRRConfig(r=2, modules_to_save=HEAD))
    trainable, _ = model.get_nb_trainable_parameters()
    expected = 0
    for m in model.modules():
        if isinstance(m, RLRRLinear):
            expected += m.out_features * 2 + 2 * m.in_features + m.out_features
    expected += 16 * 3 + 3  # classifier copy
    assert trainable == expected


def test_multiple_adapters_set_disable_delete(tiny):
    make, inputs, _ = tiny
    x = inputs()
    ref = logits(make(), x)
    model = get_peft_model(make(), RLRRConfig(init_weights=False))
    model.add_adapter("second", RLRRConfig(r=3, init_weights=False))
    model.eval()
    out_default = logits(model, x)
    model.set_adapter("second")
    out_second = logits(model, x)
    assert not torch.allclose(out_default, out_second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), ref)
    torch.testing.assert_close(logits(model, x), out_second)
    # two active adapters at once: merge still exact
    model.base_model.set_adapter(["default", "second"])
    assert_merge_roundtrip(model, x)
    model.base_model.set_adapter("second")
    model.delete_adapter("default")
    assert not any(".default" in n for n, _ in model.named_parameters() if "rlrr_" in n)
    torch.testing.assert_close(logits(model, x), out_second)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_dtypes_preserved(dtype, atol):
    model = get_peft_model(make_tiny_vit().to(dtype), RLRRConfig(init_weights=False, ssf=True))
    x = {"pixel_values": vit_inputs()["pixel_values"].to(dtype)}
    out = logits(model.eval(), x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    layer = next(m for m in model.modules() if isinstance(m, RLRRLinear))
    assert layer.get_base_layer().weight.dtype == dtype
    model.merge_adapter()
    assert layer.get_base_layer().weight.dtype == dtype
    torch.testing.assert_close(logits(model, x).float(), out.float(), atol=atol, rtol=atol)
    model.unmerge_adapter()


def test_device_and_dtype_moves_carry_adapters():
    model = get_peft_model(make_tiny_vit(), RLRRConfig(init_weights=False)).to("cpu").to(torch.float64)
    layer = next(m for m in model.modules() if isinstance(m, RLRRLinear))
    assert layer.rlrr_L["default"].dtype == torch.float64
    out = logits(model.eval(), {"pixel_values": vit_inputs()["pixel_values"].double()})
    assert out.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_modules": ["no_such_module"]}, "not found"),
        ({"r": 0}, "positive integer"),
        ({"r": -2}, "positive integer"),
        ({"init_weights": "xavier"}, "unknown init_weights"),
        ({"target_modules": ["layernorm_before"]}, "RLRR adapts nn.Linear"),
    ],
)
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(make_tiny_vit(), RLRRConfig(**kwargs))


def test_unknown_model_type_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Pass `target_modules`"):
        get_peft_model(model, RLRRConfig())
    peft_model = get_peft_model(model, RLRRConfig(target_modules=["0", "2"], init_weights=False))
    x = torch.randn(2, 3)
    out = peft_model(x)
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(x), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("r", [1, 4])
def test_official_kaiming_init_uses_a_zero(r):
    """The official code inits both scale vectors with kaiming_uniform_(a=0): gain √2, bound √(6 / fan_in) — √6 ≈
    2.449 for s_out (fan_in 1 at r=1), not PyTorch's a=√5 bound 1/√fan_in (1.0 there)."""
    torch.manual_seed(0)
    layer = RLRRLinear(nn.Linear(300, 2000), "default", RLRRConfig(r=r, init_weights="kaiming"))
    L, R = layer.rlrr_L["default"].detach(), layer.rlrr_R["default"].detach()
    bound_L, bound_R = math.sqrt(6.0 / r), math.sqrt(6.0 / 300)
    if r == 1:
        assert bound_L == pytest.approx(2.449, abs=1e-3)
    assert L.abs().max() <= bound_L and R.abs().max() <= bound_R
    # 2000·r and 300·r uniform draws: the largest comes within 1% of the bound (beyond any a=√5 bound, √(1/fan_in))
    assert L.abs().max() > 0.99 * bound_L and R.abs().max() > 0.99 * bound_R
    assert L.abs().max() > 2.0 * math.sqrt(1.0 / r)
    assert torch.count_nonzero(layer.rlrr_shift["default"]) == 0


@pytest.mark.parametrize("train", [False, True])
def test_new_layers_take_the_training_flag_of_their_target(train):
    model = get_peft_model(make_tiny_vit().train(train), RLRRConfig(target_modules=["q_proj"], ssf=True))
    model.add_adapter("second", RLRRConfig(target_modules=["fc1"]))
    layers = [m for m in model.modules() if isinstance(m, (RLRRLinear, ScaleShift))]
    assert any(isinstance(m, ScaleShift) for m in layers) and len(layers) > 4
    assert all(m.training == train for m in layers)
