"""PACE tuner: variants, exact merge, noise only on the adapter branch and in training, depth schedule, PEFT
behaviour, errors."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_vit, vit_inputs
from peft import PeftModel, get_peft_model
from torch import nn
from tuner_checks import assert_gradients_only_on_trainable, assert_merge_roundtrip, logits

from peft_tsrs import PACEConfig
from peft_tsrs.tuners.pace import Linear as PACELinear
from peft_tsrs.tuners.pace import depth_sigma

HEAD = ["classifier"]
VARIANTS = ["lora_mul_vpt_add", "lora_add", "vpt_add"]


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def test_identity_init_is_the_pretrained_model(tiny):
    make, inputs, _ = tiny
    x = inputs()
    ref = logits(make(), x)
    for variant in VARIANTS:
        model = get_peft_model(make(), PACEConfig(r=3, variant=variant, modules_to_save=HEAD)).eval()
        assert torch.equal(logits(model, x), ref), variant


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_the_official_formulas(variant, bias):
    """lora_mul_vpt_add: W0 ⊙ (1 + A B), W0 (P q) + b0 ⊙ (1 + δb); lora_add: W0 + A B, b0 + b_lora (its own bias);
    vpt_add: W0, b0 + W0 (P q) (no b0 ⊙ δb term). Eval, merged and the noisy branch at σ = 0 all agree."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4, bias=bias)
    layer = PACELinear(lin, "default", PACEConfig(r=2, variant=variant, init_weights=False)).eval()
    x = torch.randn(3, 5)
    w0, b0 = lin.weight.detach().clone(), torch.zeros(4) if not bias else lin.bias.detach().clone()
    p = {name: getattr(layer, name)["default"].detach() for name in layer.adapter_layer_names
         if "default" in getattr(layer, name)}
    if variant == "lora_mul_vpt_add":
        assert set(p) == {"pace_A", "pace_B", "pace_P", "pace_q", "pace_bias_scale"}
        w = w0 * (1 + p["pace_A"] @ p["pace_B"])
        b = w0 @ (p["pace_P"] @ p["pace_q"]) + b0 * (1 + p["pace_bias_scale"])
    elif variant == "lora_add":
        assert set(p) == {"pace_A", "pace_B", "pace_lora_bias"}
        w = w0 + p["pace_A"] @ p["pace_B"]
        b = b0 + p["pace_lora_bias"]
    else:
        assert set(p) == {"pace_P", "pace_q"}
        w = w0
        b = b0 + w0 @ (p["pace_P"] @ p["pace_q"])
    expected = x @ w.T + b
    torch.testing.assert_close(layer(x), expected)
    layer.train()  # the separate base + branch path (σ = 0 for a layer built alone)
    layer.sigma["default"] = 1e-30
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    layer.eval()
    layer.merge()
    torch.testing.assert_close(lin.weight.detach(), w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lin.bias.detach(), b, atol=1e-6, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(lin.weight, w0) and (lin.bias is None) == (not bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_init_shapes_and_bounds(variant):
    """As the official code: A (out × r) = 0, B (r × in) Xavier; P (in × r) = 0, q Xavier as (r × 1); δb = b_lora = 0."""
    r, in_f, out_f = 200, 6, 5
    torch.manual_seed(0)
    layer = PACELinear(nn.Linear(in_f, out_f), "default", PACEConfig(r=r, variant=variant))
    if variant != "vpt_add":
        assert torch.count_nonzero(layer.pace_A["default"]) == 0
        assert layer.pace_B["default"].abs().max() <= math.sqrt(6 / (in_f + r))
    if variant != "lora_add":
        assert torch.count_nonzero(layer.pace_P["default"]) == 0
        q, bound = layer.pace_q["default"].detach(), math.sqrt(6 / (1 + r))
        assert q.shape == (r,) and q.abs().max() <= bound and q.abs().max() > 0.9 * bound
    for name in ("pace_bias_scale", "pace_lora_bias"):
        if "default" in getattr(layer, name):
            assert torch.count_nonzero(getattr(layer, name)["default"]) == 0
    trainable = {n.split(".")[0] for n, p in layer.named_parameters() if p.requires_grad}
    assert ("pace_lora_bias" in trainable) == (variant == "lora_add")
    assert ("pace_bias_scale" in trainable) == (variant == "lora_mul_vpt_add")


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_exact(tiny, variant):
    make, inputs, _ = tiny
    model = get_peft_model(make(), PACEConfig(r=2, variant=variant, init_weights=False, modules_to_save=HEAD))
    assert_merge_roundtrip(model, inputs())


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_and_unload_and_save_load(tiny, variant, tmp_path):
    make, inputs, _ = tiny
    x = inputs()
    model = get_peft_model(make(), PACEConfig(r=2, variant=variant, init_weights=False, modules_to_save=HEAD)).eval()
    out = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert torch.equal(logits(loaded, x), out)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PACELinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), out, atol=1e-5, rtol=1e-4)


