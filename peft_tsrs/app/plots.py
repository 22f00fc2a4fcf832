"""PNG plots of training curves and of run comparisons (matplotlib, headless)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "loss_task", "loss_tsrs", "loss_bss", "loss_pace", "loss_distance")


def plot_training_curves(history: list[dict[str, Any]], path: str, title: str = "", metric: str = "accuracy") -> str:
    """Loss components per step (left) and the validation ``metric`` per epoch (right)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in LOSS_KEYS:
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax_loss.plot(*zip(*points), label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    acc = [(h["epoch"], h[f"eval_{metric}"]) for h in history if f"eval_{metric}" in h]
    if acc:
        ax_acc.plot(*zip(*acc), marker="o")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"validation {metric.replace('_', ' ')}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_comparison(rows: list[dict[str, Any]], path: str, metric: str = "test_score") -> str:
    """A bar per run of ``metric`` (mean with std error bars when several seeds share a label); the y label names
    the runs' score (``test accuracy``, ``test exact match``)."""
    labels = [r["label"] for r in rows]
    means = [r[metric] for r in rows]
    errors = [r.get(f"{metric}_std", 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.6))
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    names = sorted({r.get("metric", "accuracy") for r in rows})
    label = metric.replace("score", "/".join(names)) if metric.endswith("score") else metric
    ax.set_ylabel(label.replace("_", " "))
    low = min(means) if means else 0
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(means, default=1) + 0.05))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
