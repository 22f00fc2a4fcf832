"""Recipes: defaults, YAML merging, overrides, clear errors, and a shortened real run of every file in configs/."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import datasets
import pytest
import torch

from peft_tsrs.app.recipes import Recipe, load_recipe, parse_override, read_yaml, recipe_from_dict
from peft_tsrs.config import RegularizerConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASK_FILES = sorted((CONFIGS / "tasks").glob("*.yaml"))
METHOD_FILES = sorted((CONFIGS / "methods").glob("*.yaml"))
ALL_FILES = TASK_FILES + METHOD_FILES

# A few seconds per run: 3 classes, 2 shots, 2 optimizer steps, short sequences, no diagnostics.
TINY = [
    "task.shots_per_class=2", "task.val_per_class=2", "task.test_per_class=3", "training.max_steps=2",
    "training.eval_batch_size=64", "training.logging_steps=1", "diagnostics=false",
]
TINY_TASK = {
    "wordnet_minilm": ["task.classes=[2, 3, 4]", "task.max_length=32"],
    "fashion_mnist": ["task.classes=[5, 6, 7]", "model.pretrain_epochs=0.01"],
}
# Start the self-labeling terms at once, so a 2-step run goes through label correction and reweighting.
START_NOW = ["regularizers.label_correction_start_epoch=0", "regularizers.reweight_start_epoch=0"]
METRICS_KEYS = {
    "name", "method", "task", "base_model", "shots_per_class", "label_noise", "seed", "validation", "test",
    "best_checkpoint", "train_time_s", "train_steps", "seconds_per_step", "trainable_parameters", "total_parameters",
    "n_train", "history", "collapsed_at_step",
}


def _file_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


# --------------------------------------------------------------------------- defaults, merging, overrides
def test_no_file_is_the_embedded_default():
    assert load_recipe() == Recipe()
    assert Recipe().validate().method == "rlrr"


def test_wordnet_minilm_spells_out_the_embedded_default():
    recipe = load_recipe([str(CONFIGS / "tasks" / "wordnet_minilm.yaml")])
    default = Recipe()
    # only where the run folder goes differs (runs/wordnet_minilm/<method name>)
    assert recipe.output_dir == "runs/wordnet_minilm"
    assert dataclasses.replace(recipe, output_dir=default.output_dir) == default
    # ... and every key of the embedded task/model/training sections is written out
    data = read_yaml(str(CONFIGS / "tasks" / "wordnet_minilm.yaml"))
    for section in ("task", "training"):
        assert set(data[section]) == {f.name for f in dataclasses.fields(getattr(default, section))}


def test_yaml_files_merge_in_order_and_base_is_underneath(tmp_path):
    (tmp_path / "base.yaml").write_text("name: from-base\ntraining:\n  epochs: 3\n  batch_size: 8\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntraining:\n  epochs: 4\n")
    (tmp_path / "later.yaml").write_text("training:\n  batch_size: 32\nregularizers:\n  tsrs_weight: 1\n")
    recipe = load_recipe([str(tmp_path / "child.yaml"), str(tmp_path / "later.yaml")])
    assert recipe.name == "from-base"  # from the base, not overridden
    assert recipe.training.epochs == 4  # the child wins over its base
    assert recipe.training.batch_size == 32  # a later file wins over an earlier one
    assert recipe.training.learning_rate == Recipe().training.learning_rate  # untouched keys keep the defaults
    assert recipe.regularizers.tsrs_weight == 1.0
    # overrides come last
    recipe = load_recipe([str(tmp_path / "child.yaml")], ["training.epochs=7", "name=x"])
    assert (recipe.training.epochs, recipe.name) == (7, "x")


def test_later_method_file_replaces_adapter_type_and_merges_options():
    recipe = load_recipe([str(CONFIGS / "tasks" / "fmnist_vit.yaml"), str(CONFIGS / "methods" / "tsrs_lora.yaml")])
    assert recipe.adapter.type == "lora" and recipe.adapter.options["r"] == 8
    assert recipe.task.name == "fashion_mnist" and recipe.training.epochs == 15
    assert recipe.run_dir == os.path.join("runs/fmnist_vit", "tsrs-lora")


def test_overrides_parse_types():
    assert parse_override("training.epochs=3") == {"training": {"epochs": 3}}
    assert parse_override("training.learning_rate=1e-4") == {"training": {"learning_rate": 1e-4}}
    assert parse_override("training.learning_rate=5.0e-5")["training"]["learning_rate"] == pytest.approx(5e-5)
    assert parse_override("task.classes=[1, 2,3]") == {"task": {"classes": [1, 2, 3]}}
    assert parse_override("task.test_per_class=null") == {"task": {"test_per_class": None}}
    assert parse_override("task.test_per_class=") == {"task": {"test_per_class": None}}
    assert parse_override("diagnostics=false") == {"diagnostics": False}
    assert parse_override("name=my-run") == {"name": "my-run"}
    assert parse_override("regularizers.distance_norm=inf-op") == {"regularizers": {"distance_norm": "inf-op"}}
    recipe = load_recipe([], ["training.epochs=2.5", "regularizers.tsrs_weight=1", "task.classes=[0, 5]",
                              "task.test_per_class=null", "adapter.init_weights=kaiming"])
    assert recipe.training.epochs == 2.5
    assert isinstance(recipe.regularizers.tsrs_weight, (int, float)) and recipe.regularizers.uses_tsrs
    assert recipe.task.classes == [0, 5] and recipe.task.test_per_class is None
    assert recipe.adapter.options == {"init_weights": "kaiming"}


# --------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    "data, message",
    [
        ({"trainig": {"epochs": 1}}, r"unknown recipe key\(s\) \['trainig'\].*valid top-level keys:.*training"),
        ({"training": {"epoch": 1}}, r"unknown key\(s\) \['epoch'\] in recipe section 'training'; valid keys:.*epochs"),
        ({"task": {"shots": 4}}, r"section 'task'.*shots_per_class"),
        ({"regularizers": {"tsrs_wieght": 1.0}}, r"regularizers.*tsrs_wieght.*valid keys:.*tsrs_weight"),
        ({"adapter": {"type": "dora"}}, r"adapter.type must be one of .*rlrr.*got 'dora'"),
        ({"adapter": {"type": "rlrr", "rank": 2}}, r"unknown option\(s\) \['rank'\] for adapter.type 'rlrr'; valid:.* r,"),
        ({"adapter": {"type": "lora", "lora_alfa": 2}}, r"\['lora_alfa'\] for adapter.type 'lora'.*lora_alpha"),
        ({"adapter": {"type": "full", "r": 2}}, r"'full' takes no options"),
        ({"task": {"name": "mnist"}}, r"task.name must be one of .*wordnet.*got 'mnist'"),
        ({"regularizers": {"distance_norm": "frob"}}, r"distance_radius"),
        ({"training": {"learning_rate": 0}}, r"learning_rate"),
        # wrong types and non-finite numbers: one line naming the key, never a TypeError from a comparison
        ({"training": {"epochs": "abc"}}, r"^training.epochs must be a number, got 'abc' \(e.g. training.epochs=10"),
        ({"training": {"max_steps": 2.5}}, r"^training.max_steps must be a whole number, got 2.5"),
        ({"training": {"epochs": None}}, r"^training.epochs must be a number, got None"),
        ({"task": {"shots_per_class": "8"}}, r"^task.shots_per_class must be a whole number, got '8'"),
        ({"task": {"classes": ["a"]}}, r"^task.classes must be a list of whole numbers"),
        ({"task": {"label_noise": float("inf")}}, r"^task.label_noise must be a finite number, got inf"),
        ({"regularizers": {"tsrs_weight": "abc"}}, r"^regularizers.tsrs_weight must be a number, got 'abc'"),
        ({"regularizers": {"tsrs_weight": float("nan")}}, r"^regularizers.tsrs_weight must be a finite number"),
        ({"regularizers": {"pace_weight": "nan"}}, r"^regularizers.pace_weight must be a finite number, got 'nan'"),
        ({"regularizers": {"tsrs_inject_layer": "mid"}}, r"^regularizers.tsrs_inject_layer must be a whole number"),
        ({"adapter": {"type": "rlrr", "r": "abc"}}, r"^adapter.r must be a whole number, got 'abc'"),
        ({"adapter": {"type": "rlrr", "r": 0}}, r"'adapter'.*RLRRConfig: `r` must be a positive integer"),
        ({"diagnostics": "maybe"}, r"^diagnostics must be true or false"),
        ({"training": 3}, r"recipe section 'training' must be a mapping"),
        ({"name": ""}, r"name '' is not a run folder name"),
        ({"name": ".."}, r"name '..' is not a run folder name"),
        ({"model": {"name": "/no/such/model/folder"}}, r"model.name '/no/such/model/folder': no such model folder"),
        ({"model": {"name": "./relative/missing"}}, r"no such model folder"),
    ],
)
def test_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        recipe_from_dict(data)


def test_numbers_given_for_strings_and_ints_for_floats_are_accepted():
    recipe = recipe_from_dict({"name": 2024, "training": {"epochs": 3, "learning_rate": 1e-3}})
    assert recipe.name == "2024" and recipe.training.epochs == 3
    assert load_recipe([], ["regularizers.tsrs_weight=1"]).regularizers.tsrs_weight == 1


def test_a_nan_regularizer_weight_cannot_switch_the_term_off_unnoticed(tmp_path):
    """`tsrs_weight: .nan` used to pass (NaN < 0 is false), turn TSRS off (NaN > 0 is false too) and record the run
    as plain RLRR. The recipe refuses it, from YAML and from Python."""
    (tmp_path / "nan.yaml").write_text("regularizers:\n  tsrs_weight: .nan\n")
    with pytest.raises(ValueError, match=r"regularizers.tsrs_weight must be a finite number, got nan"):
        load_recipe([str(tmp_path / "nan.yaml")])
    # built in Python (RegularizerConfig may refuse NaN itself; either way no recipe with a NaN weight validates)
    with pytest.raises(ValueError, match=r"tsrs_weight"):
        Recipe(regularizers=RegularizerConfig(tsrs_weight=float("nan"))).validate()


def test_model_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=r"is a folder without config.json"):
        recipe_from_dict({"model": {"name": str(tmp_path / "model")}})
    (tmp_path / "model" / "config.json").write_text("{}")
    assert recipe_from_dict({"model": {"name": str(tmp_path / "model")}}).model.name == str(tmp_path / "model")
    assert recipe_from_dict({"model": {"name": "org/some-model"}}).model.name == "org/some-model"  # a Hub id


def test_vit_pretraining_options_are_checked_before_anything_runs():
    vit = {"name": "fmnist_vit", "pretrain_size": "m", "pretrain_augment": True, "pretrain_rotation_weight": 0.5}
    assert recipe_from_dict({"model": vit}).model.pretrain_size == "m"
    with pytest.raises(ValueError, match=r"model.pretrain_size must be one of \['m', 's'\], got 'xl'"):
        recipe_from_dict({"model": {**vit, "pretrain_size": "xl"}})
    with pytest.raises(ValueError, match=r"model.pretrain_rotation_weight must be a finite number >= 0"):
        recipe_from_dict({"model": {**vit, "pretrain_rotation_weight": -1.0}})


def test_override_without_equals_sign():
    with pytest.raises(ValueError, match=r"must look like section.key=value"):
        parse_override("training.epochs")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        load_recipe([], ["training.epoch=3"])


def test_missing_or_malformed_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        load_recipe([str(tmp_path / "nope.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_recipe([str(tmp_path / "list.yaml")])
    # broken YAML: one line naming the file and the line, not PyYAML's multi-line report
    (tmp_path / "broken.yaml").write_text("training:\n  epochs: [1\n")
    with pytest.raises(ValueError, match=r"broken.yaml is not valid YAML at line \d+, column \d+: ") as err:
        load_recipe([str(tmp_path / "broken.yaml")])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"override 'training.classes=\[1' is not valid YAML"):
        load_recipe([], ["training.classes=[1"])


def test_labels_out_of_range_are_a_clear_error():
    from peft_tsrs.app.tasks import check_labels

    ok = datasets.Dataset.from_dict({"label": [0, 1, 2]})
    check_labels(datasets.DatasetDict(train=ok, test=ok), 3)
    bad = datasets.Dataset.from_dict({"label": [0, 3, 1]})
    with pytest.raises(ValueError, match=r"split 'test' has label 3 outside \[0, 3\).*remap"):
        check_labels(datasets.DatasetDict(train=ok, test=bad), 3)
    with pytest.raises(ValueError, match=r"label -1 outside"):
        check_labels(datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": [-1]})), 3)


# --------------------------------------------------------------------------- string label columns
def _text_dataset(labels: list) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"a {y} here" for y in labels], "label": labels})


def test_string_labels_are_encoded_by_the_data_helpers():
    """String labels used to end in `too many dimensions 'str'` in the collator (or `invalid literal for int()` in
    few_shot_split / flip_labels): they become ClassLabel ids, names kept."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from peft_tsrs.app.data import few_shot_split, flip_labels, minilm_path, tokenize_dataset

    ds = _text_dataset(["cat", "dog", "car"] * 10)
    splits = few_shot_split(ds, 2, 2, 3, seed=0)
    assert splits["train"].features["label"].names == ["car", "cat", "dog"]
    assert sorted(set(splits["test"]["label"])) == [0, 1, 2]
    assert splits["train"].features["label"].int2str(splits["train"]["label"][0]) in splits["train"]["text"][0]
    noisy = flip_labels(ds, 0.2, seed=0, num_classes=3)
    assert noisy.features["label"].names == ["car", "cat", "dog"] and set(noisy["label"]) <= {0, 1, 2}

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenized = tokenize_dataset(ds, tokenizer, max_length=16, padding=False)
    batch = DataCollatorWithPadding(tokenizer)([tokenized[i] for i in range(4)])
    assert batch["labels"].tolist() == [1, 2, 0, 1]


