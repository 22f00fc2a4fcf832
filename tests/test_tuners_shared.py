"""The machinery shared by the RLRR and PACE tuners (tuners_utils: ComposedWeightLayer, ComposedWeightTuner)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from conftest import make_tiny_bert
from peft import get_peft_model
from torch import nn

from peft_tsrs import PACEConfig, PACEModel, RLRRConfig, RLRRModel
from peft_tsrs.tuners.defaults import DEFAULT_HEAD_MODULES, LINEAR_TARGETS
from peft_tsrs.tuners.pace import Linear as PACELinear
from peft_tsrs.tuners.rlrr import Linear as RLRRLinear
from peft_tsrs.tuners.rlrr import ScaleShift
from peft_tsrs.tuners.tuners_utils import ComposedWeightLayer, ComposedWeightTuner


def test_compose_is_abstract():
    assert inspect.isabstract(ComposedWeightLayer)
    assert ComposedWeightLayer.__abstractmethods__ == frozenset({"compose"})


@pytest.mark.parametrize("module_first", [True, False])
def test_a_layer_without_compose_cannot_be_instantiated(module_first):
    # nn.Module is not an ABC; mixed with the layer (either base order) the class must still refuse to instantiate.
    class NoCompose(ComposedWeightLayer):
        adapter_layer_names = ("x",)

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self._init_composed(nn.Linear(2, 2))

    bases = (nn.Module, NoCompose) if module_first else (NoCompose, nn.Module)
    cls = type("NoComposeLinear", bases, {})
    with pytest.raises(TypeError, match=r"abstract.*compose"):
        cls()

    class WithCompose(cls):
        def compose(self, weight, bias, adapter_names):
            return weight, bias

    assert isinstance(WithCompose(), ComposedWeightLayer)


@pytest.mark.parametrize("cls", [RLRRLinear, ScaleShift, PACELinear])
def test_shipped_layers_implement_compose(cls):
    assert not inspect.isabstract(cls)


# ---------------------------------------------------------------------- update_layer(adapter_name, config, ...)
# References computed from the documented initializations, drawing from the generator in the layer's order.
def _uniform(shape: tuple[int, int], bound: float) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound)


def _kaiming_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """Kaiming-uniform: gain √(2 / (1 + a²)), bound √3 · gain / √fan_in (a = √5 is nn.Linear's init; a = 0, the
    official RLRR init, gives gain √2 and bound √(6 / fan_in))."""
    gain = math.sqrt(2.0 / (1 + a**2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    """Xavier-uniform: bound √3 · √(2 / (fan_in + fan_out))."""
    return math.sqrt(3.0) * (1.0 * math.sqrt(2.0 / float(fan_in + fan_out)))


def rlrr_reference(out_f: int, in_f: int, r: int, init_mode: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    a = 0.0 if init_mode == "kaiming" else math.sqrt(5)
    R = _uniform((r, in_f), _kaiming_bound(in_f, a))
    shift = torch.zeros(out_f)
    if init_mode == "identity":
        L = torch.zeros(out_f, r)
    elif init_mode == "kaiming":
        L = _uniform((out_f, r), _kaiming_bound(r, a))
    else:
        L = torch.empty(out_f, r).normal_(0.0, 0.5)
        shift = torch.empty(out_f).normal_(0.0, 0.02)
    return {"rlrr_L": L, "rlrr_R": R, "rlrr_shift": shift}


def pace_reference(out_f: int, in_f: int, r: int, variant: str, init_weights: bool, seed: int
                   ) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    lora, vpt = variant in ("lora_mul_vpt_add", "lora_add"), variant in ("lora_mul_vpt_add", "vpt_add")
    ref = {}
    if lora:
        ref["pace_B"] = _uniform((r, in_f), _xavier_bound(in_f, r))  # (r, in): fan_in = in, fan_out = r
    if vpt:
        ref["pace_q"] = _uniform((r, 1), _xavier_bound(1, r)).reshape(r)  # official (r, 1): fan_in 1, fan_out r

    def zeros_or_normal(shape, std):
        return torch.zeros(shape) if init_weights else torch.empty(shape).normal_(0.0, std)

    if lora:
        ref["pace_A"] = zeros_or_normal((out_f, r), 0.5 / math.sqrt(r))
    if vpt:
        ref["pace_P"] = zeros_or_normal((in_f, r), 0.5 / math.sqrt(r))
    if variant == "lora_mul_vpt_add":
        ref["pace_bias_scale"] = zeros_or_normal((out_f,), 0.1)
    if variant == "lora_add":
        ref["pace_lora_bias"] = zeros_or_normal((out_f,), 0.1)
    return ref


def adapter_tensors(layer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name)[adapter].detach() for name in layer.adapter_layer_names
            if adapter in getattr(layer, name)}


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("init_weights", [True, "kaiming", False])
@pytest.mark.parametrize("r", [1, 3])
def test_rlrr_update_layer_reads_the_config(init_weights, r):
    config = RLRRConfig(r=r, init_weights=init_weights)
    base = nn.Linear(6, 5)
    torch.manual_seed(11)
    layer = RLRRLinear(base, "default", config)
    assert layer.r == {"default": r}
    assert_same_tensors(adapter_tensors(layer, "default"), rlrr_reference(5, 6, r, config.init_mode, seed=11))
    # a second adapter on the existing layer: the same tensors as a fresh layer from the same seed
    torch.manual_seed(11)
    layer.update_layer("other", config)
    assert_same_tensors(adapter_tensors(layer, "other"), rlrr_reference(5, 6, r, config.init_mode, seed=11))
    assert layer.r == {"default": r, "other": r}


@pytest.mark.parametrize("init_weights", [True, "kaiming", False])
def test_ssf_update_layer_reads_the_config(init_weights):
    config = RLRRConfig(init_weights=init_weights, ssf=True)
    torch.manual_seed(12)
    layer = ScaleShift(nn.LayerNorm(7), "default", config)
    torch.manual_seed(12)
    scale, shift = torch.ones(7), torch.zeros(7)
    if config.init_mode != "identity":
        std = 0.02 if config.init_mode == "kaiming" else 0.2
        scale.normal_(1.0, std)
        shift.normal_(0.0, std)
    assert_same_tensors(adapter_tensors(layer, "default"), {"rlrr_ssf_scale": scale, "rlrr_ssf_shift": shift})


@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("variant", ["lora_mul_vpt_add", "lora_add", "vpt_add"])
def test_pace_update_layer_reads_the_config_and_takes_sigma_explicitly(variant, init_weights):
    config = PACEConfig(r=2, variant=variant, sigma=1.5, noise_shape="BTC", init_weights=init_weights)
    base = nn.Linear(6, 4)
    torch.manual_seed(13)
    layer = PACELinear(base, "default", config, sigma=0.25)
    expected = pace_reference(4, 6, 2, variant, init_weights, seed=13)
    assert_same_tensors(adapter_tensors(layer, "default"), expected)
    # sigma is the per-module value passed in, not config.sigma; the rest comes from the config
    assert layer.sigma == {"default": 0.25}
    assert (layer.r, layer.variant, layer.noise_shape) == ({"default": 2}, {"default": variant}, {"default": "BTC"})
    torch.manual_seed(13)
    layer.update_layer("other", config, sigma=0.5)
    assert_same_tensors(adapter_tensors(layer, "other"), expected)
    assert layer.sigma["other"] == 0.5


def test_pace_layer_built_alone_defaults_to_no_noise():
    layer = PACELinear(nn.Linear(3, 2), "default", PACEConfig(sigma=1.0))
    assert layer.sigma == {"default": 0.0}


@pytest.mark.parametrize("inference_mode", [False, True])
def test_update_layer_takes_inference_mode_from_the_config(inference_mode):
    rlrr = RLRRLinear(nn.Linear(3, 2), "default", RLRRConfig(inference_mode=inference_mode))
    pace = PACELinear(nn.Linear(3, 2), "default", PACEConfig(inference_mode=inference_mode))
    for layer in (rlrr, pace):
        assert all(p.requires_grad != inference_mode for n, p in layer.named_parameters() if "base_layer" not in n)


def test_the_old_unpacked_signatures_fail_loudly():
    with pytest.raises(TypeError):
        RLRRLinear(nn.Linear(3, 2), "default", r=2, init_mode="random")  # no config
    layer = PACELinear(nn.Linear(3, 2), "default", PACEConfig())
    with pytest.raises(TypeError):
        layer.update_layer("other", 2, "lora_add", 0.5, "BC")


# ---------------------------------------------------------------------- default target modules
@pytest.mark.parametrize("model_cls", [RLRRModel, PACEModel])
def test_both_tuners_resolve_default_targets_the_same_way(model_cls):
    assert issubclass(model_cls, ComposedWeightTuner)
    assert model_cls.target_module_mapping is LINEAR_TARGETS
    # PACE uses the shared resolution as is; RLRR extends it (super() first, then its SSF defaults)
    assert PACEModel._prepare_adapter_config is ComposedWeightTuner._prepare_adapter_config


@pytest.mark.parametrize("config_cls", [RLRRConfig, PACEConfig])
def test_default_targets_come_from_target_module_mapping(config_cls, monkeypatch):
    model_cls = {RLRRConfig: RLRRModel, PACEConfig: PACEModel}[config_cls]
    monkeypatch.setattr(model_cls, "target_module_mapping", {"bert": ["query"]})
    model = get_peft_model(make_tiny_bert(), config_cls())
    assert model.peft_config["default"].target_modules == {"query"}
    assert all(n.endswith(".query") for n in model.base_model.targeted_module_names)


@pytest.mark.parametrize("config_cls,method", [(RLRRConfig, "RLRR"), (PACEConfig, "PACE")])
def test_unknown_model_type_error_names_the_method_and_the_known_types(config_cls, method):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"^{method}: no default `target_modules` for model type 'custom' "
                                         rf"\(known: .*bert.*vit.*\)\. Pass `target_modules` explicitly"):
        get_peft_model(model, config_cls())


def test_rlrr_ssf_defaults_still_resolved_after_the_shared_targets():
    model = get_peft_model(make_tiny_bert(), RLRRConfig(ssf=True))
    config = model.peft_config["default"]
    assert config.target_modules == set(LINEAR_TARGETS["bert"])
    assert config.ssf_modules == {"LayerNorm"}


# ---------------------------------------------------------------------- default head
def test_pace_default_head_is_the_shared_constant():
    assert DEFAULT_HEAD_MODULES == ("classifier", "score")
    heads = PACEConfig().heads
    assert heads == list(DEFAULT_HEAD_MODULES)
    heads.append("head")  # a fresh list each time: the default cannot be changed through it
    assert PACEConfig().heads == ["classifier", "score"]
    assert PACEConfig(head_modules=["score"]).heads == ["score"]


# ---------------------------------------------------------------------- non-finite floats
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("config_cls", [RLRRConfig, PACEConfig])
def test_any_float_field_refuses_non_finite_values(config_cls, value):
    """The check covers every float field of the configs (today PACE's sigma; a field added later is covered too)."""

    @dataclasses.dataclass
    class WithFloat(config_cls):
        alpha: float = 1.0

    with pytest.raises(ValueError, match=rf"{config_cls.__name__}: `alpha` must be a finite number, got {value!r}"):
        WithFloat(alpha=value)
    assert WithFloat(alpha=0.5).alpha == 0.5


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_sigma_in_adapter_config_json_is_refused(tmp_path, value):
    PACEConfig().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"sigma": 1.0', f'"sigma": {value}'))
    with pytest.raises(ValueError, match="`sigma` must be a finite number"):
        PACEConfig.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------- heads without a weight of their own
def make_tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=3, type_vocab_size=1,
                        pad_token_id=1)
    return RobertaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
