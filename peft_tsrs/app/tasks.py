"""Turn a recipe's ``task`` and ``model`` sections into model-ready datasets and a pretrained HF model.

Classification tasks (``wordnet``, ``fashion_mnist``) get a new classification head; the instruction task
``wordnet_chat`` keeps the causal LM as it is (its answers are generated text, scored by exact match, see
:mod:`peft_tsrs.app.generation`)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import datasets
import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
)

from .data import (
    FASHION_MNIST_CLASSES,
    NOUN_CATEGORIES,
    SMOLLM2_GGUF,
    ChatCollator,
    trainable_gguf,
    ChatFormat,
    category_name,
    few_shot_split,
    flip_labels,
    load_fashion_mnist,
    load_wordnet_nouns,
    minilm_path,
    pretrained_fmnist_vit,
    smollm2_path,
    sort_by_length,
    tokenize_chat,
    tokenize_dataset,
)
from .generation import GenerationEval
from .recipes import HUB_IDS, Recipe


@dataclass
class TaskData:
    """Splits ready for the model (``train`` carries an ``index`` column), label names and a collator."""

    splits: datasets.DatasetDict
    label_names: list[str]
    collator: Callable
    model_path: str
    processor: Any = None  # tokenizer (text) saved next to the adapter
    model_id: Optional[str] = None  # what the run records as its base model (see base_model_id); None: model_path
    generation: Optional[GenerationEval] = None  # instruction tasks: how answers are generated and scored

    @property
    def generative(self) -> bool:
        """An instruction task: a causal LM trained on answers and scored by generation (no classification head)."""
        return self.generation is not None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _label_names(ds: datasets.Dataset) -> list[str]:
    feature = ds.features["label"]
    return list(feature.names) if hasattr(feature, "names") else [str(i) for i in sorted(set(ds["label"]))]


def check_labels(splits: datasets.DatasetDict, num_labels: int) -> None:
    """Labels must be class ids in ``[0, num_labels)``; say which split and value is wrong otherwise (string labels:
    encode them first, see :func:`~peft_tsrs.app.data.encode_labels`)."""
    for name, ds in splits.items():
        labels = ds["label"]
        text = next((y for y in labels if not isinstance(y, (int, np.integer)) or isinstance(y, bool)), None)
        if text is not None:
            raise ValueError(f"split {name!r} has label {text!r}, not a class id; encode the label column first: "
                             f"peft_tsrs.app.data.encode_labels(splits) (datasets' class_encode_column, one mapping "
                             f"for all splits).")
        bad = [y for y in labels if not 0 <= int(y) < num_labels]
        if bad:
            raise ValueError(f"split {name!r} has label {bad[0]} outside [0, {num_labels}); labels must be class ids "
                             f"0..{num_labels - 1} (remap them, or set the model's num_labels).")


def _add_label_noise(splits: datasets.DatasetDict, recipe: Recipe, num_labels: int) -> datasets.DatasetDict:
    if recipe.task.label_noise > 0:
        splits["train"] = flip_labels(splits["train"], recipe.task.label_noise, recipe.task.seed, num_labels,
                                      noise_type=recipe.task.label_noise_type)
    return splits


# Too few synsets for a 50-per-class test set (42 and 51); left out unless `task.classes` names them.
WORDNET_EXCLUDED = ("noun.Tops", "noun.motive")


def build_wordnet(recipe: Recipe) -> TaskData:
    task = recipe.task
    splits = few_shot_split(load_wordnet_nouns(), task.shots_per_class, task.val_per_class, task.test_per_class,
                            seed=task.seed, classes=wordnet_classes(recipe))
    names = _label_names(splits["train"])
    splits = _add_label_noise(splits, recipe, len(names))
    path = resolve_model_path(recipe)
    with _loading(recipe, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs(recipe))
    splits = tokenize_dataset(splits, tokenizer, max_length=task.max_length, padding=False)
    for name in ("validation", "test"):  # evaluation 2-3x faster, same metrics; the training order is the sampler's
        splits[name] = sort_by_length(splits[name])
    return TaskData(splits, names, DataCollatorWithPadding(tokenizer), path, tokenizer,
                    model_id=base_model_id(recipe, path))


def wordnet_classes(recipe: Recipe) -> list[int]:
    """``task.classes``, or every WordNet noun category but :data:`WORDNET_EXCLUDED`."""
    if recipe.task.classes is not None:
        return list(recipe.task.classes)
    return [i for i, name in enumerate(NOUN_CATEGORIES) if name not in WORDNET_EXCLUDED]


def wordnet_system_prompt(answers: list[str]) -> str:
    """The instruction of ``wordnet_chat``. The category names are not listed (that would double the prompt: 24
    names are ~60 tokens, the glosses ~20); the model learns them from the training answers. (With the list the
    quantized SmolLM2 still answered none of 48 validation glosses with a category name zero-shot.)"""
    return "Name the WordNet category of the noun defined by the user, in one word."


def build_wordnet_chat(recipe: Recipe) -> TaskData:
    """WordNet glosses as instruction examples for a causal LM with a chat template: the user turn is the gloss
    (``lemma: definition``), the answer the category's name (``noun.animal`` -> ``animal``), the loss on the answer
    tokens only; evaluated by greedy generation and exact match of the name (validation selects, test reports)."""
    task = recipe.task
    splits = few_shot_split(load_wordnet_nouns(), task.shots_per_class, task.val_per_class, task.test_per_class,
                            seed=task.seed, classes=wordnet_classes(recipe))
    names = _label_names(splits["train"])
    splits = _add_label_noise(splits, recipe, len(names))
    check_labels(splits, len(names))  # before the label column becomes answer tokens
    path = resolve_model_path(recipe)
    with _loading(recipe, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs(recipe))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers = [category_name(n) for n in names]
    system = wordnet_system_prompt(answers)
    splits = tokenize_chat(splits, tokenizer, system, answers, max_length=task.max_length)
    generation = GenerationEval(tokenizer, answers, end=ChatFormat.from_tokenizer(tokenizer, system).end,
                                max_new_tokens=task.max_new_tokens, batch_size=recipe.training.eval_batch_size)
    return TaskData(splits, names, ChatCollator(tokenizer.pad_token_id), path, tokenizer,
                    model_id=base_model_id(recipe, path), generation=generation)


def build_fashion_mnist(recipe: Recipe) -> TaskData:
    task = recipe.task
    pretrain = set(recipe.model.pretrain_classes) if recipe.model.name == "fmnist_vit" else set()
    classes = task.classes or [c for c in range(len(FASHION_MNIST_CLASSES)) if c not in pretrain]
    overlap = sorted(set(classes) & pretrain)
    if overlap:
        raise ValueError(f"task.classes {overlap} were used to pretrain the ViT (model.pretrain_classes); "
                         f"fine-tune on other classes for a transfer setting.")
    # train/validation from the official training images, test from the official test images
    train_val = few_shot_split(load_fashion_mnist("train"), task.shots_per_class, task.val_per_class, 0,
                               seed=task.seed, classes=classes)
    test = few_shot_split(load_fashion_mnist("test"), 0, 0, task.test_per_class, seed=task.seed, classes=classes)
    splits = datasets.DatasetDict(train=train_val["train"], validation=train_val["validation"], test=test["test"])
    names = _label_names(splits["train"])
    splits = _add_label_noise(splits, recipe, len(names))
    path = resolve_model_path(recipe)
    return TaskData(splits, names, default_data_collator, path, model_id=base_model_id(recipe, path))


def resolve_model_path(recipe: Recipe) -> str:
    """The folder of the pretrained backbone named by ``model.name``."""
    name = recipe.model.name
    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        return smollm2_path()
    if name == "fmnist_vit":
        m = recipe.model
        return pretrained_fmnist_vit(classes=m.pretrain_classes, epochs=m.pretrain_epochs, size=m.pretrain_size,
                                     augment=m.pretrain_augment, rotation_weight=m.pretrain_rotation_weight)
    return name


# What a SmolLM2 run records as its base model: not the Hub's HuggingFaceTB/SmolLM2-135M-Instruct, whose weights
# differ (the GGUF file holds them 4-bit quantized, Q4_1), but the file the adapter was trained on.
SMOLLM2_ID = "SmolLM2-135M-Instruct-Q4_1"


def load_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments of the backbone (``gguf_file`` for SmolLM2's single GGUF file)."""
    return {"gguf_file": SMOLLM2_GGUF} if recipe.model.name == "smollm2" else {}