def test_eval_deterministic_training_noisy(tiny):
    make, inputs, _ = tiny
    x = inputs()
    model = get_peft_model(no_dropout(make()), PACEConfig(r=2, init_weights=False, modules_to_save=HEAD))
    model.eval()
    assert torch.equal(logits(model, x), logits(model, x))
    model.train()
    assert not torch.allclose(logits(model, x), logits(model, x))
    with model.base_model.noise_disabled():
        a, b = logits(model, x), logits(model, x)
    assert torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(a, logits(model, x))  # noise off in training == eval


def test_noise_only_on_adapter_branch():
    """With ΔW = 0 (identity init) the noise multiplies a zero branch: the encoder output is the base's."""
    x = vit_inputs()
    base = no_dropout(make_tiny_vit())
    ref = base.vit(**x).last_hidden_state
    model = get_peft_model(no_dropout(make_tiny_vit()), PACEConfig(r=2, sigma=2.0, modules_to_save=HEAD)).train()
    torch.testing.assert_close(model.base_model.model.vit(**x).last_hidden_state, ref)


def test_duplicated_batch_gets_independent_noise():
    x = vit_inputs()["pixel_values"]
    model = get_peft_model(no_dropout(make_tiny_vit()), PACEConfig(r=2, init_weights=False, noise_head=False))
    model.train()
    out = model(pixel_values=torch.cat([x, x])).logits
    first, second = out.chunk(2)
    assert not torch.allclose(first, second)
    model.eval()
    first, second = model(pixel_values=torch.cat([x, x])).logits.chunk(2)
    torch.testing.assert_close(first, second)


def test_noise_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    for shape, constant_over_tokens in (("BC", True), ("BTC", False)):
        config = PACEConfig(r=2, variant="lora_add", noise_shape=shape, init_weights=False)
        layer = PACELinear(nn.Linear(4, 3), "default", config, sigma=1.0).train()
        branch = layer(x) - layer.base_layer(x)
        clean = nn.functional.linear(x, layer.get_delta_weight("default"), layer.pace_lora_bias["default"])
        ratio = branch / clean  # z per element
        spread = (ratio - ratio[:, :1]).abs().max()
        assert (spread < 1e-4) == constant_over_tokens, shape


def test_depth_schedule_on_12_blocks():
    model = make_tiny_bert(layers=12)
    peft_model = get_peft_model(model, PACEConfig(r=1, sigma=1.2, modules_to_save=HEAD))
    sigmas = peft_model.base_model.sigmas()
    by_block = {}
    for name, value in sigmas.items():
        if ".layer." in name:
            by_block.setdefault(int(name.split(".layer.")[1].split(".")[0]), set()).add(round(value, 9))
    assert all(len(values) == 1 for values in by_block.values())  # one σ per block
    sigma = {i: values.pop() for i, values in by_block.items()}
    assert sigma[0] == 0.0
    assert sigma[1] == pytest.approx(1.2)
    assert sigma[11] == pytest.approx(2 * 1.2 / 12)
    for i in range(1, 12):
        assert sigma[i] == pytest.approx(1.2 * (12 - i + 1) / 12)
    assert sigmas["classifier"] == pytest.approx(1.2 / 12)
    assert depth_sigma(1.0, 0, 12, "linear", True) == 1.0
    assert depth_sigma(1.0, 5, 12, "constant", False) == 1.0


