"""Regularized self-labeling: label correction schedule, checkpointing, reweighting, temperature."""

from __future__ import annotations

import math

import pytest
import torch

from peft_tsrs.regularizers import LabelCorrector, reweight_temperature, reweighted_loss

PROBS = torch.tensor(
    [
        [0.05, 0.95, 0.00],  # example 0, label 0: confident (0.95 > 0.9) and disagrees -> corrected to 1
        [0.85, 0.15, 0.00],  # example 1, label 1: disagrees but 0.85 <= 0.9 -> kept
        [0.00, 0.02, 0.98],  # example 2, label 2: confident but agrees -> kept
        [0.90, 0.10, 0.00],  # example 3, label 1: exactly 0.9 is not > 0.9 -> kept
    ]
)


def _corrector(**kw) -> LabelCorrector:
    return LabelCorrector(torch.tensor([0, 1, 2, 1]), threshold=0.9, start_epoch=2, **kw)


def test_nothing_changes_before_start_epoch():
    lc = _corrector()
    assert lc.update(torch.arange(4), PROBS, epoch=1.99) == 0  # int(1.99) = 1 < 2
    assert lc.num_corrected == 0
    assert lc.labels_for(torch.arange(4)).tolist() == [0, 1, 2, 1]


def test_threshold_and_disagreement_respected():
    lc = _corrector()
    assert lc.update(torch.arange(4), PROBS, epoch=2.0) == 1
    assert lc.labels_for(torch.arange(4)).tolist() == [1, 1, 2, 1]
    assert lc.num_corrected == 1
    assert lc.update(torch.arange(4), PROBS, epoch=3.5) == 0  # already corrected: argmax == stored label
    # the correction persists and can go back: a confident prediction of the original label restores it
    assert lc.update(torch.tensor([0]), torch.tensor([[0.99, 0.01, 0.0]]), epoch=4) == 1
    assert lc.num_corrected == 0


def test_batch_subset_duplicates_and_device():
    lc = _corrector()
    probs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert lc.update(torch.tensor([3, 3]), probs, epoch=2) == 1  # one example changed, counted once
    assert lc.labels_for(torch.tensor([3, 0])).tolist() == [2, 0]
    assert lc.labels_for(torch.tensor([1])).dtype == torch.long


def test_state_round_trip_and_size_check():
    lc = _corrector()
    lc.update(torch.arange(4), PROBS, epoch=2)
    fresh = _corrector()
    fresh.load_state_dict(lc.state_dict())
    assert fresh.labels.tolist() == [1, 1, 2, 1] and fresh.num_corrected == 1
    with pytest.raises(ValueError, match="holds 5 labels but the checkpoint has 4"):
        LabelCorrector(torch.zeros(5, dtype=torch.long)).load_state_dict(lc.state_dict())


def test_errors():
    lc = _corrector(index_column="example_idx")
    with pytest.raises(ValueError, match=r"index 4 from column 'example_idx'"):
        lc.labels_for(torch.tensor([4]))
    with pytest.raises(ValueError, match=r"index -1 from column 'example_idx'"):
        lc.update(torch.tensor([-1]), PROBS[:1], epoch=5)
    with pytest.raises(ValueError, match=r"\(batch, num_classes\)"):
        lc.update(torch.arange(3), PROBS, epoch=5)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        LabelCorrector(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="threshold"):
        LabelCorrector(torch.tensor([0, 1]), threshold=1.5)


def test_temperature_schedule_values():
    assert reweight_temperature(2.0, epoch=5, start_epoch=5) == pytest.approx(2.0)  # exp(0) = 1
    assert reweight_temperature(2.0, epoch=10, start_epoch=5) == pytest.approx(2.0 * math.exp(-0.5))  # 1.21306
    assert reweight_temperature(2.0, epoch=10, start_epoch=5) == pytest.approx(1.2130613)
    assert reweight_temperature(2.0, epoch=20, start_epoch=5) == pytest.approx(1.0)  # exp(-1.5)=0.22 -> floor 0.5
    assert reweight_temperature(2.0, epoch=11.9315, start_epoch=5) == pytest.approx(1.0, abs=1e-4)  # ln 2 / 0.1
    assert reweight_temperature(1.0, epoch=3, start_epoch=5) == pytest.approx(math.exp(0.2))  # formula as written


def test_reweighted_loss_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    # T = 1: w ∝ (e^-1, e^-2, e^-3) = (0.367879, 0.135335, 0.049787), Σ = 0.553001
    # w = (0.665241, 0.244728, 0.090031) ; Σ w l = 0.665241 + 0.489456 + 0.270093 = 1.424790
    out = reweighted_loss(losses, temperature=1.0)
    assert out.item() == pytest.approx(1.424790, rel=1e-5)
    out.backward()  # no gradient through the weights: d/dl_i = w_i
    torch.testing.assert_close(losses.grad, torch.tensor([0.665241, 0.244728, 0.090031]), atol=1e-6, rtol=1e-5)
    assert losses.grad.sum().item() == pytest.approx(1.0)  # weights sum to 1
    assert losses.grad[0] > losses.grad[1] > losses.grad[2]  # lower loss, higher weight


def test_reweighted_loss_limits_and_errors():
    losses = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert reweighted_loss(losses, 3.0).item() == pytest.approx(0.5)  # equal losses: plain mean
    hot = reweighted_loss(torch.tensor([1.0, 3.0]), 1e6)
    assert hot.item() == pytest.approx(2.0, rel=1e-4)  # T -> inf: the mean
    with pytest.raises(ValueError, match="temperature"):
        reweighted_loss(losses, 0.0)
    with pytest.raises(ValueError, match="1-D"):
        reweighted_loss(losses.reshape(2, 2), 1.0)
