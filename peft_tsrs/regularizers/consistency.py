"""PACE consistency regularization (Ni et al., NeurIPS 2024): the loss, shared dropout, the fast-variant store, and
PACE's noise on LoRA / RLRR adapters (``adapter_noise``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor

from .adapter_noise import NoiseSite, adapter_noise, pace_noise_sites
from .base import BuildContext, Regularizer, StepContext, batch_rows, map_batch
from .shared_dropout import shared_dropout

__all__ = ["FastConsistencyStore", "PACERegularizer", "consistency_mse", "lazy_should_apply"]


def consistency_mse(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """``mean_batch Σ_classes (a − b)²``; leading dimensions are flattened into the batch."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    diff = (logits_a - logits_b).reshape(-1, logits_a.shape[-1])
    return (diff**2).sum(-1).mean()


def lazy_should_apply(step: int, every: int) -> bool:
    """PACE-lazy: apply the consistency term every ``every`` steps (step 0 included)."""
    if every < 1:
        raise ValueError(f"every must be >= 1 (apply every k steps), got {every}.")
    return step % every == 0


class FastConsistencyStore:
    """PACE-fast: logits stored per example index; the loss compares with the previous visit's logits.

    The store starts at zero, so a first visit contributes ``mean Σ logits²`` (the paper's behaviour).
    In multi-process training, gather ``(indices, logits)`` from all processes before ``update`` so every
    process holds the same store.
    """

    def __init__(self, num_examples: int, num_classes: int, index_column: str = "idx") -> None:
        if num_examples < 1 or num_classes < 1:
            raise ValueError(f"num_examples and num_classes must be >= 1, got {num_examples}, {num_classes}.")
        self.num_examples = int(num_examples)
        self.num_classes = int(num_classes)
        self.index_column = index_column
        self.stored = torch.zeros(self.num_examples, self.num_classes)

    def _check(self, indices: Tensor, logits: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"PACE-fast store expects logits of shape (batch, {self.num_classes}), got {tuple(logits.shape)}."
            )
        indices = torch.as_tensor(indices).reshape(-1).long()
        if indices.numel() != logits.shape[0]:
            raise ValueError(
                f"got {indices.numel()} indices for {logits.shape[0]} logits rows; the {self.index_column!r} "
                "column must give one example index per row."
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_examples):
            bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
            raise ValueError(
                f"example index {bad} from column {self.index_column!r} is outside [0, {self.num_examples}); "
                "the column must hold each training example's position in the training set."
            )
        if self.stored.device != logits.device:
            self.stored = self.stored.to(logits.device)
        return indices.to(logits.device)

    def loss(self, indices: Tensor, logits: Tensor) -> Tensor:
        """``consistency_mse(logits, stored[indices])`` with the stored logits detached."""
        idx = self._check(indices, logits)
        return consistency_mse(logits, self.stored[idx].to(logits.dtype))

    @torch.no_grad()
    def update(self, indices: Tensor, logits: Tensor) -> None:
        """Store ``logits.detach()`` at ``indices`` (last write wins for repeated indices)."""
        idx = self._check(indices, logits)
        self.stored[idx] = logits.detach().to(self.stored.dtype)

    def loss_and_update(self, indices: Tensor, logits: Tensor) -> Tensor:
        """The consistency term against the previous visit, then store the current logits."""
        out = self.loss(indices, logits)
        self.update(indices, logits)
        return out

    def check_size(self, n: int) -> None:
        """Raise if the training set no longer has the size the store was built for."""
        if n != self.num_examples:
            raise ValueError(
                f"PACE-fast store holds {self.num_examples} examples but the dataset has {n}; rebuild the store "
                "(or start training from scratch) when the training set changes."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"stored": self.stored.detach().cpu().clone(), "index_column": self.index_column}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = state["stored"]
        if tuple(stored.shape) != (self.num_examples, self.num_classes):
            raise ValueError(
                f"PACE-fast checkpoint holds logits of shape {tuple(stored.shape)} but this store expects "
                f"({self.num_examples}, {self.num_classes}); the dataset size or number of classes changed."
            )
        self.stored = stored.detach().to(self.stored.device, self.stored.dtype).clone()