def test_head_logits_are_noised_in_training():
    x = vit_inputs()
    model = get_peft_model(no_dropout(make_tiny_vit()), PACEConfig(r=2, sigma=1.0, modules_to_save=HEAD)).train()
    # identity adapters: only the head's multiplicative noise remains
    assert not torch.allclose(model(**x).logits, model(**x).logits)
    with model.disable_adapter():
        assert torch.equal(model(**x).logits, model(**x).logits)
    silent = get_peft_model(no_dropout(make_tiny_vit()), PACEConfig(r=2, noise_head=False, modules_to_save=HEAD))
    silent.train()
    assert torch.equal(silent(**x).logits, silent(**x).logits)


def test_gradient_reaches_only_trainable_parameters(tiny):
    make, inputs, _ = tiny
    model = get_peft_model(make(), PACEConfig(r=2, modules_to_save=HEAD))
    assert_gradients_only_on_trainable(model, inputs(), ("pace_", "classifier.modules_to_save"))


def test_multiple_adapters_set_disable_delete(tiny):
    make, inputs, _ = tiny
    x = inputs()
    ref = logits(make(), x)
    model = get_peft_model(make(), PACEConfig(r=2, init_weights=False))
    model.add_adapter("second", PACEConfig(r=3, variant="lora_add", init_weights=False))
    model.eval()
    out_default = logits(model, x)
    model.set_adapter("second")
    out_second = logits(model, x)
    assert not torch.allclose(out_default, out_second)
    assert all(".second" in n for n, p in model.named_parameters() if p.requires_grad)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, x), ref)
    model.base_model.set_adapter(["default", "second"])
    assert_merge_roundtrip(model, x)
    model.base_model.set_adapter("second")
    model.delete_adapter("default")
    assert not any(".default" in n for n, _ in model.named_parameters() if "pace_" in n)
    torch.testing.assert_close(logits(model, x), out_second)


