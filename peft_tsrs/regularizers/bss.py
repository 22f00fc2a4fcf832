"""Batch Spectral Shrinkage (Chen et al., NeurIPS 2019), a term the official TSRS code adds to every step.

For the batch feature matrix ``F`` (``B × d``, one row per example) with singular values ``σ_1 ≥ … ≥ σ_m``
(``m = min(B, d)``), BSS is ``Σ_{i=1..k} σ_{m+1−i}²``: the squares of the ``k`` *smallest* singular values. Shrinking
them suppresses the feature directions that carry little of the batch's variation, which the paper finds prone to
negative transfer; the official TSRS objective is ``CE + 1e-3·BSS(k = 1) + λ·noise term``.

In the trainer (:class:`BSSRegularizer`):

* **Which features**: what the classification head is called with, taken by a forward pre-hook on the head
  (:func:`~peft_tsrs.regularizers.blocks.find_head`: the model's ``classifier`` / ``score`` / ``head`` / ``fc``, a PEFT
  ``ModulesToSaveWrapper`` included) — BERT's pooled output after its dropout, ViT's layer-normed CLS token. The head
  must read one row per example (``(B, d)``). A head that reads a whole sequence (RoBERTa's classification head pools
  the first token itself; a decoder's ``score`` runs on every token and the model pools after it) is refused with an
  error: which row stands for an example is that model's business, not something to guess.
* **Language models** (no classification head): the features the output layer (``lm_head``) reads at the supervised
  positions (``step.positions``: the tokens the loss predicts), one row per predicted token.
* **Which rows**: those the task loss is computed on (``step.task_rows``): with TSRS the noisy copy (or the clean one
  under ``tsrs_task_loss_path="clean"``), with PACE the first copy, with PACE-lazy the half batch — the features whose
  logits the cross-entropy reads, ``B`` rows as in a plain step.
* Computed on each process's batch, in float32 (``torch.linalg.svdvals``, whose gradient, unlike ``svd``'s, is always
  numerically stable); the term is a per-batch quantity, logged as ``loss_bss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn

from .base import BuildContext, Regularizer, StepContext
from .blocks import find_head, unwrap_model

__all__ = ["BSSRegularizer", "batch_spectral_shrinkage"]


def batch_spectral_shrinkage(features: Tensor, k: int = 1) -> Tensor:
    """``Σ`` of the ``k`` smallest squared singular values of ``features`` (``(B, d)``), in float32.

    With ``B < d`` the smallest of the ``min(B, d) = B`` singular values are taken (the zero singular values of the
    ``d − B`` directions no example spans are not counted); ``k > min(B, d)`` sums them all (``‖F‖_F²``).
    """
    if features.ndim != 2:
        raise ValueError(f"batch_spectral_shrinkage expects a (batch, features) matrix, got shape "
                         f"{tuple(features.shape)}.")
    if k < 1:
        raise ValueError(f"batch_spectral_shrinkage: k must be >= 1, got {k}.")
    sigma = torch.linalg.svdvals(features.float())  # descending
    return sigma[-k:].pow(2).sum()


def _call_input(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The tensor a module is called with: its first positional tensor, else its first tensor keyword."""
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)


def _output_embeddings(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """``(name, module)`` of a language model's output layer (``lm_head``), as the model holds it; ``None`` for a
    model without one."""
    base = unwrap_model(model)
    get = getattr(base, "get_output_embeddings", None)
    output = get() if callable(get) else None
    if not isinstance(output, nn.Module):
        return None
    name = next((n for n, m in base.named_children() if m is output), "lm_head")
    return name, output


class BSSRegularizer(Regularizer):
    """``weight · batch_spectral_shrinkage(features, k)`` on the features the head reads (see the module docstring)."""

    enabled_by = "uses_bss"

    def __init__(self, head: nn.Module, weight: float, k: int = 1, head_name: str = "classifier",
                 token_level: bool = False) -> None:
        self.head = head
        self.head_name = head_name
        self.token_level = token_level  # the LM head: one row per supervised token
        self.weight = float(weight)
        self.k = int(k)
        self._features: Optional[Tensor] = None

    @classmethod
    def create(cls, build: BuildContext) -> "BSSRegularizer":
        try:
            name, head = find_head(build.model)
        except ValueError:
            output = _output_embeddings(build.model)
            if output is None:
                raise
            name, head = output
            return cls(head, build.config.bss_weight, build.config.bss_k, name, token_level=True)
        return cls(head, build.config.bss_weight, build.config.bss_k, name)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        features = _call_input(args, kwargs)
        if self.token_level and features is not None and features.ndim == 3:
            self._features = features
            return
        if features is None or features.ndim != 2:
            shape = None if features is None else tuple(features.shape)
            raise RuntimeError(
                f"BSS reads the features the head {self.head_name!r} is called with, one row per example "
                f"(batch, features); it was called with {'no tensor' if shape is None else f'shape {shape}'}. "
                "This head reads a sequence (e.g. RoBERTa's classification head pools a token itself, a decoder's "
                "`score` runs on every token): BSS supports heads that read pooled features (BERT, ViT, DeiT, "
                "DistilBERT, ...); set bss_weight=0 for this model."
            )
        self._features = features

    def forward_context(self, step: StepContext) -> ContextManager[Any]:
        return self._hooked()

    @contextlib.contextmanager
    def _hooked(self) -> Iterator[None]:
        self._features = None
        handle = self.head.register_forward_pre_hook(self._record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def loss(self, step: StepContext) -> dict[str, Tensor]:
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError(f"BSS: the head {self.head_name!r} was not called in the step's forward; the model "
                               "must compute its logits with it.")
        if step.task_rows is not None:
            features = features[step.task_rows]
        if features.ndim == 3:  # a language model's head: the features of the supervised positions
            if step.positions is None:
                raise RuntimeError(f"BSS on the output layer {self.head_name!r} needs token-level labels (a causal "
                                   "LM's labels, -100 where nothing is predicted); set bss_weight=0 for this task.")
            features = features[step.positions]
        return {"loss_bss": self.weight * batch_spectral_shrinkage(features, self.k)}
