"""The Fashion-MNIST transfer setting: a small ViT pretrained on some classes, fine-tuned few-shot on the others.

No pretrained vision transformer can be installed offline, so :func:`pretrained_fmnist_vit` trains one (about 90 s for
2 epochs on 2 CPU cores) and caches it. Fine-tune it with::

    path = pretrained_fmnist_vit()                      # classes 0..4
    model = AutoModelForImageClassification.from_pretrained(path, num_labels=5, ignore_mismatched_sizes=True)
    splits = few_shot_split(load_fashion_mnist("train"), 10, 10, None, seed=0, classes=[5, 6, 7, 8, 9])
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .fashion_mnist import FASHION_MNIST_CLASSES, normalize_images, read_fashion_mnist

MARKER = "PRETRAINING_COMPLETE"
METRICS_FILE = "pretrain_metrics.json"
_RECIPE = "v1"  # bump when the recipe below changes, so old caches are not reused
VIT_SIZE = dict(
    image_size=28, patch_size=4, num_channels=1, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=256,
)


def default_cache_dir() -> Path:
    """``$PEFT_TSRS_CACHE`` or ``~/.cache/peft_tsrs``."""
    return Path(os.environ.get("PEFT_TSRS_CACHE") or Path.home() / ".cache" / "peft_tsrs")


def _folder_name(classes: Sequence[int], epochs: float, seed: int, max_train_examples: Optional[int]) -> str:
    name = f"fmnist-vit-{_RECIPE}-h128-l4-c{''.join(str(c) for c in classes)}-e{epochs:g}-s{seed}"
    return name if max_train_examples is None else f"{name}-n{max_train_examples}"


def _class_subset(images: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images of ``classes`` and their labels relabelled ``0..k-1`` in the order given."""
    lookup = np.full(len(FASHION_MNIST_CLASSES), -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    keep = lookup[labels] >= 0
    return torch.from_numpy(normalize_images(images[keep])), torch.from_numpy(lookup[labels[keep]])


def _lr_lambda(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(pixel_values=x[start : start + batch_size]).logits
        correct += int((logits.argmax(-1) == y[start : start + batch_size]).sum())
    return correct / max(1, len(x))


def _train(
    folder: Path, classes: Sequence[int], epochs: float, seed: int, max_train_examples: Optional[int],
    root: Optional[str], batch_size: int, lr: float, verbose: bool,
) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    log = print if verbose else (lambda *a, **k: None)
    x_train, y_train = _class_subset(*read_fashion_mnist("train", root), classes)
    x_test, y_test = _class_subset(*read_fashion_mnist("test", root), classes)
    gen = torch.Generator().manual_seed(seed)
    if max_train_examples is not None and max_train_examples < len(x_train):
        pick = torch.randperm(len(x_train), generator=gen)[:max_train_examples]
        x_train, y_train = x_train[pick], y_train[pick]
    names = [FASHION_MNIST_CLASSES[c] for c in classes]
    torch.manual_seed(seed)
    config = ViTConfig(
        **VIT_SIZE, num_labels=len(classes), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    model = ViTForImageClassification(config)
    steps = max(1, math.ceil(epochs * len(x_train) / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, max(1, steps // 20)))
    log(f"[peft_tsrs] pretraining a ViT on Fashion-MNIST classes {list(classes)}: {len(x_train)} images, "
        f"{steps} steps of batch {batch_size} -> {folder}", flush=True)
    start, order, cursor, running = time.time(), torch.randperm(len(x_train), generator=gen), 0, 0.0
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order) and cursor > 0:
            order, cursor = torch.randperm(len(x_train), generator=gen), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = nn.functional.cross_entropy(model(pixel_values=x_train[idx]).logits, y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            log(f"[peft_tsrs]   step {step + 1}/{steps}  loss {running:.4f}  {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    accuracy = _accuracy(model, x_test, y_test)
    log(f"[peft_tsrs] pretraining done in {seconds:.0f}s; test accuracy on classes {list(classes)}: {accuracy:.4f}",
        flush=True)
    model.save_pretrained(folder)
    metrics = {
        "classes": list(classes), "class_names": names, "epochs": epochs, "steps": steps, "batch_size": batch_size,
        "lr": lr, "seed": seed, "train_examples": len(x_train), "test_examples": len(x_test),
        "test_accuracy": accuracy, "train_seconds": round(seconds, 1), "recipe": _RECIPE,
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))


def pretrained_fmnist_vit(
    cache_dir: str | os.PathLike | None = None,
    classes: Sequence[int] = (0, 1, 2, 3, 4),
    epochs: float = 2.0,
    seed: int = 0,
    force: bool = False,
    max_train_examples: Optional[int] = None,
    root: str | os.PathLike | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    verbose: bool = True,
) -> str:
    """Path of a ``ViTForImageClassification`` pretrained on all training images of ``classes``, cached.

    The model (28x28 grey images, patch 4, hidden 128, 4 layers, 4 heads) is trained with AdamW and a cosine schedule,
    saved with ``save_pretrained`` together with ``pretrain_metrics.json`` (test accuracy on ``classes``), and reused
    on later calls with the same settings. A folder is only reused when its completion marker exists, so an
    interrupted pretraining is redone. ``force=True`` retrains. ``max_train_examples`` caps the training images (tests).
    """
    classes = [int(c) for c in classes]
    valid = all(0 <= c < len(FASHION_MNIST_CLASSES) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not valid:
        raise ValueError(f"classes must be distinct Fashion-MNIST labels in 0..9, got {classes}.")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}.")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = base / _folder_name(classes, epochs, seed, max_train_examples)
    if folder.exists() and (folder / MARKER).is_file() and not force:
        return str(folder)
    if folder.exists() and not (folder / MARKER).is_file() and verbose:
        print(f"[peft_tsrs] {folder} has no completion marker (interrupted run?); pretraining again.", flush=True)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        root_str = None if root is None else str(root)
        _train(staging, classes, epochs, seed, max_train_examples, root_str, batch_size, lr, verbose)
        (staging / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not a concurrent run finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)
