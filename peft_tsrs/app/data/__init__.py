"""Real, offline data sets as ``datasets.Dataset``: WordNet noun glosses (text, and as chat instruction examples),
Fashion-MNIST (images), few-shot splits, label noise, and the Fashion-MNIST ViT transfer setting."""

from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, read_fashion_mnist
from .splits import encode_labels, few_shot_split, flip_labels
from .chat import IGNORE_INDEX, ChatCollator, ChatFormat, tokenize_chat
from .text import (SMOLLM2_GGUF, load_smollm2, minilm_path, smollm2_path, sort_by_length, tokenize_dataset,
                   trainable_gguf)
from .vit_pretrain import pretrained_fmnist_vit
from .wordnet import NOUN_CATEGORIES, category_name, load_wordnet_nouns

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IGNORE_INDEX",
    "ChatCollator",
    "ChatFormat",
    "SMOLLM2_GGUF",
    "NOUN_CATEGORIES",
    "category_name",
    "encode_labels",
    "few_shot_split",
    "flip_labels",
    "load_fashion_mnist",
    "load_wordnet_nouns",
    "minilm_path",
    "smollm2_path",
    "sort_by_length",
    "load_smollm2",
    "trainable_gguf",
    "pretrained_fmnist_vit",
    "read_fashion_mnist",
    "tokenize_chat",
    "tokenize_dataset",
]
