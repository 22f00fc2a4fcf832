"""The collapse probe: trains LoRA + TSRS on the shipped WordNet / MiniLM assets for 2 steps and measures it."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `benchmarks` without `python -m`

from benchmarks import collapse_probe  # noqa: E402


def test_collapse_probe_measures_every_layer_on_a_tiny_budget(tmp_path):
    tiny = ["task.classes=[2, 3, 4]", "task.shots_per_class=2", "task.val_per_class=2", "task.test_per_class=3",
            "task.max_length=32", "training.logging_steps=1"]
    rows = collapse_probe.main(["--weights", "0.1", "0", "--steps", "2", "--override", *tiny, "--out", str(tmp_path)])
    assert [r["tsrs_weight"] for r in rows] == [0.1, 0.0]
    for r in rows:
        assert r["steps"] == 2 and r["num_labels"] == 3 and 1 <= r["predicted_classes"] <= 3
        assert len(r["cls_spread"]) == 7  # MiniLM: embeddings + 6 blocks
        assert r["cls_spread"][0] == pytest.approx(0.0, abs=1e-6)  # the [CLS] embedding is the same for every input
        assert all(s > 0 for s in r["cls_spread"][1:]) and math.isfinite(r["last_task_loss"])
    data = json.loads((tmp_path / "collapse_probe.json").read_text())
    assert data["rows"] == rows and data["meta"]["steps"] == 2
    assert "| 0.1 | 0.0000 |" in (tmp_path / "collapse_probe.md").read_text()
    with pytest.raises(SystemExit):
        collapse_probe.main(["--steps", "0"])
