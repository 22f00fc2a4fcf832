"""transformers' own adapter API (``PeftAdapterMixin``: ``model.add_adapter``, ``set_adapter``, ``enable_adapters`` /
``disable_adapters``, ``active_adapters``, ``get_adapter_state_dict``, ``save_pretrained``, ``load_adapter``,
``from_pretrained`` of an adapter folder, ``delete_adapter``) with RLRR, PACE and LoRA on the pinned
transformers / peft (transformers 5.25 gates that API on peft >= 0.22; ``peft_tsrs.registration`` bridges it)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
import transformers.integrations.peft as hf_peft
from conftest import make_tiny_bert, make_tiny_vit
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from tuner_checks import logits

from peft_tsrs import PACEConfig, RLRRConfig, registration
from peft_tsrs.tuners.pace.layer import PACELayer
from peft_tsrs.tuners.rlrr.layer import RLRRLayer

MODELS = {"bert": make_tiny_bert, "vit": make_tiny_vit}
# name -> (config factory, adapter layer class, parameter prefix)
METHODS = {
    "rlrr": (lambda **kw: RLRRConfig(**kw), RLRRLayer, "rlrr_"),
    "pace": (lambda **kw: PACEConfig(r=3, **kw), PACELayer, "pace_"),
}


def inputs_for(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(4, 1, 8, 8, generator=g)}
    ids = torch.randint(1, 50, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=[(k, m) for k in sorted(MODELS) for m in sorted(METHODS)], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    kind, method = request.param
    make_config, layer_cls, prefix = METHODS[method]
    return MODELS[kind], inputs_for(kind), make_config, layer_cls, prefix


def adapter_params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if prefix in n}


# --- the shim ---------------------------------------------------------------------------------------------------


def test_gate_is_lowered_for_the_installed_peft():
    installed = importlib.metadata.version("peft")
    assert hf_peft.MIN_PEFT_VERSION == installed, "import peft_tsrs should have lowered transformers' peft gate"


def test_without_the_shim_add_adapter_is_refused_and_the_shim_restores_it(monkeypatch):
    """The root cause, pinned down: transformers' own version gate (not a missing peft API) refuses add_adapter,
    for LoRA as for RLRR; install_transformers_compat lowers it, once."""
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "0.22.0")
    for config in (RLRRConfig(), LoraConfig(target_modules=["query", "value"])):
        with pytest.raises(ValueError, match=r"version of PEFT .* not compatible, please use a version >= 0.22.0"):
            make_tiny_bert().add_adapter(config)
    assert registration.install_transformers_compat() is True
    assert hf_peft.MIN_PEFT_VERSION == importlib.metadata.version("peft")
    assert registration.install_transformers_compat() is False  # idempotent: nothing left to do
    make_tiny_bert().add_adapter(RLRRConfig())


def test_shim_leaves_a_gate_it_was_not_tested_across(monkeypatch):
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "0.23.0")  # a future transformers may need a real 0.23 API
    assert registration.install_transformers_compat() is False
    assert hf_peft.MIN_PEFT_VERSION == "0.23.0"


def test_shim_leaves_the_gate_when_the_peft_api_is_missing(monkeypatch):
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "0.22.0")
    api = (*registration.TRANSFORMERS_PEFT_API, ("peft.functional", "a_function_peft_does_not_have"))
    monkeypatch.setattr(registration, "TRANSFORMERS_PEFT_API", api)
    assert registration.install_transformers_compat() is False
    assert hf_peft.MIN_PEFT_VERSION == "0.22.0"


# --- the adapter API with RLRR and PACE on BERT and ViT ---------------------------------------------------------


def test_add_adapter_injects_changes_outputs_and_disables(case):
    make, x, make_config, layer_cls, prefix = case
    model = make()
    base = logits(model, x)
    model.add_adapter(make_config(init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, layer_cls)]
    assert layers and all(m.active_adapters == ["default"] for m in layers)
    assert model.active_adapters() == ["default"]
    adapted = logits(model, x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    model.disable_adapters()
    assert torch.equal(logits(model, x), base)
    model.enable_adapters()
    assert torch.equal(logits(model, x), adapted)


def test_identity_init_starts_at_the_base_model(case):
    make, x, make_config, _, _ = case
    model = make()
    base = logits(model, x)
    model.add_adapter(make_config())
    assert torch.equal(logits(model, x), base)


def test_only_adapter_parameters_are_trainable(case):
    make, x, make_config, _, prefix = case
    model = make()
    model.add_adapter(make_config(init_weights=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(prefix in n for n in trainable), trainable
    model.train()
    model(**x).logits.square().sum().backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert sorted(with_grad) == sorted(trainable)


def test_get_adapter_state_dict_holds_only_the_adapter(case):
    make, _, make_config, _, prefix = case
    model = make()
    model.add_adapter(make_config(init_weights=False))
    state = model.get_adapter_state_dict()
    assert state and all(prefix in k and ".default" not in k for k in state)
    assert len(state) == len(adapter_params(model, prefix))


def test_save_pretrained_then_load_adapter_on_a_fresh_model(case, tmp_path):
    make, x, make_config, _, prefix = case
    model = make()
    model.add_adapter(make_config(init_weights=False))
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = make()
    torch.manual_seed(1234)  # a loader that left the fresh random adapter in place would give other logits
    fresh.load_adapter(tmp_path)
    assert torch.equal(logits(fresh, x), expected)
    saved = adapter_params(model, prefix)
    loaded = adapter_params(fresh, prefix)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not any(p.requires_grad for p in fresh.parameters())  # load_adapter(is_trainable=False): inference

    # the folder is a regular PEFT adapter folder too
    assert torch.equal(logits(PeftModel.from_pretrained(make(), tmp_path).eval(), x), expected)


def test_load_adapter_of_a_peft_model_folder(case, tmp_path):
    """The other direction: a folder written by PeftModel.save_pretrained loads through transformers."""
    from peft import get_peft_model

    make, x, make_config, _, _ = case
    peft_model = get_peft_model(make(), make_config(init_weights=False)).eval()
    expected = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    fresh = make()
    fresh.load_adapter(tmp_path, is_trainable=True)
    assert torch.equal(logits(fresh.eval(), x), expected)
    assert any(p.requires_grad for p in fresh.parameters())


def test_from_pretrained_of_an_adapter_folder(case, tmp_path):
    """transformers resolves the base model from adapter_config.json and loads the adapter on it."""
    make, x, make_config, layer_cls, _ = case
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make().save_pretrained(base_dir)
    model_cls = type(make())
    model = model_cls.from_pretrained(base_dir).eval()
    model.add_adapter(make_config(init_weights=False))
    expected = logits(model, x)
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    loaded = model_cls.from_pretrained(adapter_dir).eval()
    assert any(isinstance(m, layer_cls) for m in loaded.modules())
    assert torch.equal(logits(loaded, x), expected)


def _two_adapters(case):
    """A model with adapters "a" (seed 10) then "b" (seed 20; add_adapter activates it) and "a"'s output."""
    make, x, make_config, _, _ = case
    model = make()
    torch.manual_seed(10)
    model.add_adapter(make_config(init_weights=False), adapter_name="a")
    out_a = logits(model, x)
    torch.manual_seed(20)
    model.add_adapter(make_config(init_weights=False), adapter_name="b")
    return model, out_a


