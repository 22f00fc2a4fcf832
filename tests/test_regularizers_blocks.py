"""find_blocks: known transformers paths, PEFT wrappers, generic paths, fallback and errors."""

from __future__ import annotations

import pytest
from conftest import make_tiny_bert, make_tiny_vit
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_tsrs.regularizers import find_blocks, unwrap_model


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


class _Generic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(2, 2)


class _Odd(nn.Module):
    """No known path: one heterogeneous list and two homogeneous ones of different length."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Tanh(), nn.GELU(), nn.Sigmoid()])
        self.small = nn.ModuleList([_Block(), _Block()])
        self.stages = nn.ModuleList([_Block() for _ in range(4)])


def test_known_paths():
    path, blocks = find_blocks(make_tiny_vit(layers=3))
    assert path == "vit.layers" and len(blocks) == 3
    assert type(blocks[0]).__name__ == "ViTLayer"
    path, blocks = find_blocks(make_tiny_bert(layers=2))
    assert path == "bert.encoder.layer" and type(blocks[0]).__name__ == "BertLayer"


def test_sees_through_peft_wrappers():
    base = make_tiny_bert()
    peft_model = get_peft_model(base, LoraConfig(target_modules=["query"], r=2))
    assert unwrap_model(peft_model) is base
    assert unwrap_model(peft_model.base_model) is base  # LoraModel used directly
    for wrapped in (peft_model, peft_model.base_model):
        path, blocks = find_blocks(wrapped)
        assert path == "bert.encoder.layer" and blocks is base.bert.encoder.layer
    # an explicit path relative to the wrapper is accepted too
    _, blocks = find_blocks(peft_model, "base_model.model.bert.encoder.layer")
    assert blocks is base.bert.encoder.layer


def test_generic_prefix_and_fallback():
    model = _Generic()
    path, blocks = find_blocks(model)
    assert path == "backbone.blocks" and blocks is model.backbone.blocks
    odd = _Odd()
    path, blocks = find_blocks(odd)
    assert path == "stages" and blocks is odd.stages  # largest homogeneous list wins


def test_explicit_block_path():
    odd = _Odd()
    path, blocks = find_blocks(odd, "small")
    assert path == "small" and blocks is odd.small


def test_errors_tell_the_user_what_to_do():
    with pytest.raises(ValueError, match="block_path"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"'bert\.encoder'.*'bert\.encoder\.layer'"):
        find_blocks(make_tiny_bert(), "bert.encoder")
    with pytest.raises(ValueError, match="does not resolve"):
        find_blocks(make_tiny_bert(), "bert.nothing.here")
