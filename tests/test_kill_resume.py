"""A run killed with SIGKILL mid-epoch and resumed from its last checkpoint ends with the same adapter weights and
regularizer state as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "kill_resume_train.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def _train(out: str, *flags: str) -> None:
    proc = subprocess.run([sys.executable, SCRIPT, out, *flags], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    _train(reference)

    proc = subprocess.Popen([sys.executable, SCRIPT, killed, "--slow"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    step = 0
    for line in proc.stdout:  # 3 steps per epoch; kill mid-epoch 2, after checkpoint-4 was written
        if line.startswith("step "):
            step = int(line.split()[1])
        if step >= 5 and os.path.isdir(os.path.join(killed, "checkpoint-4")):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(killed, "final.pt"))
    time.sleep(0.1)

    _train(killed, "--resume")
    ref = torch.load(os.path.join(reference, "final.pt"), weights_only=False)
    res = torch.load(os.path.join(killed, "final.pt"), weights_only=False)
    for name, p in ref["params"].items():
        torch.testing.assert_close(res["params"][name], p, atol=1e-6, rtol=1e-5, msg=name)
    assert torch.equal(ref["state"]["label_corrector"]["labels"], res["state"]["label_corrector"]["labels"])
    torch.testing.assert_close(ref["state"]["fast_store"]["stored"], res["state"]["fast_store"]["stored"])
