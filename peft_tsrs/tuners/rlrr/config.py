"""Configuration of the RLRR tuner (residual low-rank rescaling, Dong et al., CVPR 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.utils import PeftType

from ...registration import ensure_peft_type
from ..config_base import TunerConfigBase
from ..tuners_utils import check_rank

ensure_peft_type("rlrr")

RLRR_INITS = ("identity", "kaiming", "random")


@dataclass
class RLRRConfig(TunerConfigBase):
    """Configuration of an :class:`RLRRModel`.

    Every targeted ``nn.Linear`` computes ``y = x (W0 + W0 ⊙ (L R))ᵀ + b0 + shift`` with ``L ∈ R^{out×r}``,
    ``R ∈ R^{r×in}``; ``r=1`` is the paper's outer product ``s_out s_inᵀ``.

    Args:
        r: Rank of the rescaling matrix ``L R`` (1 reproduces the paper).
        target_modules: Linear modules to adapt (PEFT matching rules). ``None`` uses the defaults of the model type
            (ViT/BERT-style: query, key, value, attention output, MLP in, MLP out).
        exclude_modules: Modules never to adapt.
        layers_to_transform: Only adapt blocks with these indices.
        layers_pattern: Name of the block list used with ``layers_to_transform``.
        init_weights: ``True`` / ``"identity"`` (default, a deviation from the official code): ``L = 0``, ``R``
            ``kaiming_uniform_(a=√5)`` (bound ``1/√in``), ``shift = 0``, so the model starts exactly at the pretrained
            one. ``"kaiming"``: the official initialization, ``L`` and ``R`` both ``kaiming_uniform_(a=0)`` (gain √2,
            bound ``√(6 / fan_in)``: ``√(6 / r)`` for ``L``, ``√(6 / in)`` for ``R``), ``shift = 0``; step 0 is *not*
            the pretrained model. ``False`` / ``"random"``: a random non-identity adapter (for tests).
        ssf: Also add SSF scale/shift (``y * γ + β``) after the modules in ``ssf_modules`` (LayerNorms and the
            patch embedding, as in the official ViT code). ``γ = 1, β = 0`` with the identity init;
            ``γ ~ N(1, .02), β ~ N(0, .02)`` with ``"kaiming"``.
        ssf_modules: LayerNorm / Conv2d modules that get SSF (``None``: defaults of the model type).
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. the classifier head).
        regularizers: An optional training recipe (a ``RegularizerConfig`` or its dict) saved with the adapter and picked up by
            ``RegularizedTrainer`` when no recipe is passed to it.

    Deviations from the official code (zstarN70/RLRR), each an option with its default here:

    * ``init_weights=True`` (identity): the official init is ``"kaiming"`` (the model then does not start at the
      pretrained one).
    * ``ssf=False``: the official ViT code always adds SSF (after both LayerNorms of every block, the final
      LayerNorm and the patch embedding); ``ssf=True`` does the same with the default ``ssf_modules``.
    * ``r=1`` is the official rank; ``r > 1`` generalizes ``s_out s_inᵀ`` to ``L R``.
    * The head: the official code starts the new classification head at zero; here the head stays the model's
      (e.g. transformers' random init). Zero it yourself to match (``nn.init.zeros_`` on the ``modules_to_save``
      copy's weight and bias).
    """

    r: int = field(default=1, metadata={"help": "Rank of the rescaling matrix L R (1 = the paper)."})
    init_weights: Union[bool, Literal["identity", "kaiming", "random"]] = field(
        default=True,
        metadata={"help": "True/'identity': start at the pretrained model; 'kaiming': official init; False/'random'."},
    )
    ssf: bool = field(default=False, metadata={"help": "Add SSF scale/shift after LayerNorms and the patch embedding."})
    ssf_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules (LayerNorm/Conv2d) that get SSF; None = model-type defaults."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RLRR
        check_rank(self.r, "RLRRConfig")
        if self.init_weights not in (True, False) + RLRR_INITS:
            raise ValueError(
                f"RLRRConfig: unknown init_weights {self.init_weights!r}; use True/'identity', 'kaiming' "
                f"(official) or False/'random'."
            )
        self._post_init_common("RLRRConfig", ("ssf_modules",))

    @property
    def init_mode(self) -> str:
        """The initialization as one of ``identity``, ``kaiming``, ``random``."""
        if self.init_weights is True:
            return "identity"
        if self.init_weights is False:
            return "random"
        return str(self.init_weights)
