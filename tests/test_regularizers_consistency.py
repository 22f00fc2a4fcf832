"""PACE consistency: the MSE term, shared dropout, the fast store and the lazy schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_tsrs.regularizers import FastConsistencyStore, consistency_mse, lazy_should_apply, shared_dropout


def test_consistency_mse_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    # row 0: 0² + 2² + 2² = 8 ; row 1: 1 + 1 + 1 = 3 ; mean over the batch = (8 + 3) / 2 = 5.5
    assert consistency_mse(a, b).item() == pytest.approx(5.5)
    # leading dims are flattened into the batch: same rows, same value
    assert consistency_mse(a.reshape(2, 1, 3), b.reshape(2, 1, 3)).item() == pytest.approx(5.5)
    assert consistency_mse(a, a).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        consistency_mse(a, b[:, :2])


def test_consistency_mse_gradient():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    consistency_mse(a, b).backward()
    # d/da mean_n Σ_c (a−b)² = 2 (a − b) / N with N = 2
    torch.testing.assert_close(a.grad, (a.detach() - b))


# --- shared dropout ----------------------------------------------------------------------------------------
def test_shared_dropout_tiles_one_mask_over_copies():
    drop = nn.Dropout(0.5).train()
    x = torch.ones(6, 50)
    torch.manual_seed(0)
    with shared_dropout(rows=2):
        y = drop(x)  # 3 copies of 2 rows
        assert torch.equal(y[:2], y[2:4]) and torch.equal(y[:2], y[4:])
        assert set(y.unique().tolist()) == {0.0, 2.0}  # inverted dropout scaling 1 / (1 − p)
        own = drop(torch.ones(2, 50))  # the rows themselves (before a copy is made): ordinary dropout
        assert not torch.equal(own[0], own[1])
        assert F.dropout(torch.ones(5, 50), 0.5).shape == (5, 50)  # not a stack of copies: ordinary
        drop.eval()
        assert torch.equal(drop(x), x)  # eval: identity
        assert torch.equal(F.dropout(x, 0.5, training=False), x)
    drop.train()
    y = drop(x)  # restored: independent masks
    assert not torch.equal(y[:2], y[2:4])


def test_shared_dropout_restores_on_exception_and_validates():
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    with pytest.raises(RuntimeError):
        with shared_dropout(rows=3):
            assert F.dropout is not dropout
            raise RuntimeError("boom")
    assert F.dropout is dropout and F.scaled_dot_product_attention is sdpa
    with pytest.raises(ValueError, match="rows must be >= 1"):
        with shared_dropout(rows=0):
            pass


def test_shared_dropout_inside_sdpa_matches_the_math_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    q, k, v = (torch.cat([t, t], 0) for t in (q, k, v))
    mask = torch.zeros(4, 1, 5, 5)
    mask[..., -1] = float("-inf")
    with shared_dropout(rows=2):
        torch.manual_seed(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
        assert torch.equal(out[:2], out[2:])
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # no dropout: the kernel itself
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # the same mask drawn by hand reproduces the output
    torch.manual_seed(1)
    keep = torch.empty(2, 2, 5, 5).bernoulli_(0.7).div_(0.7).repeat(2, 1, 1, 1)
    probs = ((q @ k.transpose(-2, -1)) / 2.0 + mask).softmax(-1)
    torch.testing.assert_close(out, (probs * keep) @ v)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_dropout_identical_copies_on_tiny_models(tiny, attn):
    make, inputs_fn, _ = tiny
    model = make(layers=2, attention_dropout=0.1)
    model.set_attn_implementation(attn)
    model.train()
    inputs = {k: torch.cat([v, v], 0) for k, v in inputs_fn().items()}
    torch.manual_seed(0)
    plain = model(**inputs).logits
    assert not torch.allclose(plain[:4], plain[4:])  # independent masks differ
    with shared_dropout(rows=4):
        shared = model(**inputs).logits
    assert torch.equal(shared[:4], shared[4:])
    # attention-probability dropout alone (inside the attention kernel for "sdpa") is shared as well
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and not name.endswith("attention.self.dropout"):
            m.p = 0.0
    plain = model(**inputs).logits
    assert not torch.allclose(plain[:4], plain[4:])
    with shared_dropout(rows=4):
        shared = model(**inputs).logits
    assert torch.equal(shared[:4], shared[4:])


# --- PACE-fast store ----------------------------------------------------------------------------------------
def test_fast_store_by_hand():
    store = FastConsistencyStore(num_examples=3, num_classes=2)
    logits = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    # first visit: the store is zero -> mean of Σ logits² = ((1 + 4) + (9 + 1)) / 2 = 7.5
    loss = store.loss_and_update(torch.tensor([0, 2]), logits)
    assert loss.item() == pytest.approx(7.5)
    loss.backward()
    torch.testing.assert_close(logits.grad, logits.detach())  # 2·(a − 0)/2
    torch.testing.assert_close(store.stored, torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]))
    assert not store.stored.requires_grad
    # second visit of example 2: (2 − 3)² + (0 − (−1))² = 1 + 1 = 2
    second = torch.tensor([[2.0, 0.0]], requires_grad=True)
    loss = store.loss_and_update(torch.tensor([2]), second)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(second.grad, torch.tensor([[-2.0, 2.0]]))  # stored logits detached
    torch.testing.assert_close(store.stored[2], torch.tensor([2.0, 0.0]))


def test_fast_store_checkpoint_round_trip():
    store = FastConsistencyStore(4, 3)
    store.update(torch.tensor([1, 3]), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    state = store.state_dict()
    fresh = FastConsistencyStore(4, 3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.stored, store.stored)
    state["stored"][0, 0] = 99.0  # the state is a copy
    assert fresh.stored[0, 0] == 0.0
    with pytest.raises(ValueError, match="dataset size or number of classes changed"):
        FastConsistencyStore(5, 3).load_state_dict(store.state_dict())


def test_fast_store_errors():
    store = FastConsistencyStore(3, 2, index_column="example_idx")
    store.check_size(3)
    with pytest.raises(ValueError, match="PACE-fast store holds 3 examples but the dataset has 4"):
        store.check_size(4)
    with pytest.raises(ValueError, match=r"index 3 from column 'example_idx'"):
        store.loss_and_update(torch.tensor([0, 3]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"index -1"):
        store.loss_and_update(torch.tensor([-1, 0]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        store.loss_and_update(torch.tensor([0]), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="one example index per row"):
        store.loss_and_update(torch.tensor([0, 1, 2]), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        FastConsistencyStore(0, 2)


def test_lazy_schedule():
    assert [lazy_should_apply(s, 3) for s in range(7)] == [True, False, False, True, False, False, True]
    assert all(lazy_should_apply(s, 1) for s in range(5))
    with pytest.raises(ValueError, match="every must be >= 1"):
        lazy_should_apply(0, 0)
