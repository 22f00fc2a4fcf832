"""Property-based tests (hypothesis): exact merge/unmerge and the distance projections over random shapes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from peft_tsrs import RLRRConfig
from peft_tsrs.regularizers import project_frobenius_, project_inf_op_
from peft_tsrs.tuners.rlrr import Linear as RLRRLinear

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, r=st.integers(1, 4), seed=st.integers(0, 10_000), bias=st.booleans())
def test_rlrr_merge_unmerge_exact(shape, r, seed, bias):
    out_f, in_f = shape
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    w0 = base.weight.detach().clone()
    b0 = None if base.bias is None else base.bias.detach().clone()
    layer = RLRRLinear(base, "default", RLRRConfig(r=r, init_weights="random"))
    x = torch.randn(3, in_f)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-4)
    layer.unmerge()
    assert torch.equal(base.weight, w0)
    assert (base.bias is None) == (b0 is None) and (b0 is None or torch.equal(base.bias, b0))
    assert torch.equal(layer(x), unmerged)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, radius=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_frobenius_projection(shape, radius, scale, seed):
    torch.manual_seed(seed)
    delta = torch.randn(*shape, dtype=torch.float64) * scale
    before = delta.clone()
    project_frobenius_(delta, radius)
    norm = torch.linalg.norm(delta)
    assert norm <= radius * (1 + 1e-6)  # the documented slack
    if torch.linalg.norm(before) <= radius * (1 + 1e-6):
        assert torch.equal(delta, before)
    else:
        assert abs(float(norm) - radius) <= 1e-9 * radius
        # the projection only rescales: the direction is kept
        torch.testing.assert_close(delta / norm, before / torch.linalg.norm(before))
    again = delta.clone()
    project_frobenius_(again, radius)
    torch.testing.assert_close(again, delta)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, radius=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_inf_op_projection(shape, radius, scale, seed):
    torch.manual_seed(seed)
    delta = torch.randn(*shape, dtype=torch.float64) * scale
    before = delta.clone()
    project_inf_op_(delta, radius)
    rows = delta.abs().sum(dim=1)
    assert (rows <= radius * (1 + 1e-6)).all()  # the documented slack
    inside = before.abs().sum(dim=1) <= radius * (1 + 1e-6)
    assert torch.equal(delta[inside], before[inside])
