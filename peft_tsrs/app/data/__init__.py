"""Real, offline data sets as ``datasets.Dataset``: WordNet noun glosses (text), Fashion-MNIST (images), few-shot
splits, label noise, and the Fashion-MNIST ViT transfer setting."""

from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, read_fashion_mnist
from .splits import encode_labels, few_shot_split, flip_labels
from .text import minilm_path, tokenize_dataset
from .vit_pretrain import pretrained_fmnist_vit
from .wordnet import NOUN_CATEGORIES, load_wordnet_nouns

__all__ = [
    "FASHION_MNIST_CLASSES",
    "NOUN_CATEGORIES",
    "encode_labels",
    "few_shot_split",
    "flip_labels",
    "load_fashion_mnist",
    "load_wordnet_nouns",
    "minilm_path",
    "pretrained_fmnist_vit",
    "read_fashion_mnist",
    "tokenize_dataset",
]
