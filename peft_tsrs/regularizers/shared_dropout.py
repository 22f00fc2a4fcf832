"""Identical dropout masks for the copies of a batch that run in one forward.

TSRS (clean and noisy copy) and PACE (two noisy copies) compare copies of the same examples: any difference must come
from their noise, not from dropout. Inside ``with shared_dropout(rows):`` every dropout whose input has ``k · rows``
rows (``k ≥ 2``) draws one mask for ``rows`` rows and applies it to all ``k`` copies. It covers

* ``torch.nn.functional.dropout`` — hence every ``nn.Dropout`` module and the attention-probability dropout of
  transformers' eager attention;
* ``torch.nn.functional.scaled_dot_product_attention`` with ``dropout_p > 0`` — the attention-probability dropout
  inside SDPA kernels, recomputed here with the math formula and a shared mask (only while training with dropout;
  without dropout the kernel runs unchanged).

Inputs of ``rows`` rows (the part of the forward before a copy is made) get ordinary dropout. Contexts nest.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["shared_dropout"]


def _copies(x: Tensor, rows: int) -> int:
    """How many copies of ``rows`` rows ``x`` holds (0 when it is not such a stack)."""
    if x.ndim == 0 or rows < 1 or x.shape[0] <= rows or x.shape[0] % rows:
        return 0
    return x.shape[0] // rows


def _tiled_mask_dropout(x: Tensor, p: float, rows: int, copies: int) -> Tensor:
    if p >= 1.0:
        return x * 0.0
    mask = torch.empty_like(x[:rows]).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * mask.repeat(copies, *([1] * (x.ndim - 1)))


def _attention_with_shared_dropout(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                   dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
                                   rows: int, copies: int) -> Tensor:
    """``softmax(q kᵀ · scale + mask)`` with a shared dropout mask, times ``v`` (SDPA's math formula)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = scores.softmax(-1)
    # a query row with every key masked (left padding under a causal mask) attends to nothing: 0, as in torch's SDPA
    probs = probs.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    probs = _tiled_mask_dropout(probs, dropout_p, rows, copies)
    return probs @ value


@contextlib.contextmanager
def shared_dropout(rows: int) -> Iterator[None]:
    """Within the block, dropout on a stack of ``k ≥ 2`` copies of ``rows`` rows uses one mask for all copies."""
    if rows < 1:
        raise ValueError(f"shared_dropout: rows must be >= 1, got {rows}.")
    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def shared(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
        copies = _copies(input, rows) if training and p > 0 else 0
        if not copies:
            return dropout(input, p, training, inplace)
        return _tiled_mask_dropout(input, p, rows, copies)

    def shared_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False, **kwargs: Any) -> Tensor:
        copies = _copies(query, rows) if dropout_p > 0 else 0
        if not copies or kwargs:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa, **kwargs)
        return _attention_with_shared_dropout(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                              rows, copies)

    F.dropout, F.scaled_dot_product_attention = shared, shared_sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa
