"""Layer-wise distance constraint around the pretrained weights (Li & Zhang, NeurIPS 2021)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from torch import Tensor, nn

from .base import BuildContext, Regularizer, StepContext
from .blocks import HEAD_NAMES, find_blocks

__all__ = ["DistanceConstraint", "DistanceRegularizer", "project_frobenius_", "project_inf_op_"]

Norm = Literal["frob", "inf-op"]
Radius = float | Tensor  # one radius, or one per row (dim 0) for the inf-op norm
# Relative slack on the radius: a tensor just projected onto the sphere may come out a rounding error
# outside; without the slack every later projection would rescale it again by ~1 - 1e-7.
_SLACK = 1e-6
# Plain weights that are constrained: linear (2-D) and convolution (4-D) weights, as in the official code. Biases,
# norm vectors, position embeddings (1, N, D) and class tokens (1, 1, D) are left free.
CONSTRAINED_NDIMS = (2, 4)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


def _acc(t: Tensor) -> Tensor:
    """``t`` in a precision fit for accumulating norms: at least float32, float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _norm(t: Tensor, norm: Norm) -> float:
    """Frobenius norm, or the max-row L1 norm (the ∞→∞ operator norm) for ``inf-op``."""
    if norm == "frob":
        return float(torch.linalg.vector_norm(_acc(t.detach())))
    return float(_row_l1(t.detach()).max())


def _row_l1(t: Tensor) -> Tensor:
    """The L1 norm of every row (dim 0; other dims flattened), accumulated in at least float32."""
    return _rows(_acc(t)).abs().sum(1)


def _check_radius(radius: Radius) -> Radius:
    if isinstance(radius, Tensor):
        if bool((radius < 0).any()):
            raise ValueError(f"radius must be >= 0, got a minimum of {float(radius.min())}.")
    elif radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    return radius


def _l1_factors(l1: Tensor, radius: Radius) -> Tensor:
    """``1 / max(1, l1 / D)`` per row (``0`` for a non-zero row when ``D = 0``); ``D`` may be one radius per row."""
    tiny = torch.finfo(torch.float32).tiny
    if isinstance(radius, Tensor):
        radius = radius.to(l1.device, l1.dtype)
    return torch.where(l1 > radius * (1 + _SLACK), radius / l1.clamp_min(tiny), torch.ones_like(l1))


