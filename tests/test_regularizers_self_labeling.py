"""Regularized self-labeling: label correction schedule, checkpointing, reweighting, temperature."""

from __future__ import annotations

import math

import pytest
import torch

from peft_tsrs.regularizers import LabelCorrector, SelfLabeling, reweight_temperature, reweighted_loss
from peft_tsrs.regularizers.base import StepContext

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
    lc = _corrector()  # start_epoch=2: the second epoch, 1 <= state.epoch < 2
    assert lc.update(torch.arange(4), PROBS, epoch=0.99) == 0  # epoch number floor(0.99) + 1 = 1 < 2
    assert lc.num_corrected == 0
    assert lc.labels_for(torch.arange(4)).tolist() == [0, 1, 2, 1]
    assert lc.update(torch.arange(4), PROBS, epoch=1.0) == 1  # epoch number 2: on


def test_start_epoch_counts_from_one_like_the_official_code():
    from peft_tsrs.regularizers import epoch_number

    # state.epoch is 0-based and fractional; the official loop runs `for epoch in range(1, epochs + 1)`
    assert [epoch_number(e) for e in (0.0, 0.5, 0.999, 1.0, 8.99, 9.0, 9.5)] == [1, 1, 1, 2, 9, 10, 10]
    lc = LabelCorrector(torch.tensor([0, 1, 2, 1]), threshold=0.9, start_epoch=10)  # the paper's "epoch 10"
    assert not lc.active(8.99) and lc.update(torch.arange(4), PROBS, epoch=8.99) == 0  # the 9th epoch
    assert lc.active(9.0) and lc.update(torch.arange(4), PROBS, epoch=9.0) == 1  # the 10th epoch: 9 <= epoch < 10
    for start in (0, 1):  # both mean: from the very first step
        assert LabelCorrector(torch.tensor([0]), start_epoch=start).active(0.0)


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


# --- the regularizer: temperature per epoch, correction before the loss -----------------------------------------
def _step(epoch: float, logits=None, labels=(0, 1, 2, 1), records=None) -> StepContext:
    records = {} if records is None else records
    return StepContext(model=torch.nn.Identity(), inputs={}, labels=torch.tensor(labels),
                       indices=torch.arange(len(labels)), epoch=epoch, step=0, batch_size=len(labels), gather=lambda t: t,
                       record=lambda name, value: records.__setitem__(name, value), logits=logits)


def test_temperature_anneals_once_per_epoch():
    """Official: T = T0 during the first reweighted epochs, then after each 1-based epoch e > start ends
    T = T0·max(0.5, exp(−0.1(e − start))), constant within an epoch."""
    reg = SelfLabeling(reweight_start_epoch=5, reweight_temperature=2.0)
    losses = torch.tensor([1.0, 2.0, 3.0])
    expected = {
        3.99: None,  # the 4th epoch: no reweighting yet
        4.0: 2.0,  # the 5th epoch (official start): T0
        4.7: 2.0,
        5.0: 2.0,  # the 6th epoch: epoch 5 ended, 5 > 5 is false -> still T0
        5.9: 2.0,
        6.0: 2.0 * math.exp(-0.1),  # the 7th epoch: epoch 6 ended -> T0·e^{-0.1}
        6.99: 2.0 * math.exp(-0.1),  # constant within the epoch
        7.5: 2.0 * math.exp(-0.2),
        40.0: 1.0,  # floor T0/2
    }
    for epoch, temperature in expected.items():
        records: dict = {}
        out = reg.task_loss(losses, _step(epoch, records=records, labels=(0, 1, 2)))
        if temperature is None:
            assert out is None and "reweight_temperature" not in records, epoch
            continue
        assert records["reweight_temperature"] == pytest.approx(temperature), epoch
        assert out.item() == pytest.approx(reweighted_loss(losses, temperature).item()), epoch


def test_step_temperature_schedule_keeps_the_earlier_behaviour():
    from peft_tsrs.regularizers import scheduled_temperature

    # "step": the formula at every step from the 0-based start (start_epoch 6 here = 5 in earlier releases)
    for epoch in (5.0, 5.5, 6.25, 30.0):
        assert scheduled_temperature(2.0, epoch, 6, "step") == pytest.approx(reweight_temperature(2.0, epoch, 5))
    reg = SelfLabeling(reweight_start_epoch=6, reweight_temperature=2.0, temperature_schedule="step")
    records: dict = {}
    reg.task_loss(torch.tensor([1.0, 2.0, 3.0]), _step(6.5, records=records, labels=(0, 1, 2)))
    assert records["reweight_temperature"] == pytest.approx(2.0 * math.exp(-0.15))
    with pytest.raises(ValueError, match="schedule"):
        scheduled_temperature(1.0, 1.0, 1, "sometimes")


def test_relabel_corrects_before_the_loss():
    """Official: the labels are corrected first and the same batch trains on the corrected labels."""
    logits = PROBS.clamp_min(1e-6).log()  # softmax(log p) = p (renormalized; the rows already sum to ~1)
    reg = SelfLabeling(_corrector())
    step = _step(1.0, logits=logits)  # state.epoch 1.0: the 2nd epoch, correction on
    reg.prepare(step)
    assert step.labels.tolist() == [0, 1, 2, 1]
    reg.relabel(step)
    assert step.labels.tolist() == [1, 1, 2, 1]  # example 0 corrected before the task loss
    assert reg.corrector.num_corrected == 1
    reg.observe(step)  # nothing more after the loss
    assert reg.corrector.num_corrected == 1
    early = SelfLabeling(_corrector())
    step = _step(0.5, logits=logits)  # the first epoch: correction off
    early.prepare(step)
    early.relabel(step)
    assert step.labels.tolist() == [0, 1, 2, 1] and early.corrector.num_corrected == 0


def test_after_loss_timing_keeps_the_earlier_behaviour():
    logits = PROBS.clamp_min(1e-6).log()
    reg = SelfLabeling(_corrector(), correction_timing="after_loss")
    step = _step(1.0, logits=logits)
    reg.prepare(step)
    reg.relabel(step)
    assert step.labels.tolist() == [0, 1, 2, 1]  # this step trains on the stored label...
    reg.observe(step)
    assert reg.corrector.num_corrected == 1  # ...and the correction is used from the next visit on
    nxt = _step(1.5, logits=logits)
    reg.prepare(nxt)
    assert nxt.labels.tolist() == [1, 1, 2, 1]
