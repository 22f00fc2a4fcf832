"""Two CPU processes under `accelerate launch` (gloo): regularizer state identical on every process, and the
deterministic run matches a single process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_train.py")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")

pytestmark = pytest.mark.slow


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _launch_two(out: str, mode: str, per_device_batch: int) -> list[dict]:
    _run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--main_process_port", "29517", SCRIPT, out, mode, str(per_device_batch)])
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]


def _single(out: str, mode: str, batch: int) -> dict:
    _run([sys.executable, SCRIPT, out, mode, str(batch)])
    return torch.load(os.path.join(out, "rank0.pt"), weights_only=False)


def test_two_processes_match_single_process(tmp_path):
    ranks = _launch_two(str(tmp_path / "ddp"), "deterministic", 4)
    assert [r["world"] for r in ranks] == [2, 2]
    # corrected labels and the PACE-fast store are identical on both processes
    assert torch.equal(ranks[0]["labels"], ranks[1]["labels"])
    assert torch.equal(ranks[0]["fast_store"], ranks[1]["fast_store"])
    assert (ranks[0]["labels"] != ranks[0]["labels"].new_tensor(ranks[0]["initial_labels"])).any()
    single = _single(str(tmp_path / "single"), "deterministic", 8)
    assert single["world"] == 1
    assert torch.equal(single["labels"], ranks[0]["labels"])
    torch.testing.assert_close(single["fast_store"], ranks[0]["fast_store"], atol=1e-5, rtol=1e-4)
    for a, b in zip(single["logs"], ranks[0]["logs"]):
        assert a["step"] == b["step"]
        for key in ("loss", "loss_task", "loss_pace"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for name, p in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ranks[1]["params"][name], p, atol=1e-5, rtol=1e-4)
    # the collapse check counts the predicted classes of the whole evaluation set on every process
    assert int(single["predicted_histogram"].sum()) == 32
    for r in ranks:
        assert torch.equal(r["predicted_histogram"], single["predicted_histogram"])
        assert r["predicted_classes"] == single["predicted_classes"]


def test_two_processes_with_stochastic_regularizers(tmp_path):
    """PACE-full and TSRS draw noise per process (and reweighting normalizes over each process's batch); state still
    agrees across processes and losses stay close to one process's."""
    ranks = _launch_two(str(tmp_path / "ddp"), "stochastic", 4)
    assert torch.equal(ranks[0]["labels"], ranks[1]["labels"])
    for name, p in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][name], p)  # DDP keeps replicas identical
    single = _single(str(tmp_path / "single"), "stochastic", 8)
    for a, b in zip(single["logs"], ranks[0]["logs"]):
        assert b["loss_task"] == pytest.approx(a["loss_task"], rel=0.05)
        assert all(torch.isfinite(torch.tensor(b[k])) for k in ("loss", "loss_pace", "loss_tsrs"))
    assert any("reweight_temperature" in h for h in ranks[0]["logs"])


def test_two_processes_match_single_process_on_a_causal_lm(tmp_path):
    """Token-level loss: each process's rows carry different numbers of supervised tokens; the update is the one of the
    whole batch's token mean (num_items_in_batch counted over both processes), as one process with batch 8 makes."""
    ranks = _launch_two(str(tmp_path / "ddp"), "causal_lm", 4)
    single = _single(str(tmp_path / "single"), "causal_lm", 8)
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    assert len(single["logs"]) == len(ranks[0]["logs"]) == 4
    for name, p in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][name], p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ranks[1]["params"][name], p, atol=1e-5, rtol=1e-4)
    for a, b in zip(single["logs"], ranks[0]["logs"]):
        assert b["loss_distance"] == pytest.approx(a["loss_distance"], rel=1e-4, abs=1e-7)
