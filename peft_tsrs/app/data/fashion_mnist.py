"""Fashion-MNIST from its gzip idx files as a ``datasets.Dataset`` of normalised float images."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "sudo apt-get update && sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN, STD = 0.2860, 0.3530
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # idx3 ubyte, idx1 ubyte
_PREFIX = {"train": "train", "test": "t10k"}

Split = Literal["train", "test"]


def _open_idx(root: Path, name: str) -> bytes:
    """Bytes of ``name`` (``.gz`` preferred, an uncompressed copy accepted)."""
    for candidate, opener in ((root / f"{name}.gz", gzip.open), (root / name, open)):
        if candidate.is_file():
            try:
                with opener(candidate, "rb") as handle:
                    return handle.read()
            except (OSError, EOFError) as err:
                raise ValueError(f"{candidate} is corrupted ({err}); reinstall with `{INSTALL_HINT}`.") from err
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}.gz not found in {root}. Install the data with `{INSTALL_HINT}` "
        "or pass root= to a folder holding the four *-ubyte.gz files."
    )


def _parse_idx(raw: bytes, magic: int, ndim: int, where: str) -> np.ndarray:
    """Check the idx header (magic number, sizes) and return the uint8 payload with its shape."""
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{where}: file too short for an idx header; the file is corrupted.")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(
            f"{where}: bad magic number {found} (expected {magic}); the file is corrupted or not an idx "
            f"file. Reinstall with `{INSTALL_HINT}`."
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{where}: header says shape {shape} ({expected} bytes) but holds {len(raw) - header} bytes; the file "
            f"is truncated or corrupted. Reinstall with `{INSTALL_HINT}`."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_fashion_mnist(split: Split, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays of one split: images ``uint8 (n, 28, 28)`` and labels ``int64 (n,)``."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = Path(root) if root is not None else Path(DEFAULT_FASHION_MNIST_ROOT)
    prefix = _PREFIX[split]
    name_x, name_y = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    images = _parse_idx(_open_idx(folder, name_x), _IMAGES_MAGIC, 3, str(folder / name_x))
    labels = _parse_idx(_open_idx(folder, name_y), _LABELS_MAGIC, 1, str(folder / name_y)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(
            f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split; a file is corrupted."
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{folder / name_y}: label {labels.max()} outside 0..9; the file is corrupted.")
    return images, labels


def normalize_images(images: np.ndarray) -> np.ndarray:
    """``uint8 (n, 28, 28)`` -> ``float32 (n, 1, 28, 28)``, scaled to [0, 1] then standardised."""
    out = images.astype(np.float32)[:, None]
    out *= np.float32(1 / (255 * STD))
    out -= np.float32(MEAN / STD)
    return out


def fashion_mnist_features(height: int = 28, width: int = 28) -> datasets.Features:
    """``pixel_values`` Array3D float32 (1, H, W) and ``label`` ClassLabel over the 10 clothing names."""
    return datasets.Features(
        {
            "pixel_values": datasets.Array3D((1, height, width), "float32"),
            "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
        }
    )


def _images_column(pixels: np.ndarray, features: datasets.Features) -> pa.Array:
    """Zero-copy Arrow column for an ``(n, c, h, w)`` float32 array (Array3D stores nested lists)."""
    n, c, h, _ = pixels.shape
    column = pa.array(np.ascontiguousarray(pixels).reshape(-1))
    for count, step in ((n * c * h, pixels.shape[3]), (n * c, h), (n, c)):
        offsets = pa.array(np.arange(count + 1, dtype=np.int32) * step)
        column = pa.ListArray.from_arrays(offsets, column)
    return pa.ExtensionArray.from_storage(features.arrow_schema.field("pixel_values").type, column)


def images_to_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    """Build the dataset from raw uint8 images and labels (fast: no per-example Python conversion)."""
    pixels = normalize_images(images)
    features = fashion_mnist_features(*images.shape[1:])
    table = pa.table(
        {"pixel_values": _images_column(pixels, features), "label": pa.array(labels.astype(np.int64))},
        schema=features.arrow_schema,
    )
    # Fingerprint from a fast digest of the raw bytes (datasets would otherwise pickle the whole table to hash it).
    digest = hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=8)
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return datasets.Dataset(table, fingerprint=f"fmnist-{digest.hexdigest()}")


def load_fashion_mnist(split: Split, root: str | os.PathLike | None = None) -> datasets.Dataset:
    """One Fashion-MNIST split with ``pixel_values`` (float32 ``(1, 28, 28)``, mean 0.2860 / std 0.3530
    normalised) and ``label`` (ClassLabel). Call ``.with_format('torch')`` to get tensors."""
    images, labels = read_fashion_mnist(split, root)
    return images_to_dataset(images, labels)
