"""Shared fixtures: tiny ViT and BERT models built from configs (no download)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

NUM_LABELS = 3


def make_tiny_vit(num_labels: int = NUM_LABELS, layers: int = 2, seed: int = 0, attention_dropout: float = 0.0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=32, num_labels=num_labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=attention_dropout,
    )
    return ViTForImageClassification(cfg).eval()


def make_tiny_bert(num_labels: int = NUM_LABELS, layers: int = 2, seed: int = 0, attention_dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=attention_dropout,
    )
    return BertForSequenceClassification(cfg).eval()


def vit_inputs(batch: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g)}


def bert_inputs(batch: int = 4, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # some padding so attention masks matter
    return {"input_ids": ids, "attention_mask": mask}


MODEL_FACTORIES = {
    "vit": (make_tiny_vit, vit_inputs),
    "bert": (make_tiny_bert, bert_inputs),
}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny(request):
    """(model_factory, inputs_factory, kind) for each tiny architecture."""
    make, inputs = MODEL_FACTORIES[request.param]
    return make, inputs, request.param
