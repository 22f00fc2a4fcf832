"""Stratified few-shot splits, label noise (symmetric and pair) and label encoding for ``datasets.Dataset`` objects."""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher

#: Label-noise protocols of :func:`flip_labels`: ``"symmetric_exclusive"`` (the default, earlier releases: a flipped
#: label always moves to another class), ``"symmetric"`` (official code of Li & Zhang 2021: drawn from all classes)
#: and ``"pair"`` (asymmetric: class c always moves to c + 1 mod K).
LABEL_NOISE_TYPES = ("symmetric_exclusive", "symmetric", "pair")


_STRING_DTYPES = ("string", "large_string")
D = TypeVar("D", datasets.Dataset, datasets.DatasetDict)


def encode_labels(ds: D, label_column: str = "label") -> D:
    """A string label column (``"cat"``, ``"dog"``) as class ids: cast to a ``ClassLabel`` whose names are the
    sorted strings, like ``datasets``' ``class_encode_column``, but with ONE mapping for every split of a
    ``DatasetDict`` (``class_encode_column`` on a ``DatasetDict`` encodes each split on its own, so a split missing
    a class would get other ids). Other label columns (already ``ClassLabel`` or integers) and data sets without
    ``label_column`` are returned unchanged. Rows without a label (``None``) are refused: drop them first.

    The collator turns labels into a tensor, so string labels otherwise fail at training time with
    ``ValueError: too many dimensions 'str'``; :func:`few_shot_split`, :func:`flip_labels` and
    :func:`~peft_tsrs.app.data.tokenize_dataset` call this for you.
    """
    parts: list[datasets.Dataset] = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
    parts = [d for d in parts if label_column in d.column_names]
    if not parts:
        return ds
    feature = parts[0].features[label_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in _STRING_DTYPES):
        return ds
    values: set = set()
    for d in parts:
        values.update(d.unique(label_column))
    if None in values:
        raise ValueError(f"the label column {label_column!r} has rows without a label (None); drop them first, e.g. "
                         f"ds.filter(lambda row: row[{label_column!r}] is not None).")
    label = datasets.ClassLabel(names=sorted(values))

    def cast(d: datasets.Dataset) -> datasets.Dataset:
        return d.cast_column(label_column, label) if label_column in d.column_names else d

    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict({name: cast(d) for name, d in ds.items()})
    return cast(ds)


def _class_name(ds: datasets.Dataset, label_column: str, cls: int) -> str:
    feature = ds.features[label_column]
    if isinstance(feature, datasets.ClassLabel) and 0 <= cls < feature.num_classes:
        return f"{cls} ({feature.int2str(cls)})"
    return str(cls)


def _labels(ds: datasets.Dataset, label_column: str) -> np.ndarray:
    """The label column as an int64 numpy array (fast, respects an indices mapping)."""
    table = ds.with_format("arrow", columns=[label_column])[:]
    return table.column(label_column).to_numpy().astype(np.int64, copy=False)


def _take(
    ds: datasets.Dataset, rows: np.ndarray, new_columns: dict[str, tuple[np.ndarray, object]]
) -> datasets.Dataset:
    """Rows ``rows`` of ``ds`` as a new in-memory dataset, with columns set or added from ``new_columns``
    (``name -> (values, feature)``). Works on Arrow tables directly, so large image columns are copied, never
    converted to Python objects."""
    table = ds.with_format("arrow")[rows.tolist()] if len(rows) else ds.with_format("arrow")[:0]
    features = datasets.Features(dict(ds.features))
    for name, (values, feature) in new_columns.items():
        features[name] = feature
        column = pa.array(np.asarray(values, dtype=np.int64))
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    # A fingerprint from the parent's and the arguments, so the table's content is never hashed (seconds for images).
    fingerprint = Hasher.hash(
        (getattr(ds, "_fingerprint", None), rows, {k: np.asarray(v) for k, (v, _) in new_columns.items()})
    )
    out = datasets.Dataset(
        table.replace_schema_metadata(None), info=datasets.DatasetInfo(features=features), fingerprint=fingerprint
    )
    return out.with_format(ds.format["type"]) if ds.format["type"] else out