def project_frobenius_(delta: Tensor, radius: float) -> float:
    """``Δ ← Δ / max(1, ‖Δ‖_F / D)`` in place; returns the factor applied (1.0 when already inside, up to a
    relative slack of 1e-6 that absorbs float rounding)."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}.")
    with torch.no_grad():
        n = float(torch.linalg.vector_norm(_acc(delta)))
        if n <= radius * (1 + _SLACK):
            return 1.0
        factor = radius / n
        delta.mul_(factor)
    return factor


def project_inf_op_(delta: Tensor, radius: Radius) -> Tensor:
    """Scale each row (dim 0; other dims flattened) by ``1 / max(1, ‖Δ_row‖₁ / D)`` in place; returns the factors.
    ``radius`` is one ``D`` for every row or a tensor with one ``D_row`` per row."""
    _check_radius(radius)
    with torch.no_grad():
        factors = _l1_factors(_row_l1(delta), radius)
        if bool((factors < 1).any()):
            delta.mul_(factors.to(delta.dtype).reshape(-1, *([1] * (delta.ndim - 1))))
    return factors


def _row_factors(t: Tensor, radius: Radius, norm: Norm) -> Tensor:
    """Per-row factors that bring ``t`` inside the ball, without modifying it."""
    if norm == "frob":
        n = float(torch.linalg.vector_norm(_acc(t)))
        f = 1.0 if n <= radius * (1 + _SLACK) else radius / n
        return torch.full((t.shape[0],), f, device=t.device)
    return _l1_factors(_row_l1(t), radius)


@dataclass
class _Item:
    name: str
    kind: Literal["weight", "head", "adapter", "lora"]
    radius: float  # the radius; with per-row radii, the largest (a bound on the max-row L1 norm)
    param: nn.Parameter | None = None
    anchor: Tensor | None = None  # None: constrained around zero
    module: nn.Module | None = None
    adapter: str | None = None
    stage: str = ""
    row_radius: Tensor | None = None  # inf-op ratio mode: one radius per row, ratio·‖W0_row‖₁
    penalty_weight: float = 0.0  # λ of this tensor in penalty mode

    @property
    def bound(self) -> Radius:
        """What the projection keeps the tensor within: the per-row radii when there are, else the radius."""
        return self.row_radius if self.row_radius is not None else self.radius


def _is_generic_adapter(m: nn.Module) -> bool:
    return (
        callable(getattr(m, "get_delta_weight", None))
        and callable(getattr(m, "scale_delta_weight_rows_", None))
        and hasattr(m, "active_adapters")
    )


def _is_lora(m: nn.Module) -> bool:
    return (
        isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(m, "lora_B", None), nn.ModuleDict)
        and isinstance(getattr(m, "scaling", None), dict)
        and hasattr(m, "active_adapters")
    )


def _active(m: nn.Module) -> list[str]:
    act = m.active_adapters
    return [act] if isinstance(act, str) else list(act)


def _base_layer(m: nn.Module) -> nn.Module | None:
    get = getattr(m, "get_base_layer", None)
    base = get() if callable(get) else getattr(m, "base_layer", None)
    return base if isinstance(base, nn.Module) and base is not m else None


def _own_adapter_params(m: nn.Module) -> list[nn.Parameter]:
    base = _base_layer(m)
    skip = {id(p) for p in base.parameters()} if base is not None else set()
    return [p for p in m.parameters() if id(p) not in skip]


_WRAPPER_PARTS = frozenset({"modules_to_save", "original_module", "base_layer"})


class DistanceConstraint:
    """Keep every trainable linear (2-D) and convolution (4-D) weight within a ball around its value at construction.

    * Plain weights ``W``: ``‖W − W0‖ ≤ D_l`` (``norm='frob'``: Frobenius; ``'inf-op'``: every row's L1 norm).
      Only 2-D and 4-D weights are constrained (``CONSTRAINED_NDIMS``, as in the official code): biases, norm
      vectors, position embeddings and class tokens are skipped. ``radius`` gives ``D`` for the first two of four
      consecutive stages of blocks, ``D·s`` and ``D·s²`` for stages 3 and 4 (``s = depth_scale``); weights before
      the blocks get ``D``, non-head weights after them ``D·s²``. ``ratio`` gives ``D_l = ratio·‖W0‖_F`` instead
      (``'frob'``) or, for ``'inf-op'``, one radius per row, ``D_row = ratio·‖W0_row‖₁`` (official).
    * Head (a module path component in ``head_names``, PEFT ``ModulesToSaveWrapper`` copies included):
      constrained around **zero** with ``head_radius`` (``None``: unconstrained).
    * Adapters (duck typed): a module with ``get_delta_weight(name)``, ``scale_delta_weight_rows_(name,
      factors)`` and ``active_adapters`` (this package's RLRR/PACE layers), and PEFT LoRA layers (``lora_A``,
      ``lora_B``, ``scaling``; ΔW = scaling·B@A, projected through the rows of B). The constrained quantity is
      the adapter's effective update ΔW, anchored at 0, so the radius bounds the adapter's update to the
      frozen weight (ratio mode: ``ratio·‖W_base‖``, per row for inf-op). Their raw parameters are not constrained
      again. LoRA with DoRA and LoRA on embeddings are not supported: their raw parameters fall back to plain
      weights (with a warning for DoRA).

    ``mode='project'``: call ``project()`` after every optimizer step. ``mode='penalty'``: add ``penalty()`` to the
    loss, ``Σ_l λ_l·dist(W_l − W0_l)`` (``ΔW`` for adapters, ``W`` for the head) with ``dist`` the squared Frobenius
    norm (``'frob'``) or the max-row L1 norm (``'inf-op'``), ``λ_l = penalty_weight·(1, 1, γ, γ²)[stage]``
    (``γ = penalty_stage_scale``) and ``head_penalty_weight`` for the head (``None``: ``penalty_weight``, and the head
    is penalized only when ``head_radius`` is set); radii are then optional.
    ``loss()`` / ``after_step()`` do the right thing for the chosen mode. Anchors are training state:
    save ``state_dict()`` with checkpoints and ``load_state_dict()`` it on resume.
    """

    def __init__(
        self,
        model: nn.Module,
        norm: Norm = "frob",
        radius: float | None = None,
        ratio: float | None = None,
        depth_scale: float = 1.0,
        head_radius: float | None = None,
        head_names: tuple[str, ...] = HEAD_NAMES,
        mode: Literal["project", "penalty"] = "project",
        penalty_weight: float = 1.0,
        block_path: str | None = None,
        penalty_stage_scale: float = 1.0,
        head_penalty_weight: float | None = None,
    ) -> None:
        if norm not in ("frob", "inf-op"):
            raise ValueError(f"norm must be 'frob' or 'inf-op', got {norm!r}.")
        if mode not in ("project", "penalty"):
            raise ValueError(f"mode must be 'project' or 'penalty', got {mode!r}.")
        if radius is not None and ratio is not None:
            raise ValueError("give exactly one of radius (absolute D) or ratio (D_l = ratio·‖W0‖), not both.")
        if radius is None and ratio is None and mode == "project":
            raise ValueError("mode='project' needs a radius: give exactly one of radius=... or ratio=....")
        for label, val in (("radius", radius), ("ratio", ratio), ("head_radius", head_radius)):
            if val is not None and val < 0:
                raise ValueError(f"{label} must be >= 0, got {val}.")
        if depth_scale <= 0 or penalty_weight < 0:
            raise ValueError(f"depth_scale must be > 0 and penalty_weight >= 0, got {depth_scale}, {penalty_weight}.")
        if penalty_stage_scale <= 0 or (head_penalty_weight is not None and head_penalty_weight < 0):
            raise ValueError(f"penalty_stage_scale must be > 0 and head_penalty_weight >= 0 (or None), got "
                             f"{penalty_stage_scale}, {head_penalty_weight}.")
        self.model, self.norm, self.mode = model, norm, mode
        self.radius, self.ratio, self.depth_scale = radius, ratio, float(depth_scale)
        self.head_radius, self.head_names = head_radius, tuple(head_names)
        self.penalty_weight = float(penalty_weight)
        self.penalty_stage_scale = float(penalty_stage_scale)
        self.head_penalty_weight = None if head_penalty_weight is None else float(head_penalty_weight)
        self.items: list[_Item] = []
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._build(block_path)

    # -- construction --------------------------------------------------------------------------------
    def _positions(self, block_path: str | None) -> tuple[dict[int, str], dict[int, int]]:
        """Map module id -> 'before'/'after'/'block' and module id -> block index."""
        try:
            _, blocks = find_blocks(self.model, block_path)
        except ValueError:
            staged_penalty = self.mode == "penalty" and self.penalty_stage_scale != 1.0
            if block_path is not None or (self.radius is not None and self.depth_scale != 1.0) or staged_penalty:
                raise
            blocks = nn.ModuleList()
        block_of: dict[int, int] = {}
        for i, block in enumerate(blocks):
            for m in block.modules():
                block_of[id(m)] = i
        where: dict[int, str] = {}
        seen_blocks = False
        for _, m in self.model.named_modules():
            if m is blocks:
                seen_blocks = True
            where[id(m)] = "block" if id(m) in block_of else ("after" if seen_blocks else "before")
        self._n_blocks = len(blocks)
        return where, block_of

    def _stage(self, module: nn.Module, where: dict[int, str], block_of: dict[int, int]) -> int:
        """The stage 0..3 of a module: its quarter of the blocks; 0 before them, 3 after them."""
        pos = where.get(id(module), "before")
        if pos == "block":
            return (4 * block_of[id(module)]) // self._n_blocks
        return 0 if pos == "before" else 3

    def _radius(self, stage: int, reference: Tensor | None) -> tuple[float, Tensor | None, str]:
        """(radius, per-row radii or None, stage label) of a non-head tensor of ``stage`` whose reference weight (the
        anchor ``W0``, or an adapter's frozen base weight) is ``reference``."""
        if self.ratio is None:
            s = self.depth_scale
            radius = self.radius if self.radius is not None else math.inf
            return radius * (1.0, 1.0, s, s * s)[stage], None, f"stage{stage}"
        if reference is None:
            raise ValueError("ratio mode needs the frozen base weight of every adapter layer; use radius=... instead.")
        if self.norm == "frob":
            return self.ratio * _norm(reference, "frob"), None, "ratio"
        rows = self.ratio * _row_l1(reference.detach())
        return float(rows.max()) if rows.numel() else 0.0, rows, "ratio"

    def _stage_penalty(self, stage: int) -> float:
        g = self.penalty_stage_scale
        return self.penalty_weight * (1.0, 1.0, g, g * g)[stage]

    def _head(self) -> tuple[bool, float, float]:
        """(whether the head is constrained at all, its radius, its penalty weight)."""
        in_penalty = self.mode == "penalty" and self.head_penalty_weight is not None
        weight = self.head_penalty_weight if self.head_penalty_weight is not None else self.penalty_weight
        radius = self.head_radius if self.head_radius is not None else math.inf
        return self.head_radius is not None or in_penalty, radius, weight

    def _is_head(self, name: str, module: nn.Module, where: dict[int, str]) -> bool:
        if where.get(id(module)) == "block":
            return False
        parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
        return any(p in self.head_names for p in parts)

    def _build(self, block_path: str | None) -> None:
        where, block_of = self._positions(block_path)
        head_on, head_radius, head_weight = self._head()
        handled: set[int] = set()
        modules = list(self.model.named_modules())
        for mname, m in modules:  # adapters first, so their raw parameters are not taken as plain weights
            kind = "adapter" if _is_generic_adapter(m) else ("lora" if _is_lora(m) else None)
            if kind is None:
                continue
            own = _own_adapter_params(m)
            if not any(p.requires_grad for p in own):
                continue
            made = False
            for a in _active(m):
                if kind == "lora":
                    if a not in m.lora_A or a not in m.lora_B:
                        continue
                    if getattr(m, "use_dora", {}).get(a, False):
                        warnings.warn(
                            f"DistanceConstraint: {mname} uses DoRA, which is not supported as an adapter; its "
                            "raw parameters are constrained as plain weights instead.",
                            stacklevel=3,
                        )
                        continue
                base = _base_layer(m)
                ref = getattr(base, "weight", None) if base is not None else getattr(m, "weight", None)
                name = f"{mname}.delta_weight.{a}"
                made = True
                if self._is_head(mname, m, where):
                    if head_on:
                        self.items.append(_Item(name, kind, head_radius, module=m, adapter=a, stage="head",
                                                penalty_weight=head_weight))
                    continue
                stage = self._stage(m, where, block_of)
                radius, rows, label = self._radius(stage, ref)
                self.items.append(_Item(name, kind, radius, module=m, adapter=a, stage=label, row_radius=rows,
                                        penalty_weight=self._stage_penalty(stage)))
            if made:
                handled.update(id(p) for p in own)

        for mname, m in modules:
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in handled or not p.requires_grad or p.ndim not in CONSTRAINED_NDIMS:
                    continue
                handled.add(id(p))
                full = f"{mname}.{pname}" if mname else pname
                if self._is_head(mname, m, where):
                    if head_on:
                        self.items.append(_Item(full, "head", head_radius, param=p, stage="head",
                                                penalty_weight=head_weight))
                    continue
                anchor = p.detach().clone()
                stage = self._stage(m, where, block_of)
                radius, rows, label = self._radius(stage, anchor)
                self.items.append(_Item(full, "weight", radius, param=p, anchor=anchor, stage=label, row_radius=rows,
                                        penalty_weight=self._stage_penalty(stage)))

    # -- the constrained quantity ----------------------------------------------------------------------
    def _delta(self, it: _Item) -> Tensor:
        if it.kind == "adapter":
            return it.module.get_delta_weight(it.adapter)  # type: ignore[union-attr]
        if it.kind == "lora":
            m, a = it.module, it.adapter
            A, B = m.lora_A[a].weight, m.lora_B[a].weight  # type: ignore[union-attr,index]
            if A.ndim == 2 and B.ndim == 2:
                return m.scaling[a] * (B @ A)  # type: ignore[union-attr,index]
            return m.get_delta_weight(a)  # type: ignore[union-attr]  # convolutions: rows = output channels
        assert it.param is not None
        return it.param if it.anchor is None else it.param - it.anchor

    def _scratch_delta(self, it: _Item) -> Tensor:
        """``W − W0`` written into a buffer shared by all items of the same dtype/device (grown as needed)."""
        p, anchor = it.param, it.anchor
        assert p is not None and anchor is not None
        key = (p.dtype, p.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < p.numel():
            buf = self._scratch[key] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        out = buf[: p.numel()].view(p.shape)
        return torch.sub(p.detach(), anchor, out=out)

    def _bounded(self) -> Iterator[_Item]:
        """The constrained tensors with a finite radius (an infinite one never binds)."""
        return (it for it in self.items if not math.isinf(it.radius))

    @torch.no_grad()
    def project(self) -> int:
        """Project every constrained tensor back into its ball (in place); returns how many were rescaled."""
        rescaled = 0
        for it in self._bounded():
            if it.kind in ("weight", "head"):
                # Δ = W − W0 goes into a reused scratch buffer (the head, anchored at zero, is scaled in place):
                # one pass over the weight when it is inside its ball, two more when it is rescaled.
                delta = it.param if it.anchor is None else self._scratch_delta(it)
                if self.norm == "frob":
                    changed = project_frobenius_(delta, it.radius) < 1.0
                else:
                    changed = bool((project_inf_op_(delta, it.bound) < 1).any())
                if changed:
                    if it.anchor is not None:
                        torch.add(it.anchor, delta, out=it.param.data)
                    rescaled += 1
                continue
            factors = _row_factors(self._delta(it).detach(), it.bound, self.norm)
            if not bool((factors < 1).any()):
                continue
            rescaled += 1
            if it.kind == "adapter":
                it.module.scale_delta_weight_rows_(it.adapter, factors)  # type: ignore[union-attr]
            else:  # LoRA: row i of ΔW = scaling · B[i] @ A
                w = it.module.lora_B[it.adapter].weight  # type: ignore[union-attr,index]
                w.mul_(factors.to(w.dtype).reshape(-1, *([1] * (w.ndim - 1))))
        return rescaled

    def _penalty_distance(self, delta: Tensor) -> Tensor:
        """``‖Δ‖²_F`` (``'frob'``) or the max-row L1 norm ``max_row ‖Δ_row‖₁`` (``'inf-op'``); differentiable."""
        delta = delta.float()
        if self.norm == "frob":
            return delta.pow(2).sum()
        return _rows(delta).abs().sum(1).max()

    def penalty(self) -> Tensor:
        """``Σ_l λ_l·dist(W_l − W0_l)`` (``W`` for the head, ``ΔW`` for adapters; see the class docstring);
        differentiable."""
        terms = [it.penalty_weight * self._penalty_distance(self._delta(it)) for it in self.items
                 if it.penalty_weight > 0]
        if not terms:
            p = next(self.model.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else None)
        return torch.stack(terms).sum()

    def loss(self) -> Tensor:
        """``penalty()`` in penalty mode, else a zero tensor (for adding to the training loss)."""
        if self.mode == "penalty":
            return self.penalty()
        p = next(self.model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def after_step(self) -> int:
        """``project()`` in project mode, else nothing; call after every optimizer step."""
        return self.project() if self.mode == "project" else 0

    # -- reporting -----------------------------------------------------------------------------------
    def radii(self) -> dict[str, float]:
        """The radius of every constrained tensor; with per-row radii (inf-op ratio mode) the largest one, a bound on
        the tensor's max-row L1 distance (see :meth:`row_radii`)."""
        return {it.name: it.radius for it in self.items}

    def row_radii(self) -> dict[str, Tensor]:
        """The per-row radii ``ratio·‖W0_row‖₁`` of the tensors that have them (inf-op ratio mode)."""
        return {it.name: it.row_radius.detach().cpu().clone() for it in self.items if it.row_radius is not None}

    @torch.no_grad()
    def distances(self) -> dict[str, float]:
        """Current distance of every constrained tensor from its anchor, in the chosen norm."""
        return {it.name: _norm(self._delta(it), self.norm) for it in self.items}

    @torch.no_grad()
    def max_violation(self) -> float:
        """``max(0, max_l (distance_l − D_l))`` (per row, ``‖Δ_row‖₁ − D_row``, with per-row radii)."""
        worst = 0.0
        for it in self._bounded():
            delta = self._delta(it)
            if it.row_radius is not None:
                l1 = _row_l1(delta)
                excess = float((l1 - it.row_radius.to(l1.device, l1.dtype)).max())
            else:
                excess = _norm(delta, self.norm) - it.radius
            worst = max(worst, excess)
        return worst

    def state_dict(self) -> dict[str, Any]:
        """The anchors ``W0`` (needed to resume: a new constraint would anchor at the resumed weights)."""
        return {"anchors": {it.name: it.anchor.detach().cpu().clone() for it in self.items if it.anchor is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchors = state["anchors"]
        mine = {it.name: it for it in self.items if it.anchor is not None}
        if set(anchors) != set(mine):
            missing, extra = sorted(set(mine) - set(anchors)), sorted(set(anchors) - set(mine))
            raise ValueError(
                f"DistanceConstraint checkpoint does not match the model's constrained weights "
                f"(missing: {missing[:5]}, unexpected: {extra[:5]}); build the constraint with the same settings."
            )
        for name, it in mine.items():
            src = anchors[name]
            if tuple(src.shape) != tuple(it.anchor.shape):  # type: ignore[union-attr]
                raise ValueError(f"anchor {name!r} has shape {tuple(src.shape)} in the checkpoint, "
                                 f"{tuple(it.anchor.shape)} in the model.")  # type: ignore[union-attr]
            it.anchor = src.to(it.anchor.device, it.anchor.dtype).clone()  # type: ignore[union-attr]
            if self.ratio is not None and it.kind == "weight":
                it.radius, it.row_radius, _ = self._radius(0, it.anchor)


class DistanceRegularizer(Regularizer):
    """The layer-wise distance constraint as a trainer regularizer: a projection after every optimizer step
    (``project`` mode) or a soft penalty term ``loss_distance`` (``penalty`` mode)."""

    def __init__(self, constraint: DistanceConstraint) -> None:
        self.constraint = constraint

    enabled_by = "uses_distance"

    @classmethod
    def create(cls, build: BuildContext) -> "DistanceRegularizer":
        cfg = build.config
        return cls(DistanceConstraint(
            build.model, norm=cfg.distance_norm, radius=cfg.distance_radius, ratio=cfg.distance_ratio,
            depth_scale=cfg.distance_depth_scale, head_radius=cfg.distance_head_radius, mode=cfg.distance_mode,
            penalty_weight=cfg.distance_penalty_weight, block_path=cfg.block_path,
            penalty_stage_scale=cfg.distance_penalty_stage_scale, head_penalty_weight=cfg.distance_head_penalty_weight,
        ))

    def loss(self, step: StepContext) -> dict[str, Tensor]:
        return {"loss_distance": self.constraint.penalty()} if self.constraint.mode == "penalty" else {}

    def after_step(self) -> None:
        self.constraint.after_step()

    def logs(self) -> dict[str, float]:
        return {"distance_max_violation": round(float(self.constraint.max_violation()), 6)}
