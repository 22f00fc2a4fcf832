"""Checks shared by the tuner test modules (RLRR, PACE)."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def base_weights(model) -> dict[str, torch.Tensor]:
    """Clones of every base-layer weight/bias under a tuner layer (names without the adapter wrapper)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            out[f"{name}.weight"] = base.weight.detach().clone()
            if getattr(base, "bias", None) is not None:
                out[f"{name}.bias"] = base.bias.detach().clone()
    return out


def assert_gradients_only_on_trainable(model, inputs, allowed_markers: tuple[str, ...]) -> None:
    """After a backward, exactly the trainable parameters have gradients, and each is an adapter/head param."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(**inputs).logits.square().sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad, "no parameter received a gradient"
    assert with_grad <= trainable
    assert all(any(m in n for m in allowed_markers) for n in trainable), sorted(trainable)
    model.zero_grad(set_to_none=True)
    model.eval()


def assert_merge_roundtrip(model, inputs, atol: float = 1e-5) -> None:
    """merged == unmerged outputs, and unmerge restores every base weight bit for bit."""
    model.eval()
    before = logits(model, inputs)
    weights = base_weights(model)
    model.merge_adapter()
    merged = logits(model, inputs)
    torch.testing.assert_close(merged, before, atol=atol, rtol=1e-4)
    model.unmerge_adapter()
    for name, w in base_weights(model).items():
        assert torch.equal(w, weights[name]), f"unmerge did not restore {name}"
    assert set(base_weights(model)) == set(weights)
    torch.testing.assert_close(logits(model, inputs), before, atol=0, rtol=0)
