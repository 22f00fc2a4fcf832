"""Bad input fails with an error naming what to fix, before anything is modified or written half-way.

(Other bad inputs are tested next to their feature: unknown/incompatible target modules and r <= 0 in
test_rlrr/test_pace, negative σ/λ/radius and the TSRS inject layer in test_trainer, the missing index column in
test_trainer, loading without `import peft_tsrs` in test_registration.)
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_vit
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from test_trainer import make_args, make_dataset

from peft_tsrs import PACEConfig, RLRRConfig, RegularizerConfig, RegularizedTrainer, __version__
from peft_tsrs.trainer import STATE_FILE


def _saved_adapter(tmp_path, config):
    model = get_peft_model(make_tiny_vit(), config)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("config_cls", [RLRRConfig, PACEConfig])
def test_corrupted_weights_file(tmp_path, damage, config_cls):
    folder = _saved_adapter(tmp_path, config_cls(init_weights=False))
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    base = make_tiny_vit()
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match="corrupted or truncated.*save_pretrained"):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())  # nothing injected
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_base_untouched(base, before: dict[str, torch.Tensor]) -> None:
    """No tuner layer injected, no wrapper, the same state dict (keys and values)."""
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    after = base.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _rewrite_tensor_data(weights, fill: bytes) -> None:
    """Overwrite the data section of a safetensors file, keeping its (valid) header."""
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = (fill * len(data))[: len(data) - start]
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("config_cls", [RLRRConfig, PACEConfig])
def test_corrupted_tensor_data_behind_a_valid_header(tmp_path, config_cls):
    """The header parses, the data does not match what was saved: refused before the model is touched (it loaded
    silently and gave NaN outputs)."""
    folder = _saved_adapter(tmp_path, config_cls(init_weights=False, modules_to_save=["classifier"]))
    stored = json.loads((folder / "adapter_config.json").read_text())
    assert len(stored["weights_sha256"]) == 64
    _rewrite_tensor_data(folder / "adapter_model.safetensors", b"\x00\x00\x80\x3f")  # all 1.0: finite, wrong
    base = make_tiny_vit()
    before = _state(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not match the content hash .*weights_sha256"):
        PeftModel.from_pretrained(base, folder)
    assert_base_untouched(base, before)


@pytest.mark.parametrize("saved_nan", [False, True])
def test_non_finite_weights_are_refused(tmp_path, saved_nan):
    """NaN in the tensors: damaged data in a folder without a recorded hash (written before it existed), or an
    adapter that was saved with NaN (diverged training; the hash matches)."""
    model = get_peft_model(make_tiny_vit(), RLRRConfig(init_weights=False))
    if saved_nan:
        layer = next(m for m in model.modules() if hasattr(m, "rlrr_L"))
        with torch.no_grad():
            layer.rlrr_L["default"][0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    if not saved_nan:
        stored = json.loads((tmp_path / "adapter_config.json").read_text())
        del stored["weights_sha256"]  # an older folder
        (tmp_path / "adapter_config.json").write_text(json.dumps(stored))
        _rewrite_tensor_data(tmp_path / "adapter_model.safetensors", b"\xff\xff\xff\x7f")  # NaN
    base = make_tiny_vit()
    before = _state(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors holds NaN/inf values \(tensor '.*rlrr_"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_base_untouched(base, before)


@pytest.mark.parametrize("config_cls", [RLRRConfig, PACEConfig])
def test_missing_weights_file_in_a_local_folder(tmp_path, config_cls):
    """A clear error naming the file and what to do (was an HFValidationError from a Hub lookup, after injection)."""
    folder = _saved_adapter(tmp_path, config_cls(modules_to_save=["classifier"]))
    (folder / "adapter_model.safetensors").unlink()
    base = make_tiny_vit()
    before = _state(base)
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors not found: .*save_pretrained"):
        PeftModel.from_pretrained(base, folder)
    assert_base_untouched(base, before)


def test_content_hash_round_trip_in_both_formats(tmp_path):
    """The hash is over the tensors, so it is the same for safetensors and .bin; both load."""
    model = get_peft_model(make_tiny_vit(), RLRRConfig(init_weights=False)).eval()
    x = {"pixel_values": torch.randn(2, 1, 8, 8)}
    out = model(**x).logits
    hashes = []
    for safe in (True, False):
        folder = tmp_path / str(safe)
        model.save_pretrained(folder, safe_serialization=safe)
        hashes.append(json.loads((folder / "adapter_config.json").read_text())["weights_sha256"])
        loaded = PeftModel.from_pretrained(make_tiny_vit(), folder).eval()
        assert torch.equal(loaded(**x).logits, out)
    assert hashes[0] == hashes[1] is not None
    (tmp_path / "False" / "adapter_model.bin").write_bytes(b"garbage")
    base = make_tiny_vit()
    before = _state(base)
    with pytest.raises(ValueError, match="adapter_model.bin is corrupted or truncated"):
        PeftModel.from_pretrained(base, tmp_path / "False")
    assert_base_untouched(base, before)


def test_vpt_add_adapter_of_the_earlier_parametrization_is_refused(tmp_path):
    """vpt_add once had a b0 ⊙ δb term (pace_bias_scale); loading such a folder would silently drop it."""
    from safetensors.torch import load_file, save_file

    folder = _saved_adapter(tmp_path, PACEConfig(variant="vpt_add", init_weights=False))
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("pace_q"))
    tensors[name.replace("pace_q", "pace_bias_scale")] = torch.full((16,), 0.1)
    save_file(tensors, weights)
    stored = json.loads((folder / "adapter_config.json").read_text())
    del stored["weights_sha256"]  # folders of that time had no hash
    (folder / "adapter_config.json").write_text(json.dumps(stored))
    base = make_tiny_vit()
    before = _state(base)
    with pytest.raises(ValueError, match=r"vpt_add adapter was saved by an earlier peft-tsrs .*pace_bias_scale"):
        PeftModel.from_pretrained(base, folder)
    assert_base_untouched(base, before)


def test_adapter_from_a_newer_version_is_refused(tmp_path):
    folder = _saved_adapter(tmp_path, RLRRConfig())
    stored = json.loads((folder / "adapter_config.json").read_text())
    assert stored["peft_tsrs_version"] == __version__
    stored["peft_tsrs_version"] = "99.0.0"
    (folder / "adapter_config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=r"saved by peft-tsrs 99.0.0.*pip install -U 'peft-tsrs>=99.0'"):
        PeftModel.from_pretrained(make_tiny_vit(), folder)
    stored["peft_tsrs_version"] = "banana"
    (folder / "adapter_config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="not a version"):
        PeftModel.from_pretrained(make_tiny_vit(), folder)


def test_pace_fast_resume_with_a_resized_dataset(tmp_path):
    cfg = RegularizerConfig(pace_weight=0.5, pace_mode="fast", pace_sigma=0.0)
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    RegularizedTrainer(model=make_tiny_bert(), args=args, train_dataset=make_dataset(24), regularizers=cfg).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file()
    resized = RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path, max_steps=4), train_dataset=make_dataset(16),
                          regularizers=cfg)
    with pytest.raises(ValueError, match="PACE-fast"):
        resized.train(resume_from_checkpoint=str(checkpoint))
