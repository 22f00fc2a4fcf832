"""PEFT type registration: idempotent, reload-safe, pickle-safe, with a helpful error without the import."""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_tsrs
from peft_tsrs import registration
from peft_tsrs.registration import peft_type_value
from peft_tsrs.tuners.rlrr import RLRRConfig, RLRRModel

from conftest import make_tiny_vit


def test_enum_members_and_tables():
    assert PeftType.RLRR in list(PeftType)
    assert PeftType(peft_type_value("rlrr")) is PeftType.RLRR
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RLRR] is RLRRConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.RLRR] is RLRRModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.RLRR] == "rlrr_"
    # the string stored in adapter_config.json resolves to the same entry
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type_value("rlrr")] is RLRRConfig


def test_register_twice_and_reload_are_idempotent():
    before = len(list(PeftType))
    registration.register_all(peft_tsrs.tuners.TUNERS)
    registration.register_all(peft_tsrs.tuners.TUNERS)
    importlib.reload(registration)
    importlib.reload(peft_tsrs)
    assert len(list(PeftType)) == before
    model = get_peft_model(make_tiny_vit(), peft_tsrs.RLRRConfig())
    assert model.peft_config["default"].peft_type is PeftType.RLRR


def test_conflicting_registration_is_refused():
    class Other(RLRRModel):
        prefix = "rlrr_"

    Other.__qualname__ = "SomebodyElsesModel"
    with pytest.raises(RuntimeError, match="already registered"):
        registration.register("rlrr", RLRRConfig, Other)


def test_unsupported_peft_version_message():
    # module attributes, not names bound at import: another test reloads the module
    with pytest.raises(registration.UnsupportedPeftVersionError, match=r"pip install 'peft>="):
        registration.check_peft_version("0.13.2")
    registration.check_peft_version("0.21.2")


def test_config_pickles_and_round_trips_json(tmp_path):
    cfg = RLRRConfig(r=2, target_modules=["q_proj"], regularizers={"tsrs_weight": 1.0})
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    cfg.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "import peft_tsrs" in stored["peft_type"]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RLRRConfig) and loaded.r == 2 and loaded.regularizers == {"tsrs_weight": 1.0}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_unpickle_in_fresh_process_registers(tmp_path):
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps(RLRRConfig(r=3)))
    proc = _run(f"""
        import pickle
        from peft.utils import PeftType
        cfg = pickle.load(open({str(path)!r}, "rb"))
        assert cfg.peft_type is PeftType.RLRR and cfg.r == 3
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_loading_without_import_tells_user_to_import(tmp_path):
    model = get_peft_model(make_tiny_vit(), RLRRConfig())
    model.save_pretrained(tmp_path)
    proc = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path.parent)!r})
        from peft import PeftModel
        from transformers import ViTConfig, ViTForImageClassification
        base = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3))
        assert "peft_tsrs" not in sys.modules
        PeftModel.from_pretrained(base, {str(tmp_path)!r})
    """)
    assert proc.returncode != 0
    assert "import peft_tsrs" in proc.stderr


def test_adapter_config_of_earlier_releases_loads_its_recipe(tmp_path):
    """adapter_config.json written before the rename stores the recipe under ``tsrs``."""
    RLRRConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    stored = json.loads(path.read_text())
    stored.pop("regularizers")
    stored["tsrs"] = {"tsrs_weight": 0.5, "tsrs_block_path": "bert.encoder.layer"}
    path.write_text(json.dumps(stored))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded.regularizers == {"tsrs_weight": 0.5, "tsrs_block_path": "bert.encoder.layer"} and loaded.tsrs is None
    from peft_tsrs.trainer import recipe_from_model

    class Holder:
        peft_config = {"default": loaded}
        active_adapter = "default"

    with pytest.warns(FutureWarning, match="tsrs_block_path"):
        recipe = recipe_from_model(Holder())
    assert recipe.tsrs_weight == 0.5 and recipe.block_path == "bert.encoder.layer"