def test_string_labels_get_one_mapping_for_all_splits():
    from peft_tsrs.app.data import encode_labels

    # datasets' own DatasetDict.class_encode_column encodes each split alone: 'c' would be 1 in train, 1 in test
    splits = datasets.DatasetDict(train=_text_dataset(["b", "c"]), test=_text_dataset(["a", "c"]))
    encoded = encode_labels(splits)
    assert encoded["train"].features["label"].names == encoded["test"].features["label"].names == ["a", "b", "c"]
    assert list(encoded["train"]["label"]) == [1, 2] and list(encoded["test"]["label"]) == [0, 2]
    ints = _text_dataset([0, 1])
    assert encode_labels(ints) is ints  # already class ids: unchanged
    with pytest.raises(ValueError, match=r"rows without a label \(None\); drop them first"):
        encode_labels(_text_dataset(["a", None]))


def test_check_labels_refuses_string_labels_with_the_fix():
    from peft_tsrs.app.tasks import check_labels

    with pytest.raises(ValueError, match=r"split 'train' has label 'cat', not a class id; encode .*encode_labels"):
        check_labels(datasets.DatasetDict(train=_text_dataset(["cat", "dog"])), 2)


def test_missing_dataset_package_says_which_apt_get_command(monkeypatch, tmp_path):
    import peft_tsrs.app.data.fashion_mnist as fmnist
    import peft_tsrs.app.data.wordnet as wordnet
    from peft_tsrs.app.tasks import build_task

    monkeypatch.setattr(wordnet, "DEFAULT_WORDNET_NOUNS", str(tmp_path / "missing" / "data.noun"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install wordnet-base"):
        build_task(load_recipe([], TINY))
    monkeypatch.setattr(fmnist, "DEFAULT_FASHION_MNIST_ROOT", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        build_task(load_recipe([], ["task.name=fashion_mnist", "model.name=fmnist_vit"]))


# --------------------------------------------------------------------------- every file in configs/
def test_configs_exist():
    assert {p.stem for p in TASK_FILES} >= {"wordnet_minilm", "fmnist_vit"}
    assert {p.stem for p in METHOD_FILES} >= {
        "full", "lora", "rlrr", "rlrr_ssf", "pace", "pace_fast", "tsrs", "tsrs_lora", "self_labeling", "distance"}
    assert (CONFIGS / "README.md").is_file()


@pytest.mark.parametrize("path", ALL_FILES, ids=_file_id)
def test_every_config_loads_and_is_documented(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path} must start with a comment saying what it is"
    data = read_yaml(str(path))
    if path.parent.name == "methods":
        # method files combine with any task file: adapter / regularizers / learning rate only
        assert set(data) <= {"name", "adapter", "regularizers", "training"}, sorted(data)
        assert set(data.get("training", {})) <= {"learning_rate"}
        assert "adapter" in data
    else:
        assert "adapter" not in data and "regularizers" not in data
    recipe = load_recipe([str(path)])
    assert recipe.validate() is recipe
    readme = (CONFIGS / "README.md").read_text()
    assert f"configs/{path.parent.name}/{path.name}" in readme


# Tasks on an optional real LLM (SmolLM2: `make llm`, minutes per run): tested on a tiny Llama in test_llm_task.py.
LLM_TASKS = ("wordnet_smollm2",)


def _combinations() -> list[tuple[Path, Path]]:
    """Each method with wordnet_minilm; each task with rlrr (the LLM tasks: see test_llm_task.py)."""
    rlrr = CONFIGS / "methods" / "rlrr.yaml"
    wordnet = CONFIGS / "tasks" / "wordnet_minilm.yaml"
    combos = [(wordnet, m) for m in METHOD_FILES]
    combos += [(t, rlrr) for t in TASK_FILES if t != wordnet and t.stem not in LLM_TASKS]
    return combos


def _logits(model, data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = data.splits[split]
    batch = data.collator([ds[i] for i in range(len(ds))])
    labels = batch.pop("labels")
    batch = {k: v for k, v in batch.items() if k != "index"}
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float(), labels


def check_run_folder(run_dir: str, metrics: dict) -> None:
    """What every run folder must hold: a reloadable adapter reproducing the test metrics, metrics.json, curves,
    the resolved recipe and a model card naming the method and the test accuracy."""
    from peft import PeftModel

    from peft_tsrs.app.tasks import build_model, build_task

    run = Path(run_dir)
    for name in ("adapter", "metrics.json", "recipe.yaml", "training_curves.png"):
        assert (run / name).exists(), name
    assert (run / "training_curves.png").stat().st_size > 1000
    assert not (run / "checkpoints").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert METRICS_KEYS <= set(saved), sorted(METRICS_KEYS - set(saved))
    assert {"accuracy", "macro_f1", "loss"} <= set(saved["test"]) and "accuracy" in saved["validation"]
    assert saved["test"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])

    recipe = load_recipe([str(run / "recipe.yaml")])  # the resolved recipe reloads as it was
    assert recipe.method == saved["method"]
    card = (run / "adapter" / "README.md").read_text()
    assert saved["method"] in card
    assert f"{saved['test']['accuracy']:.4f}" in card

    data = build_task(recipe)
    # the base model is recorded by its Hub id (MiniLM) or a descriptive name (the ViT pretrained here), never by the
    # local folder it was loaded from (a venv or cache path, meaningless on the Hub or another machine)
    expected = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                "fmnist_vit": os.path.basename(data.model_path)}[recipe.model.name]
    assert saved["base_model"] == expected and os.sep not in expected.replace("/", "")
    for path in run.rglob("*"):
        if path.suffix in (".json", ".md", ".yaml"):
            assert data.model_path not in path.read_text(), path
    card_meta = card.split("---")[1]
    if recipe.model.name == "minilm":
        assert f"base_model: {expected}" in card_meta
        if recipe.adapter.type != "full":
            assert f"base_model:adapter:{expected}" in card_meta
    else:  # not on the Hub: no base_model metadata, the card names it in the text
        assert "base_model" not in card_meta and f"Base model: `{expected}`" in card
    # the selected checkpoint: step and metric, no path to the deleted checkpoints folder
    best = saved["best_checkpoint"]
    assert best["metric"] == "eval_accuracy" and isinstance(best["step"], int) and 1 <= best["step"] <= 2
    assert best["value"] == pytest.approx(saved["validation"]["accuracy"]) and best["folder"] is None
    adapter_dir = str(run / "adapter")
    if recipe.adapter.type == "full":
        assert (run / "adapter" / "config.json").is_file()
        model = build_model(recipe, data, path=adapter_dir)
    else:
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == expected
        model = PeftModel.from_pretrained(build_model(recipe, data), adapter_dir)
    logits, labels = _logits(model, data, "test")
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(saved["test"]["accuracy"], abs=1e-6)
    assert loss == pytest.approx(saved["test"]["loss"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("task_file, method_file", _combinations(),
                         ids=[f"{t.stem}+{m.stem}" for t, m in _combinations()])
def test_every_config_runs(task_file, method_file, tmp_path, monkeypatch):
    from peft_tsrs.app.run import run_recipe

    task = "fashion_mnist" if "fmnist" in task_file.stem else task_file.stem
    overrides = [*TINY, *TINY_TASK[task], f"output_dir={tmp_path}"]
    if method_file.stem == "self_labeling":
        overrides += START_NOW
    if task == "fashion_mnist":  # the tiny pretraining must not land in the real cache
        monkeypatch.setenv("PEFT_TSRS_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe([str(task_file), str(method_file)], overrides)
    metrics = run_recipe(recipe, progress=False)
    assert recipe.run_dir == str(tmp_path / recipe.name)
    assert metrics["train_steps"] == 2
    assert 1 <= metrics["validation"]["predicted_classes"] <= 3  # the collapse check counted the validation split
    check_run_folder(recipe.run_dir, metrics)
    if task == "fashion_mnist":
        assert any((tmp_path / "cache").iterdir())


def test_apply_adapter_wraps_as_the_recipe_says():
    from conftest import make_tiny_bert
    from peft import PeftModel

    from peft_tsrs.app.adapters import apply_adapter

    plain = make_tiny_bert()
    assert apply_adapter(plain, load_recipe([], ["adapter.type=full"])) is plain  # full fine-tuning: no wrapper
    bare = apply_adapter(make_tiny_bert(), load_recipe([], ["adapter.type=rlrr"]))
    assert isinstance(bare, PeftModel) and not bare.peft_config["default"].regularizers  # no regularizer: nothing stored
    recipe = load_recipe([], ["adapter.type=rlrr", "regularizers.tsrs_weight=0.3"])
    regularized = apply_adapter(make_tiny_bert(), recipe)
    assert regularized.peft_config["default"].regularizers["tsrs_weight"] == 0.3


@pytest.mark.parametrize("name, hf_name", [("linear", "linear"), ("cosine", "cosine"),
                                           ("constant", "constant_with_warmup")])
def test_lr_scheduler_reaches_the_training_arguments(name, hf_name, tmp_path):
    from peft_tsrs.app.run import training_arguments

    recipe = load_recipe([], [f"training.lr_scheduler={name}"])
    assert training_arguments(recipe, str(tmp_path)).lr_scheduler_type == hf_name


def test_an_unknown_lr_scheduler_is_refused():
    with pytest.raises(ValueError, match="training.lr_scheduler 'step' is not one of linear, cosine, constant"):
        load_recipe([], ["training.lr_scheduler=step"])
