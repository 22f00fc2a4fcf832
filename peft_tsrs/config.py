"""`RegularizerConfig`: which regularizers :class:`~peft_tsrs.RegularizedTrainer` adds to the loss, and how.

Every term is off by default (zero weight or ``None``) and switched on independently; the other fields carry the
papers' defaults, so ``RegularizerConfig(tsrs_weight=1.0)`` is TSRS as published. The dataclass is plain (no torch),
so it can be stored inside an adapter config, parsed from the command line by ``HfArgumentParser`` (through
:class:`~peft_tsrs.RegularizedTrainingArguments`) and loaded from YAML. It is the one place that validates the
regularizer options; everything built from it trusts the values.

``TSRSConfig`` is the deprecated former name (the config holds four methods, not only TSRS): importing it still works
and gives this class, with a ``FutureWarning``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from ._deprecation import renamed

PACE_MODES = ("full", "lazy", "fast")
DISTANCE_NORMS = ("frob", "inf-op")
DISTANCE_MODES = ("project", "penalty")
TASK_LOSS_PATHS = ("noisy", "clean")
LABEL_CORRECTION_TIMINGS = ("before_loss", "after_loss")
TEMPERATURE_SCHEDULES = ("epoch", "step")
# Keys of earlier releases, still read (with a FutureWarning) from YAML, dicts and adapter_config.json files.
RENAMED_KEYS = {"tsrs_block_path": "block_path"}


@dataclass
class RegularizerConfig:
    """Which regularizers to apply during fine-tuning, and how.

    TSRS noise stability (Shen et al., CVPR 2024):
        tsrs_weight: λ of the noise-stability term (paper default 1.0; 0 disables).
        tsrs_noise_std: std σ of the Gaussian noise added to the input of block ``tsrs_inject_layer`` (paper 0.2).
        tsrs_inject_layer: block I receiving the noise (``None``: the middle block).
        tsrs_measure_from: first block N whose output perturbation is penalized (``None``: = I).
        tsrs_task_loss_path: ``"noisy"`` (official code) or ``"clean"``: which pass the task loss is computed on.
        bss_weight: weight of Batch Spectral Shrinkage (Chen et al., NeurIPS 2019), ``Σ`` of the ``bss_k`` smallest
            squared singular values of the batch of features the head reads (official TSRS code: 1e-3; 0 disables).
        bss_k: how many of the smallest singular values BSS shrinks (official: 1).
    PACE consistency (Ni et al., NeurIPS 2024):
        pace_weight: λ of ``mean_batch Σ_classes (logits₁ − logits₂)²`` (official grid 0.02–1; 0 disables).
        pace_mode: ``"full"`` (batch duplicated in one forward), ``"lazy"`` (every ``pace_lazy_every`` steps on half
            a batch) or ``"fast"`` (against the logits stored at the example's previous visit).
        pace_sigma: σ of PACE's training noise ``z ~ N(1, σ_d²)`` on the adapter branch of LoRA and RLRR layers, with
            the paper's depth schedule (official grid 0.1–2). ``None``: the PACE adapter's own σ (a PACE adapter draws
            the noise itself; on any other model ``pace_weight > 0`` is then refused). ``0``: the consistency term
            without noise, on purpose (an ablation; in ``full`` mode the term is then exactly 0). ``> 0`` with
            ``pace_weight = 0``: the noise alone, without the consistency term (the other ablation).
    Layer-wise distance constraint (Li & Zhang, NeurIPS 2021):
        distance_norm: ``"frob"`` or ``"inf-op"`` (``None`` disables).
        distance_radius: absolute radius D of the first stages (grows by ``distance_depth_scale`` per later stage).
        distance_ratio: relative radius, ``D_l = ratio · ‖W0_l‖`` (instead of ``distance_radius``).
        distance_head_radius: radius of the new head around zero (``None``: head unconstrained).
        distance_mode: ``"project"`` after every optimizer step, or ``"penalty"`` (``λ·dist(W − W0)`` added to the loss,
            ``dist`` the squared Frobenius norm or the max-row L1 norm as ``distance_norm`` says).
        distance_penalty_stage_scale: γ of the penalty mode: λ, λ, λγ, λγ² over the four stages (official default 1).
        distance_head_penalty_weight: λ of the head's penalty around zero (``None``: the head is penalized with
            ``distance_penalty_weight`` only when ``distance_head_radius`` is set).
    Regularized self-labeling (Li & Zhang, NeurIPS 2021):
        label_correction_threshold: confidence above which a disagreeing stored label is overwritten (paper 0.9;
            ``None`` disables).
        label_correction_start_epoch: first epoch of label correction (paper 10). Epochs count from 1 as in the
            official code: epoch ``e`` is ``e − 1 <= state.epoch < e``, so 10 starts at ``state.epoch`` 9.
        label_correction_timing: ``"before_loss"`` (official: a corrected label is trained on in the same step) or
            ``"after_loss"`` (earlier releases: from the example's next visit on).
        reweight_start_epoch: first epoch of loss reweighting, counted from 1 (paper 5; ``None`` disables).
        reweight_temperature: T0 of ``softmax(−l_i / T)``, ``T = T0·max(0.5, exp(−0.1(epoch − start)))``.
        reweight_temperature_schedule: ``"epoch"`` (official: T updated once per epoch, with the number of the epoch
            just ended) or ``"step"`` (earlier releases: the formula at every step with the fractional epoch).
        index_column: dataset column holding a stable per-example index (needed by self-labeling and PACE-fast).
    Shared:
        block_path: dotted path of the block ``ModuleList`` (TSRS injection, distance-constraint stages) when it cannot
            be found automatically (formerly ``tsrs_block_path``).
    """

    tsrs_weight: float = field(default=0.0, metadata={"help": "TSRS noise-stability weight λ (paper: 1.0; 0 = off)."})
    tsrs_noise_std: float = field(default=0.2, metadata={"help": "TSRS noise std σ (paper: 0.2)."})
    tsrs_inject_layer: Optional[int] = field(
        default=None, metadata={"help": "Block receiving the noise (default: the middle block)."}
    )
    tsrs_measure_from: Optional[int] = field(
        default=None, metadata={"help": "First block whose perturbation is penalized (default: inject layer)."}
    )
    tsrs_task_loss_path: str = field(
        default="noisy", metadata={"help": "Task loss on the 'noisy' (official) or 'clean' pass.",
                                   "choices": list(TASK_LOSS_PATHS)}
    )
    bss_weight: float = field(
        default=0.0, metadata={"help": "Batch Spectral Shrinkage weight on the head's input features (official TSRS "
                                       "code: 1e-3; 0 = off)."}
    )
    bss_k: int = field(default=1, metadata={"help": "BSS: number of smallest singular values shrunk (official: 1)."})
    pace_weight: float = field(default=0.0, metadata={"help": "PACE consistency weight λ (0 = off)."})
    pace_mode: str = field(
        default="full", metadata={"help": "PACE consistency variant.", "choices": list(PACE_MODES)}
    )
    pace_lazy_every: int = field(default=2, metadata={"help": "PACE-lazy: apply every k steps."})
    pace_sigma: Optional[float] = field(
        default=None, metadata={"help": "PACE noise σ on LoRA/RLRR adapter branches (None: the PACE adapter's own σ)."}
    )
    distance_norm: Optional[str] = field(
        default=None, metadata={"help": "Distance constraint norm: 'frob' or 'inf-op' (None = off)."}
    )
    distance_radius: Optional[float] = field(default=None, metadata={"help": "Absolute radius D of the first stages."})
    distance_ratio: Optional[float] = field(default=None, metadata={"help": "Relative radius: D_l = ratio * ||W0_l||."})
    distance_depth_scale: float = field(default=1.0, metadata={"help": "Radius growth per later stage (D, D, Ds, Ds²)."})
    distance_head_radius: Optional[float] = field(
        default=None, metadata={"help": "Radius of the new head around zero (None = unconstrained)."}
    )
    distance_mode: str = field(
        default="project", metadata={"help": "'project' after each step or soft 'penalty'.",
                                     "choices": list(DISTANCE_MODES)}
    )
    distance_penalty_weight: float = field(default=1e-3, metadata={"help": "λ of the soft penalty λ||W - W0||²."})
    label_correction_threshold: Optional[float] = field(
        default=None, metadata={"help": "Self label-correction confidence threshold (paper: 0.9; None = off)."}
    )
    label_correction_start_epoch: int = field(default=10, metadata={"help": "First epoch of label correction."})
    reweight_start_epoch: Optional[int] = field(
        default=None, metadata={"help": "First epoch of loss reweighting (paper: 5; None = off)."}
    )
    reweight_temperature: float = field(default=1.0, metadata={"help": "Reweighting temperature T0."})
    index_column: str = field(default="index", metadata={"help": "Dataset column with a stable example index."})
    label_correction_timing: str = field(
        default="before_loss", metadata={"help": "Correct labels 'before_loss' (official) or 'after_loss'.",
                                         "choices": list(LABEL_CORRECTION_TIMINGS)}
    )
    reweight_temperature_schedule: str = field(
        default="epoch", metadata={"help": "Anneal T once per 'epoch' (official) or every 'step'.",
                                   "choices": list(TEMPERATURE_SCHEDULES)}
    )
    distance_penalty_stage_scale: float = field(
        default=1.0, metadata={"help": "Penalty growth γ per later stage (λ, λ, λγ, λγ²)."}
    )
    distance_head_penalty_weight: Optional[float] = field(
        default=None, metadata={"help": "Penalty λ of the head around zero (None: λ, only with a head radius)."}
    )
    block_path: Optional[str] = field(
        default=None, metadata={"help": "Dotted path of the model's block ModuleList, if not found automatically."}
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field to change."""
        def non_finite(value: Any) -> bool:  # a float anywhere in the value (also inside lists and dicts)
            if isinstance(value, float):
                return not math.isfinite(value)
            if isinstance(value, dict):
                value = list(value.values())
            return isinstance(value, (list, tuple)) and any(non_finite(v) for v in value)

        for f in dataclasses.fields(RegularizerConfig):  # first: NaN passes every comparison below
            if non_finite(getattr(self, f.name)):
                raise ValueError(f"RegularizerConfig.{f.name} must be a finite number, got {getattr(self, f.name)!r}; "
                                 f"set a real value (NaN would silently switch its term off, infinity drives the "
                                 f"weights to NaN).")
        for name in ("tsrs_weight", "tsrs_noise_std", "bss_weight", "pace_weight", "distance_penalty_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"RegularizerConfig.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("distance_radius", "distance_ratio", "distance_head_radius"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"RegularizerConfig.{name} must be > 0 (or None), got {value}.")
        if self.reweight_temperature <= 0:
            raise ValueError(f"RegularizerConfig.reweight_temperature must be > 0, got {self.reweight_temperature}.")
        if self.distance_depth_scale <= 0:
            raise ValueError(f"RegularizerConfig.distance_depth_scale must be > 0, got {self.distance_depth_scale}.")
        for name, allowed in (("pace_mode", PACE_MODES), ("distance_mode", DISTANCE_MODES),
                              ("tsrs_task_loss_path", TASK_LOSS_PATHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RegularizerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.distance_norm is not None:
            if self.distance_norm not in DISTANCE_NORMS:
                raise ValueError(f"RegularizerConfig.distance_norm must be one of {DISTANCE_NORMS} or None, "
                                 f"got {self.distance_norm!r}.")
            given = (self.distance_radius is not None) + (self.distance_ratio is not None)
            if given > 1 or (given == 0 and self.distance_mode == "project"):
                raise ValueError("RegularizerConfig: with distance_norm set, give exactly one of distance_radius "
                                 "(absolute) or distance_ratio (relative to ||W0||); the 'penalty' mode needs none.")
        if self.pace_lazy_every < 1:
            raise ValueError(f"RegularizerConfig.pace_lazy_every must be >= 1, got {self.pace_lazy_every}.")
        if self.pace_sigma is not None and self.pace_sigma < 0:  # NaN / infinity: refused above
            raise ValueError(f"RegularizerConfig.pace_sigma must be >= 0 (or None: the PACE adapter's own sigma), "
                             f"got {self.pace_sigma}.")
        if self.label_correction_threshold is not None and not 0 < self.label_correction_threshold <= 1:
            raise ValueError("RegularizerConfig.label_correction_threshold must be in (0, 1] or None, "
                             f"got {self.label_correction_threshold}.")
        for name in ("tsrs_inject_layer", "tsrs_measure_from"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"RegularizerConfig.{name} must be >= 0 (or None), got {value}.")
        for name, allowed in (("label_correction_timing", LABEL_CORRECTION_TIMINGS),
                              ("reweight_temperature_schedule", TEMPERATURE_SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"RegularizerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.bss_k < 1:
            raise ValueError(f"RegularizerConfig.bss_k must be >= 1 (how many smallest singular values), "
                             f"got {self.bss_k}.")
        if self.distance_penalty_stage_scale <= 0:
            raise ValueError("RegularizerConfig.distance_penalty_stage_scale must be > 0, "
                             f"got {self.distance_penalty_stage_scale}.")
        if self.distance_head_penalty_weight is not None and self.distance_head_penalty_weight < 0:
            raise ValueError("RegularizerConfig.distance_head_penalty_weight must be >= 0 (or None), "
                             f"got {self.distance_head_penalty_weight}.")

    # ------------------------------------------------------------------ what is on
    @property
    def uses_tsrs(self) -> bool:
        return self.tsrs_weight > 0

    @property
    def uses_bss(self) -> bool:
        return self.bss_weight > 0

    @property
    def uses_pace(self) -> bool:
        return self.pace_weight > 0

    @property
    def uses_pace_noise(self) -> bool:
        """PACE's noise on LoRA / RLRR adapter branches (``pace_sigma > 0``), with or without the consistency term."""
        return self.pace_sigma is not None and self.pace_sigma > 0

    @property
    def uses_pace_regularizer(self) -> bool:
        """The consistency term or, without it, PACE's noise on LoRA / RLRR adapter branches."""
        return self.uses_pace or self.uses_pace_noise

    @property
    def uses_distance(self) -> bool:
        return self.distance_norm is not None

    @property
    def uses_label_correction(self) -> bool:
        return self.label_correction_threshold is not None

    @property
    def uses_reweighting(self) -> bool:
        return self.reweight_start_epoch is not None

    @property
    def uses_self_labeling(self) -> bool:
        """Label correction or reweighting (the training-time parts of regularized self-labeling)."""
        return self.uses_label_correction or self.uses_reweighting

    @property
    def needs_index(self) -> bool:
        """Whether the training set must carry ``index_column``."""
        return self.uses_label_correction or (self.uses_pace and self.pace_mode == "fast")

    @property
    def is_noop(self) -> bool:
        return not (self.uses_tsrs or self.uses_bss or self.uses_pace_regularizer or self.uses_distance
                    or self.uses_label_correction or self.uses_reweighting)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RegularizerConfig":
        """Build from a dict, rejecting unknown keys with the list of valid ones (renamed keys of earlier releases
        are read with a ``FutureWarning``)."""
        data = upgrade_keys(data)
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown RegularizerConfig key(s) {unknown}; valid keys: {', '.join(cls.field_names())}")
        return cls(**data)

    @classmethod
    def from_object(cls, obj: Any) -> "RegularizerConfig":
        """Pick the RegularizerConfig fields off any object that has them (e.g. RegularizedTrainingArguments)."""
        return cls(**{name: getattr(obj, name) for name in cls.field_names()})


def upgrade_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the keys of earlier releases renamed (a ``FutureWarning`` names each)."""
    old = [k for k in data if k in RENAMED_KEYS]
    if not old:
        return data
    data = dict(data)
    for key in old:
        new = RENAMED_KEYS[key]
        warnings.warn(f"regularizer option {key!r} is renamed {new!r}; the old name will be removed.", FutureWarning,
                      stacklevel=3)
        value = data.pop(key)
        if data.get(new) is None:
            data[new] = value
    return data


__getattr__ = renamed(__name__, {"TSRSConfig": ("RegularizerConfig", lambda: RegularizerConfig)})
