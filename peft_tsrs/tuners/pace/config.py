"""Configuration of the PACE tuner (Ni et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from peft.utils import PeftType

from ...registration import ensure_peft_type
from ..config_base import TunerConfigBase
from ..defaults import DEFAULT_HEAD_MODULES
from ..tuners_utils import check_rank

ensure_peft_type("pace")

PACE_VARIANTS = ("lora_mul_vpt_add", "lora_add", "vpt_add")
NOISE_SHAPES = ("BC", "BTC")
NOISE_SCHEDULES = ("linear", "constant")


@dataclass
class PACEConfig(TunerConfigBase):
    """Configuration of a :class:`PACEModel`: an adapter whose branch is multiplied by noise ``z ~ N(1, σ_l²)`` in
    training (pair it with the consistency loss of ``RegularizedTrainer``, ``RegularizerConfig(pace_weight=...)``).

    Args:
        r: Rank of the adapter (official default 10).
        variant: ``"lora_mul_vpt_add"`` (official default): ``W' = W0 ⊙ (1 + A B)``,
            ``b' = W0 (P q) + b0 ⊙ (1 + δb)``; ``"lora_add"``: ``W' = W0 + A B``, ``b' = b0 + b_lora`` (its own bias);
            ``"vpt_add"``: ``W' = W0``, ``b' = b0 + W0 (P q)``. Shapes and inits as the official code: ``A`` (out × r)
            = 0, ``B`` (r × in) Xavier-uniform, ``P`` (in × r) = 0, ``q`` Xavier-uniform as an (r × 1) matrix (stored
            as a vector of size r), ``δb = b_lora = 0``.
        sigma: Noise scale σ (official grid 0.1–2). The noise is off in eval mode.
        noise_shape: ``"BC"``: one ``z`` per (sample, channel), shared across tokens; ``"BTC"``: per token.
        noise_schedule: ``"linear"``: σ decreases with depth (block 1 gets σ, the last block 2σ/B, the head σ/B);
            ``"constant"``: σ everywhere.
        noise_first_block: Whether block 0 is noised too (the official schedule leaves it noiseless).
        noise_head: Multiply the head's logits by noise with σ/B (the official code treats the head as an adapter
            branch).
        head_modules: Names of the head module(s) (default ``["classifier"]``).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in PEFT.
        init_weights: ``True``: the official init, which starts exactly at the pretrained model (``A = 0``,
            ``P = 0``, ``δb = b_lora = 0``); ``False``: a random non-identity adapter (for tests).
        regularizers: An optional training recipe (``RegularizerConfig`` or its dict) saved with the adapter.

    The defaults follow the official code (MaxwellYaoNi/PACE, Vision): ``variant="lora_mul_vpt_add"``, ``r=10``,
    ``noise_shape="BC"``, the linear depth schedule with block 0 noiseless, the head noised, the identity init.
    Remaining deviations, each an option with its default here:

    * ``target_modules=None``: the blocks' linear layers of the model type (ViT: q/k/v/o, fc1, fc2; BERT-style:
      query/key/value, attention output, intermediate and output dense). The official code adapts every ``nn.Linear``
      of its timm ViT (the same set there); a BERT pooler is not adapted unless named in ``target_modules``.
    * ``q`` is stored as a vector of size ``r`` (the official code keeps an ``r × 1`` matrix; same values and init).
    * ``sigma=1.0``: the official script has no PACE default (σ is chosen per task from its grid 0.1–2).
    * ``noise_first_block=False``: the official ViT-B setting; its Swin-B setting noises block 0 as well (``True``).
    * The noise is drawn in the adapter branch's dtype (the official code draws it in float32).
    """

    r: int = field(default=10, metadata={"help": "Rank of the adapter (official: 10)."})
    variant: Literal["lora_mul_vpt_add", "lora_add", "vpt_add"] = field(
        default="lora_mul_vpt_add", metadata={"help": "Base adapter: lora_mul_vpt_add (official), lora_add, vpt_add."}
    )
    sigma: float = field(default=1.0, metadata={"help": "Noise scale σ (official grid 0.1-2)."})
    noise_shape: Literal["BC", "BTC"] = field(default="BC", metadata={"help": "'BC' per sample+channel, 'BTC' per token."})
    noise_schedule: Literal["linear", "constant"] = field(
        default="linear", metadata={"help": "σ decreasing linearly with depth, or constant."}
    )
    noise_first_block: bool = field(default=False, metadata={"help": "Noise in block 0 as well."})
    noise_head: bool = field(default=True, metadata={"help": "Noise the head's logits with σ/B."})
    head_modules: Optional[list[str]] = field(default=None, metadata={"help": "Head module names (default: classifier)."})
    init_weights: bool = field(default=True, metadata={"help": "True: start at the pretrained model; False: random."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PACE
        check_rank(self.r, "PACEConfig")
        for name, allowed in (("variant", PACE_VARIANTS), ("noise_shape", NOISE_SHAPES),
                              ("noise_schedule", NOISE_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"PACEConfig: unknown {name} {getattr(self, name)!r}; use one of {allowed}.")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or not (
            math.isfinite(self.sigma) and self.sigma >= 0
        ):
            raise ValueError(f"PACEConfig: `sigma` must be a finite number >= 0, got {self.sigma!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"PACEConfig: `init_weights` must be True or False, got {self.init_weights!r}.")
        self._post_init_common("PACEConfig", ())

    def _check_saved_tensors(self, names: set[str], path: str) -> None:
        """A ``vpt_add`` adapter saved before the variant followed the official code carries a ``b0 ⊙ δb`` term
        (``pace_bias_scale``) that ``vpt_add`` no longer has: refuse it rather than load it without that term."""
        if self.variant == "vpt_add" and any(n.split(".")[-1] == "pace_bias_scale" for n in names):
            raise ValueError(
                f"{path}: this vpt_add adapter was saved by an earlier peft-tsrs whose vpt_add also had a b0 ⊙ δb term "
                f"(pace_bias_scale); vpt_add now follows the official VPT-add (b' = b0 + W0 P q) and would load it "
                f"without that term. Train the adapter again, or load it with the peft-tsrs version that saved it."
            )

    @property
    def explicit_head(self) -> bool:
        """Whether the user named the head modules (then a missing head is an error)."""
        return self.head_modules is not None

    @property
    def heads(self) -> list[str]:
        """The head module names: ``head_modules``, else :data:`~peft_tsrs.tuners.defaults.DEFAULT_HEAD_MODULES`."""
        return list(self.head_modules if self.head_modules is not None else DEFAULT_HEAD_MODULES)


def depth_sigma(sigma: float, depth: Optional[int], n_blocks: int, schedule: str, first_block: bool) -> float:
    """σ_l of a module in block ``depth`` (``None``: outside the blocks) of a model with ``n_blocks`` blocks."""
    if depth is None:
        return float(sigma)
    if depth == 0:
        return float(sigma) if first_block else 0.0
    if schedule == "constant":
        return float(sigma)
    return float(sigma) * max(n_blocks - depth + 1, 0) / n_blocks


def head_sigma(sigma: float, n_blocks: int, schedule: str) -> float:
    """σ of the head's logits: σ/B with the linear schedule."""
    return float(sigma) if schedule == "constant" else float(sigma) / n_blocks