def few_shot_split(
    ds: datasets.Dataset,
    shots_per_class: int,
    val_per_class: int,
    test_per_class: Optional[int],
    seed: int,
    classes: Optional[Sequence[int]] = None,
    label_column: str = "label",
) -> datasets.DatasetDict:
    """Disjoint, stratified ``train`` / ``validation`` / ``test`` splits, deterministic given ``seed``.

    Each class's examples are shuffled once with ``(seed, class)``. With ``test_per_class`` set, the test examples come first,
    then validation, then train, so the test (and validation) sets do not depend on ``shots_per_class`` and a larger
    train set contains a smaller one. With ``test_per_class=None`` the order is validation, train, and everything
    left goes to test. ``classes`` keeps only those classes and relabels them ``0..k-1`` in the given order (ClassLabel
    names follow). The train split gets an ``index`` column ``0..n-1``, a stable per-example id.
    """
    if label_column not in ds.column_names:
        raise ValueError(
            f"few_shot_split: no column {label_column!r}; pass label_column= (columns: {ds.column_names})."
        )
    ds = encode_labels(ds, label_column)  # string labels -> class ids (ClassLabel names keep the strings)
    counts = {"shots_per_class": shots_per_class, "val_per_class": val_per_class, "test_per_class": test_per_class}
    for name, value in counts.items():
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"few_shot_split: {name} must be a non-negative integer, got {value!r}.")
    labels = _labels(ds, label_column)
    present = sorted(int(c) for c in np.unique(labels))
    if present and present[0] < 0:
        raise ValueError(f"few_shot_split: negative label {present[0]} in {label_column!r}; drop unlabeled rows first.")
    keep = present if classes is None else [int(c) for c in classes]
    if len(set(keep)) != len(keep):
        raise ValueError(f"few_shot_split: classes must be distinct, got {list(classes or [])}.")
    missing = [c for c in keep if c not in present]
    if missing:
        raise ValueError(f"few_shot_split: classes {missing} have no examples (present: {present}).")

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for cls in keep:
        members = np.flatnonzero(labels == cls)
        needed = shots_per_class + val_per_class + (test_per_class or 0)
        if len(members) < needed:
            raise ValueError(
                f"few_shot_split: class {_class_name(ds, label_column, cls)} has {len(members)} examples but "
                f"{shots_per_class} train + {val_per_class} validation + {test_per_class or 0} test = {needed} were "
                "requested; lower the counts or drop the class via classes=."
            )
        # One generator per class: a class's split depends only on (seed, class), not on the other classes.
        order = members[np.random.default_rng([seed, cls]).permutation(len(members))]
        if test_per_class is not None:
            test, rest = order[:test_per_class], order[test_per_class:]
            val, train = rest[:val_per_class], rest[val_per_class : val_per_class + shots_per_class]
        else:
            val, rest = order[:val_per_class], order[val_per_class:]
            train, test = rest[:shots_per_class], rest[shots_per_class:]
        for key, idx in (("train", train), ("validation", val), ("test", test)):
            parts[key].append(idx)

    label_feature = ds.features[label_column]
    if classes is not None:
        names = [label_feature.int2str(c) if isinstance(label_feature, datasets.ClassLabel) else str(c) for c in keep]
        label_feature = datasets.ClassLabel(names=names)
    lookup = np.full(max(present) + 1, -1, dtype=np.int64)
    lookup[keep] = np.arange(len(keep)) if classes is not None else keep
    out = {}
    for key, chunks in parts.items():
        idx = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        idx = idx[rng.permutation(len(idx))]  # interleave the classes
        columns = {label_column: (lookup[labels[idx]], label_feature)}
        if key == "train":
            columns["index"] = (np.arange(len(idx)), datasets.Value("int64"))
        out[key] = _take(ds, idx, columns)
    return datasets.DatasetDict(out)


def flip_labels(
    ds: datasets.Dataset,
    fraction: float,
    seed: int,
    num_classes: int,
    label_column: str = "label",
    noise_type: str = "symmetric_exclusive",
) -> datasets.Dataset:
    """Label noise on ``round(fraction * n)`` examples drawn uniformly without replacement (deterministic given
    ``seed``); ``noise_type`` says where their labels go:

    * ``"symmetric_exclusive"`` (default, kept so earlier runs reproduce): to a different class drawn uniformly from
      the other ``K − 1``, so exactly ``round(fraction * n)`` labels change.
    * ``"symmetric"`` (the official code of Li & Zhang, 2021): to a class drawn uniformly from all ``K`` classes, so
      a drawn label may land on its own class and about ``fraction·(K − 1)/K`` of the labels change.
    * ``"pair"`` (asymmetric): class ``c`` goes to the fixed class ``(c + 1) mod K``; exactly ``round(fraction * n)``
      labels change.

    The clean labels are kept in a ``clean_label`` column (an existing ``clean_label`` column is left as is, so
    noise applied twice still remembers the original labels).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"flip_labels: fraction must lie in [0, 1], got {fraction}.")
    if noise_type not in LABEL_NOISE_TYPES:
        raise ValueError(f"flip_labels: noise_type must be one of {LABEL_NOISE_TYPES}, got {noise_type!r}.")
    if num_classes < 2:
        raise ValueError(f"flip_labels: need num_classes >= 2 to move a label to another class, got {num_classes}.")
    ds = encode_labels(ds, label_column)
    labels = _labels(ds, label_column)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"flip_labels: labels span {labels.min()}..{labels.max()} but num_classes={num_classes}; pass the "
            "number of classes of the data set."
        )
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(labels)))
    chosen = rng.choice(len(labels), size=count, replace=False)
    noisy = labels.copy()
    if noise_type == "symmetric_exclusive":
        noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, size=count)) % num_classes
    elif noise_type == "symmetric":
        noisy[chosen] = rng.integers(0, num_classes, size=count)
    else:
        noisy[chosen] = (labels[chosen] + 1) % num_classes
    columns = {label_column: (noisy, ds.features[label_column])}
    if "clean_label" not in ds.column_names:
        columns["clean_label"] = (labels, ds.features[label_column])
    return _take(ds, np.arange(len(ds)), columns)
