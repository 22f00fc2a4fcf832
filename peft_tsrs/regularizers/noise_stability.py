"""TSRS noise-stability regularizer (Shen et al., CVPR 2024), implemented with forward hooks only.

Inside ``with ns.capture():`` and in training mode, the input ``h`` of block ``I`` becomes
``cat([h, h + σ·ε], 0)``: blocks below ``I`` run once on the clean batch ``B``, every later block and
the head run on ``2B`` rows (clean first, noisy second). The loss is
``weight · mean_{i ≥ N} ‖h̃_i − h_i‖₂ / ‖h_i‖₂`` over the recorded block outputs (real tokens only when the batch
has an attention mask). In the trainer both copies draw identical dropout masks (``shared_dropout``), so σ = 0 gives
a term of exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn

from .base import BuildContext, Regularizer, StepContext
from .blocks import block_input, find_blocks, first_tensor, replace_block_input
from .shared_dropout import shared_dropout

__all__ = ["NoiseStability", "TSRSRegularizer", "relative_perturbation"]

_EPS = 1e-12
# Keyword arguments that never carry a batch dimension even when their length happens to equal B.
_NO_BATCH_KWARGS = frozenset({"cache_position"})


def relative_perturbation(clean: Tensor, noisy: Tensor, eps: float = _EPS, mask: Optional[Tensor] = None) -> Tensor:
    """``‖noisy − clean‖_F / max(‖clean‖_F, eps)``, computed in float32 (safe for fp16/bf16 inputs).

    ``mask`` (e.g. an attention mask, ``(B, L)`` of 0/1) restricts both norms to the positions it keeps; it applies
    when its shape is the leading shape of the activations and is ignored otherwise (ViT patches, pooled features).
    """
    if clean.shape != noisy.shape:
        raise ValueError(f"clean and noisy activations differ in shape: {tuple(clean.shape)} vs {tuple(noisy.shape)}")
    diff, ref = (noisy - clean).float(), clean.float()
    if mask is not None and mask.ndim < clean.ndim and tuple(mask.shape) == tuple(clean.shape[: mask.ndim]):
        keep = mask.to(device=clean.device, dtype=torch.float32).reshape(*mask.shape, *([1] * (clean.ndim - mask.ndim)))
        diff, ref = diff * keep, ref * keep
    num = torch.linalg.vector_norm(diff)
    den = torch.linalg.vector_norm(ref).clamp_min(eps)
    return num / den


def _dup(value: Any, batch: int) -> Any:
    """Duplicate along dim 0 every tensor (also inside tuples/lists) whose first dimension is ``batch``."""
    if isinstance(value, Tensor):
        return torch.cat([value, value], 0) if value.ndim >= 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_dup(v, batch) for v in value)
    return value


class NoiseStability:
    """Noise-stability loss over blocks ``measure_from .. n-1`` with Gaussian noise injected before block
    ``inject_layer`` (default: the middle block ``n // 2``; ``measure_from`` defaults to ``inject_layer``).

    Use ``with ns.capture(): out = model(**inputs)`` for exactly one forward; then ``ns.split(out.logits)``
    gives ``(clean, noisy)`` logits (task loss on either half) and ``ns.loss()`` the regularizer; call
    backward after leaving the context. Labels must not be passed to the model (its logits have ``2B``
    rows), and the head must depend only on the block outputs (per-batch tensors given to later blocks,
    such as attention masks, are duplicated; tensors used after the blocks are not). Nothing happens in
    eval mode. Works with transformers' gradient checkpointing (hooks run outside the checkpoint).
    Weight-shared blocks (ALBERT) are not supported.
    """

    def __init__(
        self,
        model: nn.Module,
        inject_layer: int | None = None,
        measure_from: int | None = None,
        noise_std: float = 0.2,
        weight: float = 1.0,
        block_path: str | None = None,
    ) -> None:
        self.model = model
        self.block_path, self.blocks = find_blocks(model, block_path)
        n = len(self.blocks)
        inject_layer = n // 2 if inject_layer is None else inject_layer
        if not 0 <= inject_layer < n:
            raise ValueError(
                f"inject_layer={inject_layer} is out of range: the model has {n} blocks at "
                f"{self.block_path!r}, so inject_layer must be in [0, {n - 1}]."
            )
        measure_from = inject_layer if measure_from is None else measure_from
        if not inject_layer <= measure_from < n:
            raise ValueError(
                f"measure_from={measure_from} is out of range: it must be in [inject_layer={inject_layer}, {n - 1}] "
                f"(the model has {n} blocks)."
            )
        self.inject_layer = inject_layer
        self.measure_from = measure_from
        self.noise_std = float(noise_std)
        self.weight = float(weight)
        self.active_batch: int | None = None
        self.noise_rows: int | None = None  # set by the trainer: the distinct examples of the step (see _noise_like)
        self._records: list[Tensor] = []

    # -- hooks -------------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.model.training:
            return None
        h = block_input(args, kwargs)
        if h is None:
            raise RuntimeError(
                f"NoiseStability: block {self.inject_layer} received no hidden states (first positional "
                "argument or `hidden_states=` keyword); pass block_path to point at the right blocks."
            )
        batch = h.shape[0]
        self.active_batch = batch
        self._records = []  # one forward per capture: a new injection starts a new record
        noisy = torch.cat([h, h + self.noise_std * self._noise_like(h)], 0)
        args, kwargs = replace_block_input(args, kwargs, noisy)
        return self._duplicated(args, kwargs, batch)  # the noisy states have 2B rows: left as they are

    def _noise_like(self, h: Tensor) -> Tensor:
        """``ε ~ N(0, 1)`` shaped like ``h``; when ``h`` stacks copies of ``noise_rows`` examples (PACE's pair), every
        copy gets the same ``ε``, so the copies still differ only by their own noise."""
        rows = self.noise_rows
        if rows is None or h.shape[0] <= rows or h.shape[0] % rows:
            return torch.randn_like(h)
        return torch.randn_like(h[:rows]).repeat(h.shape[0] // rows, *([1] * (h.ndim - 1)))

    @staticmethod
    def _duplicated(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
        """Every per-batch tensor argument (``batch`` rows) duplicated."""
        new_args = tuple(_dup(a, batch) for a in args)
        new_kwargs = {k: v if k in _NO_BATCH_KWARGS else _dup(v, batch) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def _later_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Blocks after ``I`` get the same per-batch tensors (masks, position embeddings) from the encoder
        loop: duplicate those still at batch ``B`` (the hidden states already have ``2B`` rows)."""
        if self.active_batch is None or not self.model.training:
            return None
        return self._duplicated(args, kwargs, self.active_batch)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active_batch is not None and self.model.training:
            self._records.append(first_tensor(output))

    @contextlib.contextmanager
    def capture(self) -> Iterator["NoiseStability"]:
        """Install the hooks for one forward pass; they are removed on exit, also on exceptions."""
        self.active_batch = None
        self._records = []
        handles = [self.blocks[self.inject_layer].register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        try:
            for i in range(self.inject_layer + 1, len(self.blocks)):
                handles.append(self.blocks[i].register_forward_pre_hook(self._later_pre_hook, with_kwargs=True))
            for i in range(self.measure_from, len(self.blocks)):
                handles.append(self.blocks[i].register_forward_hook(self._forward_hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    # -- results -----------------------------------------------------------------------------------
    def split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Split a ``2B``-row tensor (e.g. logits) into its ``(clean, noisy)`` halves."""
        if self.active_batch is None:
            raise RuntimeError(
                "NoiseStability.split: no noisy forward was captured; run the model in training mode "
                "inside `with ns.capture():` first."
            )
        b = self.active_batch
        if t.shape[0] != 2 * b:
            raise ValueError(f"expected a tensor with 2*B={2 * b} rows, got shape {tuple(t.shape)}")
        return t[:b], t[b:]

    def loss(self, mask: Optional[Tensor] = None) -> Tensor:
        """``weight · mean_i ‖h̃_i − h_i‖ / ‖h_i‖`` over the blocks recorded by the last capture (float32).

        ``mask``: the ``(B, L)`` attention mask of the captured batch; padded positions are left out of both norms.
        """
        if self.active_batch is None or not self._records:
            raise RuntimeError(
                "NoiseStability.loss: nothing was recorded; call the model in training mode inside "
                "`with ns.capture():` before asking for the loss."
            )
        terms = [relative_perturbation(*self.split(out), mask=mask) for out in self._records]
        return self.weight * torch.stack(terms).mean()

    def release(self) -> None:
        """Drop the recorded block outputs (``2B`` rows per block) once the loss is built, so they do not stay
        alive until the next step; ``split`` keeps working, ``loss`` needs a new capture."""
        self._records = []


class TSRSRegularizer(Regularizer):
    """TSRS as a trainer regularizer: the noisy copy rides in the step's one forward (rows added at block I), the
    task loss is computed on the ``task_loss_path`` half, the term is ``NoiseStability.loss()``."""

    def __init__(self, stability: NoiseStability, task_loss_path: str = "noisy") -> None:
        self.stability = stability
        self.task_loss_path = task_loss_path
        self._mask: Optional[Tensor] = None

    enabled_by = "uses_tsrs"

    @classmethod
    def create(cls, build: BuildContext) -> "TSRSRegularizer":
        cfg = build.config
        stability = NoiseStability(build.model, inject_layer=cfg.tsrs_inject_layer, measure_from=cfg.tsrs_measure_from,
                                   noise_std=cfg.tsrs_noise_std, weight=cfg.tsrs_weight, block_path=cfg.block_path)
        return cls(stability, cfg.tsrs_task_loss_path)

    def forward_context(self, step: StepContext) -> ContextManager[Any]:
        self._mask = step.inputs.get("attention_mask") if isinstance(step.inputs, Mapping) else None
        stack = contextlib.ExitStack()
        stack.enter_context(shared_dropout(step.rows))  # clean and noisy copies: identical dropout masks
        self.stability.noise_rows = step.rows  # PACE's two copies: one TSRS noise draw
        stack.enter_context(self.stability.capture())
        return stack

    def select(self, logits: Tensor, step: StepContext) -> Tensor:
        clean, noisy = self.stability.split(logits)
        return noisy if self.task_loss_path == "noisy" else clean

    def loss(self, step: StepContext) -> dict[str, Tensor]:
        term = self.stability.loss(self._mask)
        self._mask = None
        self.stability.release()
        return {"loss_tsrs": term}

    def collapse_advice(self, learning_rate: str) -> Optional[str]:
        return (f"With TSRS this is the noise-stability term's trivial minimum (an input-independent representation "
                f"is perfectly noise-stable): lower tsrs_weight (now {self.stability.weight:g}; try 10x smaller) or "
                f"{learning_rate}.")
