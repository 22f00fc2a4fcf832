"""The shared layer machinery of the RLRR and PACE tuners (tuners_utils.ComposedWeightLayer)."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

from peft_tsrs.tuners.pace import Linear as PACELinear
from peft_tsrs.tuners.rlrr import Linear as RLRRLinear
from peft_tsrs.tuners.rlrr import ScaleShift
from peft_tsrs.tuners.tuners_utils import ComposedWeightLayer


def test_compose_is_abstract():
    assert inspect.isabstract(ComposedWeightLayer)
    assert ComposedWeightLayer.__abstractmethods__ == frozenset({"compose"})


@pytest.mark.parametrize("module_first", [True, False])
def test_a_layer_without_compose_cannot_be_instantiated(module_first):
    # nn.Module is not an ABC; mixed with the layer (either base order) the class must still refuse to instantiate.
    class NoCompose(ComposedWeightLayer):
        adapter_layer_names = ("x",)

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self._init_composed(nn.Linear(2, 2))

    bases = (nn.Module, NoCompose) if module_first else (NoCompose, nn.Module)
    cls = type("NoComposeLinear", bases, {})
    with pytest.raises(TypeError, match=r"abstract.*compose"):
        cls()

    class WithCompose(cls):
        def compose(self, weight, bias, adapter_names):
            return weight, bias

    assert isinstance(WithCompose(), ComposedWeightLayer)


@pytest.mark.parametrize("cls", [RLRRLinear, ScaleShift, PACELinear])
def test_shipped_layers_implement_compose(cls):
    assert not inspect.isabstract(cls)
