"""TSRS noise stability: hooks, batch duplication, hand-rolled reference, eval mode, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import bert_inputs, make_tiny_bert
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_tsrs import RegularizerConfig
from peft_tsrs.regularizers import NoiseStability, relative_perturbation


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _hook_count(blocks: nn.ModuleList) -> int:
    return sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in blocks)


# --- the functional term -----------------------------------------------------------------------------
def test_relative_perturbation_by_hand():
    clean = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ‖clean‖_F = sqrt(9 + 16) = 5
    noisy = torch.tensor([[3.0, 1.0], [2.0, 4.0]])  # diff = [[0, 1], [2, 0]] -> ‖diff‖_F = sqrt(1 + 4) = sqrt(5)
    assert relative_perturbation(clean, noisy).item() == pytest.approx(math.sqrt(5) / 5)


def test_relative_perturbation_guards_zero_and_half():
    zero = torch.zeros(2, 3)
    out = relative_perturbation(zero, zero)
    assert torch.isfinite(out) and out.item() == 0.0
    big = torch.full((64, 64), 300.0, dtype=torch.float16)  # ‖big‖ overflows fp16 (> 65504)
    out = relative_perturbation(big, big + 3.0)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="shape"):
        relative_perturbation(torch.zeros(2), torch.zeros(3))


# --- validation ------------------------------------------------------------------------------------------
def test_invalid_layers_and_values():
    model = make_tiny_bert(layers=4)
    with pytest.raises(ValueError, match=r"inject_layer=4.*4 blocks.*\[0, 3\]"):
        NoiseStability(model, inject_layer=4)
    with pytest.raises(ValueError, match=r"inject_layer=-1"):
        NoiseStability(model, inject_layer=-1)
    with pytest.raises(ValueError, match=r"measure_from=1.*\[inject_layer=2, 3\].*4 blocks"):
        NoiseStability(model, inject_layer=2, measure_from=1)
    with pytest.raises(ValueError, match="measure_from=4"):
        NoiseStability(model, inject_layer=2, measure_from=4)
    # σ and λ are validated once, by the config the trainer builds NoiseStability from
    with pytest.raises(ValueError, match="tsrs_noise_std"):
        RegularizerConfig(tsrs_weight=1.0, tsrs_noise_std=-0.1)
    with pytest.raises(ValueError, match="tsrs_weight"):
        RegularizerConfig(tsrs_weight=-1.0)


# --- on the tiny models -----------------------------------------------------------------------------------
def _reference(model, blocks, inputs, inject, measure_from, sigma, weight):
    """Run the model once with capture, then recompute every term block by block on batch B."""
    ns = NoiseStability(model, inject_layer=inject, measure_from=measure_from, noise_std=sigma, weight=weight)
    seen: dict[int, tuple] = {}

    def spy(i):
        def hook(mod, args, kwargs):
            seen[i] = (args, kwargs)
        return hook

    # clean forward: record every block's inputs at batch B (masks etc.) to replay them by hand
    handles = [b.register_forward_pre_hook(spy(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        clean_logits = model(**inputs).logits
    clean_inputs = dict(seen)
    for h in handles:
        h.remove()

    with ns.capture():
        # registered after ns's hook, so it sees the duplicated (clean ‖ noisy) input of block I
        handle = blocks[inject].register_forward_pre_hook(spy(-1), with_kwargs=True)
        out = model(**inputs)
        handle.remove()
    both = seen[-1][0][0]
    batch = inputs[next(iter(inputs))].shape[0]
    h_clean, h_noisy = both[:batch], both[batch:]

    terms = []
    with torch.no_grad():
        a, b = h_clean, h_noisy
        for i in range(inject, len(blocks)):
            args, kwargs = clean_inputs[i]
            a = blocks[i](a, *args[1:], **kwargs)
            b = blocks[i](b, *args[1:], **kwargs)
            a = a[0] if isinstance(a, tuple) else a
            b = b[0] if isinstance(b, tuple) else b
            if i >= measure_from:
                diff = (b - a).flatten()
                terms.append(math.sqrt(float((diff * diff).sum())) / math.sqrt(float((a.flatten() ** 2).sum())))
    return ns, out, clean_logits, h_clean, h_noisy, weight * sum(terms) / len(terms)


@pytest.mark.parametrize("inject,measure_from", [(0, None), (1, 2), (2, 3)])
def test_loss_matches_hand_rolled_reference(tiny, inject, measure_from):
    make, inputs_fn, _ = tiny
    model = _no_dropout(make(layers=4)).train()
    from peft_tsrs.regularizers import find_blocks

    _, blocks = find_blocks(model)
    inputs = inputs_fn(batch=3)
    ns, out, clean_logits, h_clean, h_noisy, expected = _reference(
        model, blocks, inputs, inject, inject if measure_from is None else measure_from, 0.2, 0.7
    )
    assert _hook_count(blocks) == 0  # hooks removed after the context
    assert ns.active_batch == 3 and out.logits.shape[0] == 6
    clean, noisy = ns.split(out.logits)
    torch.testing.assert_close(clean, clean_logits, atol=1e-5, rtol=1e-5)  # the clean half is the plain forward
    assert not torch.allclose(clean, noisy)
    noise = (h_noisy - h_clean).detach() / 0.2
    assert abs(float(noise.std()) - 1.0) < 0.25 and abs(float(noise.mean())) < 0.25
    assert len(ns._records) == 4 - (inject if measure_from is None else measure_from)
    assert ns.loss().item() == pytest.approx(expected, rel=1e-4)


def test_zero_noise_gives_zero_loss(tiny):
    make, inputs_fn, _ = tiny
    model = _no_dropout(make(layers=2)).train()
    ns = NoiseStability(model, inject_layer=0, noise_std=0.0)
    with ns.capture():
        out = model(**inputs_fn())
    clean, noisy = ns.split(out.logits)
    torch.testing.assert_close(clean, noisy, atol=1e-6, rtol=0)
    assert ns.loss().item() == pytest.approx(0.0, abs=1e-6)


def test_eval_mode_does_nothing(tiny):
    make, inputs_fn, _ = tiny
    model = make(layers=2).eval()
    ns = NoiseStability(model, inject_layer=0)
    with torch.no_grad():
        plain = model(**inputs_fn()).logits
        with ns.capture():
            out = model(**inputs_fn()).logits
    assert out.shape == plain.shape == (4, 3)
    torch.testing.assert_close(out, plain)
    assert ns.active_batch is None
    with pytest.raises(RuntimeError, match="training mode"):
        ns.loss()
    with pytest.raises(RuntimeError, match="capture"):
        ns.split(out)


def test_hooks_removed_on_exception(tiny):
    make, inputs_fn, _ = tiny
    model = make(layers=3).train()
    ns = NoiseStability(model, inject_layer=1)
    with pytest.raises(KeyError):
        with ns.capture():
            assert _hook_count(ns.blocks) > 0
            raise KeyError("boom")
    assert _hook_count(ns.blocks) == 0
    out = model(**inputs_fn()).logits  # a forward outside the context is untouched
    assert out.shape[0] == 4


def test_gradients_reach_blocks_below_injection(tiny):
    make, inputs_fn, _ = tiny
    model = make(layers=3).train()
    ns = NoiseStability(model, inject_layer=2)
    with ns.capture():
        model(**inputs_fn())
    ns.loss().backward()
    below = [p.grad for p in ns.blocks[0].parameters() if p.requires_grad]
    assert below and any(g is not None and g.abs().sum() > 0 for g in below)
    emb = [p.grad for n, p in model.named_parameters() if "embeddings" in n and p.ndim >= 2]
    assert any(g is not None and g.abs().sum() > 0 for g in emb)


def test_gradient_checkpointing_gives_same_gradients():
    inputs = bert_inputs()
    grads = []
    for checkpointing in (False, True):
        model = _no_dropout(make_tiny_bert(layers=3)).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ns = NoiseStability(model, inject_layer=1)
        torch.manual_seed(123)
        with ns.capture():
            model(**inputs)
        ns.loss().backward()
        grads.append(model.bert.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_works_on_peft_wrapped_model():
    model = get_peft_model(make_tiny_bert(layers=3), LoraConfig(target_modules=["query", "value"], r=2))
    model.train()
    ns = NoiseStability(model, inject_layer=1)
    assert ns.block_path == "bert.encoder.layer"
    with ns.capture():
        out = model(**bert_inputs())
    assert out.logits.shape[0] == 8
    ns.loss().backward()
    lora_b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert lora_b.grad is not None


# --- kwargs, tuples and non-batch tensors ------------------------------------------------------------------
class _ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, hidden_states, mask=None, pos=None, cache_position=None):
        assert mask.shape[0] == hidden_states.shape[0], "mask must follow the batch"
        assert pos[0].shape[0] == hidden_states.shape[0] and pos[1].shape[0] == 1
        assert cache_position.shape == (3,), "cache_position has no batch dimension, even when its length is B"
        return (self.lin(hidden_states) * mask[..., None] + pos[0], "extra")


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_ToyBlock() for _ in range(3)])
        self.head = nn.Linear(4, 2)

    def forward(self, x, mask):
        pos = (torch.ones_like(x), torch.zeros(1, *x.shape[1:]))
        cache_position = torch.arange(3)
        for layer in self.layers:
            x = layer(hidden_states=x, mask=mask, pos=pos, cache_position=cache_position)[0]
        return self.head(x.mean(1))


def test_hidden_states_kwarg_tuples_and_non_batch_tensors():
    torch.manual_seed(0)
    model = _Toy().train()
    ns = NoiseStability(model, inject_layer=1, measure_from=1, noise_std=0.5)
    x, mask = torch.randn(3, 5, 4), torch.ones(3, 5)
    with ns.capture():
        logits = model(x, mask)
    assert logits.shape == (6, 2) and ns.active_batch == 3
    assert len(ns._records) == 2
    assert ns.loss().item() > 0


def test_release_drops_recorded_activations(tiny):
    make, inputs_fn, _ = tiny
    model = _no_dropout(make(layers=2)).train()
    ns = NoiseStability(model, inject_layer=0, noise_std=0.1)
    with ns.capture():
        out = model(**inputs_fn(batch=2))
        loss = ns.loss()
        ns.release()
    assert ns._records == []
    loss.backward()  # the graph built before release still backpropagates
    clean, noisy = ns.split(out.logits)  # splitting still works after release
    assert clean.shape == noisy.shape
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        ns.loss()