def base_model_id(recipe: Recipe, path: str) -> str:
    """The name a run records as its base model (adapter config ``base_model_name_or_path``, model card): the Hub id
    of the shipped MiniLM, the descriptive name of the ViT pretrained here (its cache folder name, e.g.
    ``fmnist-vit-v1-h128-l4-c01234-e2-s0``: not on the Hub), else ``model.name`` as given. Never a venv path."""
    name = recipe.model.name
    if name in HUB_IDS:
        return HUB_IDS[name]
    if name == "smollm2":
        return SMOLLM2_ID
    if name == "fmnist_vit":
        return os.path.basename(os.path.normpath(path))
    return name


@contextlib.contextmanager
def _loading(recipe: Recipe, what: str):
    """A backbone that cannot be loaded (offline Hub id, broken folder) as a one-line ``ValueError``."""
    try:
        yield
    except OSError as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"cannot load the {what} of model.name {recipe.model.name!r} ({reason}); use minilm, "
                         f"fmnist_vit, smollm2 or a local model folder (a Hub id needs the network or a cached "
                         f"copy).") from None


def build_task(recipe: Recipe) -> TaskData:
    """Datasets for ``recipe.task`` (dispatch on its name) with labels checked."""
    builders = {"wordnet": build_wordnet, "fashion_mnist": build_fashion_mnist, "wordnet_chat": build_wordnet_chat}
    data = builders[recipe.task.name](recipe)
    if not data.generative:  # instruction examples were checked before their labels became answer tokens
        check_labels(data.splits, data.num_labels)
    return data


def build_model(recipe: Recipe, data: TaskData, path: Optional[str] = None) -> nn.Module:
    """The pretrained backbone with a new classification head of ``data.num_labels`` classes; for an instruction
    task the causal LM as it is (float32)."""
    if data.generative:
        with _loading(recipe, "model"):
            model = AutoModelForCausalLM.from_pretrained(path or data.model_path, dtype=torch.float32,
                                                         **load_kwargs(recipe))
        if recipe.model.name == "smollm2":
            trainable_gguf(model)
        if model.generation_config is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = data.processor.pad_token_id
        return model
    id2label = dict(enumerate(data.label_names))
    kwargs = dict(num_labels=data.num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                  ignore_mismatched_sizes=True)
    auto = AutoModelForSequenceClassification if recipe.task.name == "wordnet" else AutoModelForImageClassification
    with _loading(recipe, "model"):
        return auto.from_pretrained(path or data.model_path, **kwargs, **load_kwargs(recipe))
