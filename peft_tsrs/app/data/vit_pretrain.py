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

from ..locking import exclusive
from .fashion_mnist import FASHION_MNIST_CLASSES, normalize_images, read_fashion_mnist

MARKER = "PRETRAINING_COMPLETE"
METRICS_FILE = "pretrain_metrics.json"
_RECIPE = "v1"  # bump when the recipe below changes, so old caches are not reused
VIT_SIZES = {  # the backbone presets: "s" (0.5M parameters, every v1 result) and "m" (wider and deeper, 2.7M)
    "s": dict(image_size=28, patch_size=4, num_channels=1, hidden_size=128, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=256),
    "m": dict(image_size=28, patch_size=4, num_channels=1, hidden_size=192, num_hidden_layers=6,
              num_attention_heads=6, intermediate_size=384),
}


def default_cache_dir() -> Path:
    """``$PEFT_TSRS_CACHE`` or ``~/.cache/peft_tsrs``."""
    return Path(os.environ.get("PEFT_TSRS_CACHE") or Path.home() / ".cache" / "peft_tsrs")


def _folder_name(classes: Sequence[int], epochs: float, seed: int, max_train_examples: Optional[int],
                 size: str = "s", augment: bool = False, rotation_weight: float = 0.0) -> str:
    shape = VIT_SIZES[size]
    name = (f"fmnist-vit-{_RECIPE}-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-"
            f"c{''.join(str(c) for c in classes)}-e{epochs:g}-s{seed}")
    name += "-aug" if augment else ""
    name += f"-rot{rotation_weight:g}" if rotation_weight else ""
    return name if max_train_examples is None else f"{name}-n{max_train_examples}"


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (background-padded crop) and horizontal flip, per image."""
    n = len(x)
    background = x.amin()
    padded = nn.functional.pad(x, (2, 2, 2, 2), value=float(background))
    dx, dy = torch.randint(0, 5, (n,), generator=gen), torch.randint(0, 5, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(28))[:, :, None].expand(n, 28, 28)
    cols = (dx[:, None] + torch.arange(28))[:, None, :].expand(n, 28, 28)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


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
    root: Optional[str], batch_size: int, lr: float, verbose: bool, size: str = "s", augment: bool = False,
    rotation_weight: float = 0.0,
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
        **VIT_SIZES[size], num_labels=len(classes), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    model = ViTForImageClassification(config)
    # self-supervision (Gidaris et al., 2018): a 4-way rotation head on the [CLS] features of a rotated copy of the
    # batch, dropped after pretraining; it keeps features the 5 source classes alone would not need
    rotation_head = nn.Linear(config.hidden_size, 4) if rotation_weight else None
    steps = max(1, math.ceil(epochs * len(x_train) / batch_size))
    params = list(model.parameters()) + (list(rotation_head.parameters()) if rotation_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
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
        x = _augment(x_train[idx], gen) if augment else x_train[idx]
        loss = nn.functional.cross_entropy(model(pixel_values=x).logits, y_train[idx])
        if rotation_head is not None:
            turns = torch.randint(0, 4, (len(x),), generator=gen)
            rotated = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x, turns)])
            features = model.vit(pixel_values=rotated).last_hidden_state[:, 0]
            loss = loss + rotation_weight * nn.functional.cross_entropy(rotation_head(features), turns)
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
        "test_accuracy": accuracy, "train_seconds": round(seconds, 1), "recipe": _RECIPE, "size": size,
        "augment": augment, "rotation_weight": rotation_weight, "parameters": sum(p.numel() for p in model.parameters()),
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
    size: str = "s",
    augment: bool = False,
    rotation_weight: float = 0.0,
) -> str:
    """Path of a ``ViTForImageClassification`` pretrained on all training images of ``classes``, cached.

    The model (28x28 grey images, patch 4, hidden 128, 4 layers, 4 heads) is trained with AdamW and a cosine schedule,
    saved with ``save_pretrained`` together with ``pretrain_metrics.json`` (test accuracy on ``classes``), and reused
    on later calls with the same settings. A folder is only reused when its completion marker exists, so an
    interrupted pretraining is redone. ``force=True`` retrains. ``max_train_examples`` caps the training images (tests).
    ``size`` picks a preset of :data:`VIT_SIZES`; ``augment`` adds random 2-pixel shifts and flips;
    ``rotation_weight`` adds rotation prediction on a rotated copy of each batch (self-supervision).
    """
    if size not in VIT_SIZES:
        raise ValueError(f"size must be one of {sorted(VIT_SIZES)}, got {size!r}.")
    if not (math.isfinite(rotation_weight) and rotation_weight >= 0):
        raise ValueError(f"rotation_weight must be a finite number >= 0, got {rotation_weight}.")
    classes = [int(c) for c in classes]
    valid = all(0 <= c < len(FASHION_MNIST_CLASSES) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not valid:
        raise ValueError(f"classes must be distinct Fashion-MNIST labels in 0..9, got {classes}.")
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}.")
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = base / _folder_name(classes, epochs, seed, max_train_examples, size, augment, rotation_weight)
    if folder.exists() and (folder / MARKER).is_file() and not force:
        return str(folder)
    base.mkdir(parents=True, exist_ok=True)
    with exclusive(base / f".{folder.name}.lock"):  # processes sharing the cache pretrain it once
        if folder.exists() and (folder / MARKER).is_file() and not force:
            return str(folder)  # another process finished it while this one waited
        if folder.exists() and not (folder / MARKER).is_file() and verbose:
            print(f"[peft_tsrs] {folder} has no completion marker (interrupted run?); pretraining again.", flush=True)
        staging = base / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            root_str = None if root is None else str(root)
            _train(staging, classes, epochs, seed, max_train_examples, root_str, batch_size, lr, verbose, size, augment,
                   rotation_weight)
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


@torch.no_grad()
def frozen_features(encoder: nn.Module, pixel_values: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The features a classification head reads from a ViT encoder (``ViTModel``): the final layer-normed
    ``[CLS]`` state, frozen."""
    encoder.eval()
    return torch.cat([encoder(pixel_values=pixel_values[i : i + batch_size]).last_hidden_state[:, 0]
                      for i in range(0, len(pixel_values), batch_size)])


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> nn.Linear:
    """Multinomial logistic regression by L-BFGS on the full batch (the linear probe's classifier)."""
    probe = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(probe.weight), nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(x), y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def linear_probe_accuracy(
    model_path: str | os.PathLike,
    classes: Sequence[int] = (5, 6, 7, 8, 9),
    shots: int = 8,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    test_per_class: int = 200,
    l2: float = 1e-3,
    root: str | os.PathLike | None = None,
) -> dict:
    """Test accuracy of a linear classifier on a backbone's frozen features (:func:`frozen_features`), trained on
    ``shots`` images per class of ``classes`` drawn as the Fashion-MNIST task draws them (training images; test from
    the official test images), features standardised on the training shots. ``{"mean", "std", "per_seed"}``."""
    from transformers import ViTForImageClassification

    from .fashion_mnist import images_to_dataset
    from .splits import few_shot_split

    encoder = ViTForImageClassification.from_pretrained(str(model_path)).vit
    train_ds = images_to_dataset(*read_fashion_mnist("train", root))
    test_ds = images_to_dataset(*read_fashion_mnist("test", root))
    accuracies = []
    for seed in seeds:
        train = few_shot_split(train_ds, shots, 0, 0, seed=seed, classes=classes)["train"].with_format("torch")[:]
        test = few_shot_split(test_ds, 0, 0, test_per_class, seed=seed, classes=classes)["test"].with_format("torch")[:]
        x_train = frozen_features(encoder, train["pixel_values"])
        x_test = frozen_features(encoder, test["pixel_values"])
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        with torch.enable_grad():
            probe = _fit_logistic((x_train - mean) / std, train["label"], len(classes), l2)
        with torch.no_grad():
            predicted = probe((x_test - mean) / std).argmax(-1)
        accuracies.append(float((predicted == test["label"]).float().mean()))
    mean_acc = float(np.mean(accuracies))
    return {"mean": mean_acc, "std": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            "per_seed": accuracies}