def test_bf16_forward_and_merge():
    """Stated tolerance: bf16 merged vs unmerged logits within 0.05."""
    model = get_peft_model(make_tiny_vit().to(torch.bfloat16), PACEConfig(r=2, init_weights=False)).eval()
    x = {"pixel_values": vit_inputs()["pixel_values"].to(torch.bfloat16)}
    out = logits(model, x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.merge_adapter()
    assert (logits(model, x).float() - out.float()).abs().max() <= 0.05


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"variant": "lora_div"}, "unknown variant"),
        ({"noise_shape": "TC"}, "unknown noise_shape"),
        ({"noise_schedule": "cosine"}, "unknown noise_schedule"),
        ({"r": 0}, "positive integer"),
        ({"sigma": -0.5}, "sigma"),
        ({"sigma": float("nan")}, "`sigma` must be a finite number"),
        ({"sigma": float("inf")}, "`sigma` must be a finite number"),
        ({"sigma": float("-inf")}, "`sigma` must be a finite number"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PACEConfig(**kwargs)


@pytest.mark.parametrize("make,targets,match", [
    (make_tiny_vit, ["layernorm_before"], "PACE adapts nn.Linear"),
    (make_tiny_bert, ["LayerNorm"], "PACE adapts nn.Linear"),
    (make_tiny_bert, ["no_such_module"], "not found"),
])
def test_bad_targets(make, targets, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(make(), PACEConfig(target_modules=targets))


def test_explicit_missing_head_is_an_error():
    model = get_peft_model(make_tiny_vit(), PACEConfig(head_modules=["score"])).train()
    with pytest.raises(ValueError, match="head_modules"):
        model(**vit_inputs())


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_unloaded_model_carries_no_noise(how):
    """The plain model returned by merge_and_unload / unload keeps no PACE hook: no head noise in training."""
    x = vit_inputs()
    model = get_peft_model(no_dropout(make_tiny_vit()), PACEConfig(r=2, modules_to_save=HEAD)).train()
    model(**x)  # installs the head hook
    plain = getattr(model, how)().train()
    assert not plain._forward_pre_hooks and not plain.classifier._forward_hooks
    assert torch.equal(plain(**x).logits, plain(**x).logits)


def test_deepcopy_and_pickle():
    x = vit_inputs()
    model = get_peft_model(no_dropout(make_tiny_vit()), PACEConfig(r=2, init_weights=False, modules_to_save=HEAD))
    pickle.loads(pickle.dumps(model))
    copied = copy.deepcopy(model).train()
    copied(**x)
    assert not model.base_model.model.classifier._forward_hooks  # the copy hooked its own head, not the original's
    with copied.base_model.noise_disabled():
        assert torch.equal(copied(**x).logits, copied(**x).logits)


class Blocks(nn.Module):
    """A model without a transformers config: B comes from the targeted modules' block indices."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(4))
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block["fc"](x)
        return self.out(x)


def test_block_count_fallback_and_missing_head_warns_once():
    model = get_peft_model(Blocks(), PACEConfig(r=2, sigma=2.0, target_modules=["fc", "out"], init_weights=False))
    sigmas = model.base_model.sigmas()
    assert sigmas["blocks.0.fc"] == 0.0 and sigmas["blocks.1.fc"] == pytest.approx(2.0)
    assert sigmas["blocks.3.fc"] == pytest.approx(2.0 * 2 / 4)  # B = 4
    assert sigmas["out"] == pytest.approx(2.0)  # outside any block: σ
    model.train()
    with pytest.warns(UserWarning, match="no head module") as record:
        model(torch.randn(3, 4))
        model(torch.randn(3, 4))
    assert sum("no head module" in str(w.message) for w in record) == 1


def test_new_layers_take_the_training_flag_of_their_target():
    """A layer (and the head noise) added to a model in eval mode stays in eval mode: no noise, merged == unmerged."""
    x = vit_inputs()
    model = get_peft_model(make_tiny_vit(), PACEConfig(r=2, target_modules=["q_proj"], init_weights=False,
                                                       modules_to_save=HEAD))  # the tiny ViT comes in eval mode
    assert not any(m.training for m in model.modules() if isinstance(m, PACELinear))
    assert torch.equal(logits(model, x), logits(model, x))  # no layer noise, no head noise
    model.eval()
    model.add_adapter("second", PACEConfig(r=2, target_modules=["fc1"], init_weights=False, modules_to_save=HEAD))
    model.set_adapter("second")
    added = [m for n, m in model.named_modules() if isinstance(m, PACELinear) and n.endswith("fc1")]
    assert added and not any(m.training for m in added)
    unmerged = logits(model, x)  # no .eval() call after add_adapter
    assert torch.equal(logits(model, x), unmerged)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-4)
    # a target in train mode gives a layer in train mode
    trained = get_peft_model(make_tiny_vit().train(), PACEConfig(r=2, init_weights=False))
    assert all(m.training for m in trained.modules() if isinstance(m, PACELinear))


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_base_with_float32_adapters(variant):
    """PEFT's default autocast_adapter_dtype=True keeps the adapters in float32 on a bf16 base: forward (eval and the
    noisy training path) and merge must mix the dtypes consistently (weight and bias end in one dtype)."""
    model = get_peft_model(no_dropout(make_tiny_vit()).to(torch.bfloat16),
                           PACEConfig(r=2, variant=variant, init_weights=False, modules_to_save=HEAD))
    layer = next(m for m in model.modules() if isinstance(m, PACELinear))
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if "pace_" in n)
    x = {"pixel_values": vit_inputs()["pixel_values"].to(torch.bfloat16)}
    out = logits(model.eval(), x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    weight, bias = layer.composed_weight_and_bias()
    assert weight.dtype == bias.dtype == torch.float32
    model.train()
    assert torch.isfinite(model(**x).logits).all()
    model.eval()
    model.merge_adapter()
    assert layer.get_base_layer().weight.dtype == layer.get_base_layer().bias.dtype == torch.bfloat16
    assert (logits(model, x).float() - out.float()).abs().max() <= 0.05
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert (logits(merged, x).float() - out.float()).abs().max() <= 0.05