class PACERegularizer(Regularizer):
    """PACE consistency as a trainer regularizer, in one of three modes.

    * ``full``: the batch is duplicated at the input (``[x, x]``) and both copies run in the step's one forward with
      identical dropout masks (every dropout, attention kernels included: see ``shared_dropout``); the task loss uses the first copy; the term is ``weight · consistency_mse``.
    * ``lazy``: every ``lazy_every`` steps, ``full`` on the first half of the batch (the cost of one normal step);
      the half batch's mean keeps the whole batch's weight.
    * ``fast``: one pass; the term compares with the logits stored at the example's previous visit.

    The noise the copies differ by: a PACE adapter draws it in its own layers; on LoRA / RLRR adapters this regularizer
    puts it on the adapter branches (``noise_sites``, from ``RegularizerConfig.pace_sigma``) in every training forward
    of every mode, paired or not, as the PACE adapter does. With ``weight`` 0 only that noise is left: no pair, no
    store, no term (PACE's noise without its consistency).
    """

    def __init__(self, weight: float, mode: str = "full", lazy_every: int = 2,
                 store: Optional[FastConsistencyStore] = None, noise_sites: Sequence[NoiseSite] = ()) -> None:
        if mode == "fast" and weight > 0 and store is None:
            raise ValueError("PACERegularizer: the 'fast' mode needs a FastConsistencyStore.")
        self.weight = weight
        self.mode = mode
        self.lazy_every = lazy_every
        self.store = store
        self.noise_sites = list(noise_sites)
        self.needs_index = mode == "fast" and weight > 0
        self._paired = False
        self._second: Optional[Tensor] = None

    enabled_by = "uses_pace_regularizer"

    @classmethod
    def per_example_use(cls, config: Any) -> list[str]:
        # the fast store holds one row of class logits per example
        return ["PACE-fast"] if config.uses_pace and config.pace_mode == "fast" else []

    @classmethod
    def create(cls, build: BuildContext) -> "PACERegularizer":
        cfg = build.config
        noise_sites = pace_noise_sites(build.model, cfg.pace_sigma)  # refuses a model without a noise source
        store = None
        if cfg.uses_pace and cfg.pace_mode == "fast":
            indices, _ = build.index_and_labels()
            num_examples = int(indices.max()) + 1 if len(indices) else 0
            store = FastConsistencyStore(num_examples, build.num_labels(), index_column=cfg.index_column)
        return cls(cfg.pace_weight, cfg.pace_mode, cfg.pace_lazy_every, store, noise_sites)

    def prepare(self, step: StepContext) -> None:
        self._paired = self.weight > 0 and (
            self.mode == "full" or (self.mode == "lazy" and lazy_should_apply(step.step, self.lazy_every)))
        if not self._paired:
            return
        rows = batch_rows(step.inputs)
        if self.mode == "lazy":  # half a batch, duplicated: the cost of one normal step
            half = max(1, rows // 2)
            step.inputs = map_batch(step.inputs, rows, lambda t: t[:half])
            step.labels = step.labels[:half]
            step.indices = None if step.indices is None else step.indices[:half]
            rows = step.rows = half
        step.inputs = map_batch(step.inputs, rows, lambda t: torch.cat([t, t], 0))

    def forward_context(self, step: StepContext) -> ContextManager[Any]:
        return self._forward(step)

    @contextlib.contextmanager
    def _forward(self, step: StepContext) -> Iterator[None]:
        """Shared dropout for the paired copies; the adapter noise in training (each input row draws its own)."""
        with contextlib.ExitStack() as stack:
            if self._paired:
                stack.enter_context(shared_dropout(step.rows))
            if self.noise_sites and step.model.training:
                stack.enter_context(adapter_noise(self.noise_sites, batch_rows(step.inputs)))
            yield

    def select(self, logits: Tensor, step: StepContext) -> Tensor:
        if not self._paired:
            return logits
        first, self._second = logits.chunk(2, dim=0)
        return first

    def loss(self, step: StepContext) -> dict[str, Tensor]:
        if self._paired:
            second, self._second = self._second, None
            first = step.logits
            if step.positions is not None:  # token-level task: the supervised positions only
                first, second = first[step.positions], second[step.positions]
            return {"loss_pace": self.weight * consistency_mse(first.float(), second.float())}
        if self.store is None:  # lazy mode on a step without the pair
            return {}
        term = self.weight * self.store.loss(step.indices, step.logits.float())
        # every process stores every process's logits, so the store is identical everywhere
        self.store.update(step.gather(step.indices), step.gather(step.logits.detach().float()))
        return {"loss_pace": term}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.store is None else {"fast_store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.store is not None and "fast_store" in state:
            self.store.load_state_dict(state["fast_store"])
