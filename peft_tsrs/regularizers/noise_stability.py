"""TSRS noise-stability regularizer (Shen et al., CVPR 2024), implemented with forward hooks only.

Inside ``with ns.capture():`` and in training mode, the input ``h`` of block ``I`` becomes
``cat([h, h + σ·ε], 0)``: blocks below ``I`` run once on the clean batch ``B``, every later block and
the head run on ``2B`` rows (clean first, noisy second). The loss is
``weight · mean_{i ≥ N} ‖h̃_i − h_i‖₂ / ‖h_i‖₂`` over the recorded block outputs (real tokens only when the batch
has an attention mask). In the trainer both copies draw identical dropout masks (``shared_dropout``), so σ = 0 gives
a term of exactly 0.

Heads that read the model inputs after the blocks — the last non-pad token of decoder-only classifiers (Llama, GPT-2,
Qwen2, Mistral), the ``<eos>`` token of BART/T5 classifiers — see those inputs at ``2B`` rows too: see
:class:`NoiseStability`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ContextManager, Optional

import torch
from torch import Tensor, nn

from .base import BuildContext, Regularizer, StepContext
from .blocks import (
    block_input,
    blocks_path,
    find_blocks,
    first_tensor,
    paired_stack,
    replace_block_input,
    unwrap_model,
)
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


def _dup(value: Any, batch: int, made: Optional[list[tuple[Tensor, Tensor]]] = None) -> Any:
    """Duplicate along dim 0 every tensor (also inside tuples/lists) whose first dimension is ``batch``; ``made``
    collects the ``(copy, original)`` pairs."""
    if isinstance(value, Tensor):
        if value.ndim == 0 or value.shape[0] != batch:
            return value
        doubled = torch.cat([value, value], 0)
        if made is not None:
            made.append((doubled, value))
        return doubled
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_dup(v, batch, made) for v in value)
    return value


def _main_input_rows(module: nn.Module, args: tuple, kwargs: dict) -> int | None:
    """The batch size of a model call: the rows of its main input (``main_input_name``), else of its first tensor."""
    main = kwargs.get(getattr(module, "main_input_name", "input_ids"))
    candidates = [main, *args, *(v for k, v in kwargs.items() if k not in _NO_BATCH_KWARGS)]
    return next((v.shape[0] for v in candidates if isinstance(v, Tensor) and v.ndim > 0), None)


class NoiseStability:
    """Noise-stability loss over blocks ``measure_from .. n-1`` with Gaussian noise injected before block
    ``inject_layer`` (default: the middle block ``n // 2``; ``measure_from`` defaults to ``inject_layer``).

    Use ``with ns.capture(): out = model(**inputs)`` for exactly one forward; then ``ns.split(out.logits)``
    gives ``(clean, noisy)`` logits (task loss on either half) and ``ns.loss()`` the regularizer; call
    backward after leaving the context. Labels must not be passed to the model (its logits have ``2B``
    rows; a clear error says so). Nothing happens in eval mode. Works with transformers' gradient checkpointing
    (hooks run outside the checkpoint).

    What runs on ``2B`` rows. The blocks are the ``nn.ModuleList`` whose output the head reads (``find_blocks``): an
    encoder's, a decoder-only model's, the *decoder's* of an encoder-decoder model (BART, T5; its encoder runs once on
    ``B`` rows). Three kinds of per-batch tensors (first dimension ``B``) meet the ``2B`` hidden states:

    * arguments of the later blocks (attention masks, position embeddings, an encoder-decoder's
      ``encoder_hidden_states`` for cross-attention): duplicated by a pre-hook on every block after ``I``;
    * the model's own inputs, read by its head after the blocks (decoder-only classifiers pool the last non-pad token
      found from ``input_ids``, BART/T5 the ``<eos>`` token): the top-level forward (the unwrapped transformers model)
      is called with every per-batch input duplicated, and the *trunk* it calls — its child that holds the blocks
      (``model`` of Llama/BART, ``transformer`` of GPT-2/T5, ``bert``, ``vit``) — gets the original ``B``-row
      tensors back, so everything below block ``I`` still runs once. A tensor the top-level forward derives from its
      inputs before calling the trunk is mapped back too when it is a view of a duplicated input (multiple-choice
      heads reshape ``input_ids``) or has ``2B`` rows with equal halves (T5 shifts ``input_ids`` into
      ``decoder_input_ids``);
    * tensors computed *inside* the trunk after the blocks from its own inputs (e.g. CLIP's text pooling by
      ``input_ids.argmax``) stay at ``B`` rows: such a model fails in the forward, and the error carries a note
      naming this cause and ``block_path``.

    The alternatives were worse: injecting at the embeddings output would run every block twice (the cost TSRS avoids
    below block ``I``); class lists of known poolers miss new models; rebuilding the pooling per architecture
    duplicates transformers code. Refused at construction, with the reason: the encoder of an encoder-decoder model
    (the decoder would read ``2B`` encoder states with ``B`` decoder rows). Refused at the forward: blocks called more
    than once per forward (weight sharing, as in ALBERT).
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
        self._top = unwrap_model(model)
        path = blocks_path(model, self.blocks)
        twin = paired_stack(model, path) if path else None
        if twin is not None and "decoder" in twin.split("."):
            raise ValueError(
                f"NoiseStability: {type(self._top).__name__} is an encoder-decoder model and block_path="
                f"{self.block_path!r} names its encoder blocks. Their output reaches the head only through the decoder's "
                f"cross-attention, and the decoder runs on the clean batch alone, so the noisy copy cannot be carried "
                f"to the logits. Leave block_path unset or pass block_path={twin!r} (the decoder's blocks)."
            )
        self._decoder_of = twin  # the encoder path when the blocks are an encoder-decoder's decoder
        trunk_name = path.split(".")[0] if "." in path else ""
        self._trunk: nn.Module | None = getattr(self._top, trunk_name) if trunk_name else None
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
        self._top_batch: int | None = None  # rows of the top-level call in progress (None: no forward in progress)
        self._doubled: list[tuple[Tensor, Tensor]] = []  # (duplicated input, original) of the top-level call
        self._injections = 0  # block-I calls within the top-level call in progress
        self._call_rows: int | None = None  # rows of the model call whose forward injected last

    # -- hooks -------------------------------------------------------------------------------------
    def _top_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The top-level model call: refuse labels; with a trunk, run the top-level forward on duplicated inputs."""
        if not self.model.training:
            return None
        if kwargs.get("labels") is not None:
            raise ValueError(
                "NoiseStability: do not pass `labels` to the model inside `capture()`: its logits have 2B rows (clean "
                "and noisy copies). Compute the task loss on one half of `ns.split(outputs.logits)`."
            )
        self._top_batch = _main_input_rows(module, args, kwargs)
        self._injections = 0
        self._doubled = []
        if self._trunk is None or self._top_batch is None:
            return None
        return self._duplicated(args, kwargs, self._top_batch, self._doubled)

    def _top_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._top_batch = None
        self._doubled = []

    def _original(self, value: Any) -> Any:
        """``value`` with every duplicated top-level input (or a tensor derived from one, see the class docstring)
        replaced by its ``B``-row original."""
        if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(self._original(v) for v in value)
        if not isinstance(value, Tensor) or value.ndim == 0:
            return value
        for doubled, original in self._doubled:
            if value is doubled:
                return original
            if value._base is doubled and value.shape[0] % 2 == 0 and value.is_contiguous():
                return value[: value.shape[0] // 2]  # a reshaped view: its first half is the original's
        b = self._top_batch
        if b is not None and value.shape[0] == 2 * b and torch.equal(value[:b], value[b:]):
            return value[:b]  # computed row by row from a duplicated input (T5's shifted decoder_input_ids)
        return value

    def _trunk_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The trunk (the child holding the blocks) runs on the original ``B`` rows up to block ``I``."""
        if not self._doubled or not self.model.training:
            return None
        return tuple(self._original(a) for a in args), {k: self._original(v) for k, v in kwargs.items()}

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.model.training:
            return None
        if self._top_batch is not None:
            self._injections += 1
            if self._injections > 1:
                self._injections = 0  # our own message needs no note (see capture)
                raise RuntimeError(
                    f"NoiseStability: block {self.inject_layer} of {self.block_path!r} ran twice in one forward of "
                    f"{type(self._top).__name__}; weight-shared blocks (ALBERT) are not supported. Pass block_path "
                    "naming a list whose blocks each run once per forward."
                )
        h = block_input(args, kwargs)
        if h is None:
            raise RuntimeError(
                f"NoiseStability: block {self.inject_layer} received no hidden states (first positional "
                "argument or `hidden_states=` keyword); pass block_path to point at the right blocks."
            )
        batch = h.shape[0]
        self.active_batch = batch
        self._call_rows = self._top_batch
        self._records = []  # one forward per capture: a new injection starts a new record
        noisy = torch.cat([h, h + self.noise_std * self._noise_like(h)], 0)
        args, kwargs = replace_block_input(args, kwargs, noisy)
        return self._duplicated(args, kwargs, batch)  # the noisy states have 2B rows: left as they are

    def _noise_like(self, h: Tensor) -> Tensor:
        """``ε ~ N(0, 1)`` shaped like ``h``; when ``h`` stacks copies of ``noise_rows`` examples (PACE's pair), every
        copy gets the same ``ε``, so the copies still differ only by their own noise."""
        rows = self.noise_rows
        call = self._top_batch
        if rows is not None and call and h.shape[0] > call and h.shape[0] % call == 0:
            rows *= h.shape[0] // call  # each input row became several block rows (multiple choice)
        if rows is None or h.shape[0] <= rows or h.shape[0] % rows:
            return torch.randn_like(h)
        return torch.randn_like(h[:rows]).repeat(h.shape[0] // rows, *([1] * (h.ndim - 1)))

    @staticmethod
    def _duplicated(args: tuple, kwargs: dict, batch: int,
                    made: Optional[list[tuple[Tensor, Tensor]]] = None) -> tuple[tuple, dict]:
        """Every per-batch tensor argument (``batch`` rows) duplicated (``made``: see ``_dup``)."""
        new_args = tuple(_dup(a, batch, made) for a in args)
        new_kwargs = {k: v if k in _NO_BATCH_KWARGS else _dup(v, batch, made) for k, v in kwargs.items()}
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
        self.active_batch, self._call_rows = None, None
        self._records = []
        self._top_batch, self._doubled, self._injections = None, [], 0
        handles = [self.blocks[self.inject_layer].register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        try:
            handles.append(self._top.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
            handles.append(self._top.register_forward_hook(self._top_hook))
            if self._trunk is not None:
                handles.append(self._trunk.register_forward_pre_hook(self._trunk_pre_hook, with_kwargs=True))
            for i in range(self.inject_layer + 1, len(self.blocks)):
                handles.append(self.blocks[i].register_forward_pre_hook(self._later_pre_hook, with_kwargs=True))
            for i in range(self.measure_from, len(self.blocks)):
                handles.append(self.blocks[i].register_forward_hook(self._forward_hook))
            yield self
        except Exception as exc:
            if self._injections and self._top_batch is not None and not isinstance(exc, torch.cuda.OutOfMemoryError):
                self._explain(exc)
            raise
        finally:
            self._top_batch, self._doubled = None, []
            for handle in handles:
                handle.remove()

    def _explain(self, exc: Exception) -> None:
        """Add the likely cause to an error raised in the forward after the noisy copy was added (Python ≥ 3.11)."""
        if not hasattr(exc, "add_note"):
            return
        b = self.active_batch
        exc.add_note(
            f"NoiseStability: this error was raised in the forward of {type(self._top).__name__} after block "
            f"{self.inject_layer} of {self.block_path!r} doubled the batch ({b} -> {2 * b} rows: clean and noisy "
            f"copies). A tensor used after that point still has {b} rows: the model computes it from its inputs "
            "inside the module that holds the blocks, after them (e.g. pooling by input_ids there). Pass block_path "
            "naming blocks whose output the model's head reads directly, or use a model class whose head pools "
            "outside that module."
        )

    # -- results -----------------------------------------------------------------------------------
    def split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Split a ``2B``-row tensor (e.g. logits) into its ``(clean, noisy)`` halves. ``B`` is the rows that entered
        block ``I``, or the rows of the model call when its head folds several block rows into one (multiple choice)."""
        if self.active_batch is None:
            raise RuntimeError(
                "NoiseStability.split: no noisy forward was captured; run the model in training mode "
                "inside `with ns.capture():` first."
            )
        for b in (self.active_batch, self._call_rows):
            if b is not None and t.shape[0] == 2 * b:
                return t[:b], t[b:]
        b = self.active_batch
        raise ValueError(
            f"NoiseStability.split: expected a tensor with 2*B={2 * b} rows (B={b} rows entered block "
            f"{self.inject_layer} of {self.block_path!r}), got shape {tuple(t.shape)}; the head must give one row "
            "of logits per row of the blocks' output or per row of the model's inputs."
        )

    def token_mask(self, inputs: Mapping[str, Any]) -> Optional[Tensor]:
        """The ``(B, L)`` mask of the real tokens of the blocks' rows, from the model inputs (``None``: keep all).

        The ``attention_mask`` for encoders and decoder-only models. For the decoder of an encoder-decoder model: the
        ``decoder_attention_mask``; without decoder inputs, the decoder reads ``input_ids`` shifted right by one
        behind a start token (BART, T5), so its mask is ``attention_mask`` shifted the same way.
        """
        if self._decoder_of is None:
            return inputs.get("attention_mask")
        if inputs.get("decoder_attention_mask") is not None:
            return inputs["decoder_attention_mask"]
        mask = inputs.get("attention_mask")
        if mask is None or inputs.get("decoder_input_ids") is not None or inputs.get("decoder_inputs_embeds") is not None:
            return None
        return torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1)

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
        self._mask = self.stability.token_mask(step.inputs) if isinstance(step.inputs, Mapping) else None
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
