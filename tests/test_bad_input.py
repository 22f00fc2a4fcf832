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
    cfg = RegularizerConfig(pace_weight=0.5, pace_mode="fast")
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    RegularizedTrainer(model=make_tiny_bert(), args=args, train_dataset=make_dataset(24), regularizers=cfg).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file()
    resized = RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path, max_steps=4), train_dataset=make_dataset(16),
                          regularizers=cfg)
    with pytest.raises(ValueError, match="PACE-fast"):
        resized.train(resume_from_checkpoint=str(checkpoint))