def test_set_adapter_switches_between_two_adapters(case):
    _, x, _, layer_cls, _ = case
    model, out_a = _two_adapters(case)
    assert model.active_adapters() == ["b"]
    out_b = logits(model, x)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    model.set_adapter("a")
    assert model.active_adapters() == ["a"]
    assert all(m.active_adapters == ["a"] for m in model.modules() if isinstance(m, layer_cls))
    assert torch.equal(logits(model, x), out_a)
    model.set_adapter("b")
    assert torch.equal(logits(model, x), out_b)


def test_delete_adapter(case):
    _, x, _, _, prefix = case
    model, out_a = _two_adapters(case)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"]
    assert not [n for n in adapter_params(model, prefix) if n.endswith(".b")]
    model.set_adapter("a")
    assert torch.equal(logits(model, x), out_a)


def test_modules_to_save_head_round_trip(tmp_path):
    """The usual classification recipe (adapter + trained head) through add_adapter, save and load_adapter."""
    x = inputs_for("bert")
    model = make_tiny_bert()
    model.add_adapter(RLRRConfig(init_weights=False, modules_to_save=["classifier"]))
    assert any(p.requires_grad for n, p in model.named_parameters() if "classifier" in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "classifier" in n and p.requires_grad:
                p.add_(0.5)  # a trained head, unlike the fresh model's
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    fresh = make_tiny_bert()
    fresh.load_adapter(tmp_path)
    assert torch.equal(logits(fresh, x), expected)


def test_saving_twice_into_one_folder_still_loads_with_peft(tmp_path):
    """transformers writes adapter_config.json before the weights: a content hash of the file already there (the
    previous save's) made the folder look corrupted to PeftModel.from_pretrained."""
    x = inputs_for("vit")
    model = make_tiny_vit()
    model.add_adapter(RLRRConfig(init_weights=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "rlrr_" in n:
                p.add_(0.1)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(make_tiny_vit(), tmp_path).eval(), x), expected)
    fresh = make_tiny_vit()
    fresh.load_adapter(tmp_path)
    assert torch.equal(logits(fresh, x), expected)


def test_lora_through_add_adapter(tmp_path):
    """Plain LoRA was refused by the same gate; it works too."""
    x = inputs_for("bert")
    model = make_tiny_bert()
    base = logits(model, x)
    model.add_adapter(LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    assert any(isinstance(m, BaseTunerLayer) for m in model.modules())
    expected = logits(model, x)
    assert not torch.allclose(expected, base, atol=1e-4)
    model.save_pretrained(tmp_path)
    fresh = make_tiny_bert()
    fresh.load_adapter(tmp_path)
    assert torch.equal(logits(fresh, x), expected)


# --- PACE's head noise (model-level state) through the tuner-less transformers API -------------------------------


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _train_logits(model, x):
    model.train()
    with torch.no_grad():
        return model(**x).logits


def test_pace_head_noise_follows_disable_adapters():
    """Identity init: the layers' branches are 0, only the head's logits are noised in training. With the adapters
    disabled through transformers the model is the base model (the head was still noised)."""
    x = inputs_for("bert")
    model = _no_dropout(make_tiny_bert())
    base = _train_logits(model, x)
    model.add_adapter(PACEConfig(r=3, sigma=1.0))
    assert not torch.allclose(_train_logits(model, x), base)
    model.disable_adapters()
    assert torch.equal(_train_logits(model, x), base)
    model.enable_adapters()
    assert not torch.allclose(_train_logits(model, x), base)


def test_pace_head_noise_follows_set_adapter_and_is_applied_once():
    """Each add_adapter call creates a PACE tuner; the head is hooked once and uses the adapter set_adapter chose
    (the hook of adapter "b" kept noising with b's σ after set_adapter("a"), and a second hook noised again)."""
    x = inputs_for("bert")
    model = _no_dropout(make_tiny_bert())
    base = _train_logits(model, x)
    model.add_adapter(PACEConfig(r=3, sigma=0.0), adapter_name="a")
    model.add_adapter(PACEConfig(r=3, sigma=1.0), adapter_name="b")
    assert not torch.allclose(_train_logits(model, x), base)
    assert len(model.classifier._forward_hooks) == 1  # installed at the first forward
    model.set_adapter("a")
    assert torch.equal(_train_logits(model, x), base)
    model.delete_adapter("a")  # the tuner whose hook serves the model is gone from peft_config
    model.set_adapter("b")
    assert not torch.allclose(_train_logits(model, x), base)


# --- training ----------------------------------------------------------------------------------------------------


def test_regularized_trainer_on_an_add_adapter_model(tmp_path):
    """A model with add_adapter (no PeftModel) trains with RegularizedTrainer: only the adapter moves, the
    trainer's save_model writes an adapter folder that load_adapter restores."""
    import datasets

    from peft_tsrs import RegularizedTrainer, RegularizerConfig
    from transformers import TrainingArguments

    g = torch.Generator().manual_seed(0)
    ds = datasets.Dataset.from_dict({
        "input_ids": torch.randint(1, 50, (16, 6), generator=g).tolist(),
        "attention_mask": [[1] * 6] * 16,
        "label": torch.randint(0, 3, (16,), generator=g).tolist(),
    })
    model = make_tiny_bert()
    model.add_adapter(PACEConfig(r=3, sigma=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             seed=0)
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds,
                                 regularizers=RegularizerConfig(pace_weight=0.5, pace_mode="full"))
    trainer.train()
    moved = sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))
    assert moved and all("pace_" in n for n in moved), moved
    trainer.save_model(str(tmp_path / "adapter"))
    x = inputs_for("bert")
    expected = logits(model.eval(), x)
    fresh = make_tiny_bert()
    fresh.load_adapter(str(tmp_path / "adapter"))
    assert torch.equal(logits(fresh, x), expected)