@pytest.mark.parametrize("config", [RLRRConfig(ssf=True, init_weights=False), PACEConfig(init_weights=False)],
                         ids=["rlrr", "pace"])
def test_unloading_a_saved_head_without_weight(config, how):
    """RobertaClassificationHead (dense + out_proj, no `.weight`) in modules_to_save: merge_and_unload / unload give
    the plain model with the trained head (PEFT's base _replace_module raised AttributeError: no attribute 'weight')."""
    config = dataclasses.replace(config, modules_to_save=["classifier"])
    model = get_peft_model(make_tiny_roberta(), config).eval()
    head = model.base_model.model.classifier
    assert not hasattr(head.original_module, "weight")
    with torch.no_grad():
        head.modules_to_save["default"].out_proj.weight.add_(1.0)  # a trained head, differing from the original
    x = {"input_ids": torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        out = model(**x).logits
        trained_head = head.modules_to_save["default"]
        plain = getattr(model, how)()
        assert type(plain.classifier).__name__ == "RobertaClassificationHead" and plain.classifier is trained_head
        assert not any(isinstance(m, ComposedWeightLayer) for m in plain.modules())
        if how == "merge_and_unload":
            torch.testing.assert_close(plain(**x).logits, out, atol=1e-5, rtol=1e-4)
        else:  # the adapters are gone, the trained head stays (as PEFT's unload does with modules_to_save)
            reference = make_tiny_roberta()
            reference.classifier = trained_head
            torch.testing.assert_close(plain(**x).logits, reference(**x).logits)


# ---------------------------------------------------------------------- a failed injection is undone
@pytest.mark.parametrize("config_cls", [RLRRConfig, PACEConfig])
def test_injection_failing_part_way_leaves_the_model_as_it_was(config_cls):
    """`vit.layernorm` is met after the q_proj layers were replaced: the error must not leave them injected."""
    from conftest import make_tiny_vit, vit_inputs

    base = make_tiny_vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="adapts nn.Linear"):
        get_peft_model(base, config_cls(target_modules=["q_proj", "layernorm"]))
    assert not any(isinstance(m, ComposedWeightLayer) for m in base.modules())
    assert list(base.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

    # add_adapter on a PeftModel: existing layers lose the half-added adapter, new layers are unwrapped again
    model = get_peft_model(make_tiny_vit(), config_cls(target_modules=["q_proj"], init_weights=False)).eval()
    x = vit_inputs()
    with torch.no_grad():
        out = model(**x).logits
    layers = {n for n, m in model.named_modules() if isinstance(m, ComposedWeightLayer)}
    with pytest.raises(ValueError, match="adapts nn.Linear"):
        model.add_adapter("second", config_cls(target_modules=["q_proj", "fc1", "layernorm"]))
    assert {n for n, m in model.named_modules() if isinstance(m, ComposedWeightLayer)} == layers
    assert all(m.available_adapters() == {"default"} for m in model.modules() if isinstance(m, ComposedWeightLayer))
    assert "second" not in model.peft_config
    with torch.no_grad():
        assert torch.equal(model(**x).logits, out)
