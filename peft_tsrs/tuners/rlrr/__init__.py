"""RLRR: residual low-rank rescaling (Dong et al., CVPR 2024)."""

from .config import RLRRConfig
from .layer import Linear, RLRRLayer, ScaleShift
from .model import RLRRModel

__all__ = ["Linear", "RLRRConfig", "RLRRLayer", "RLRRModel", "ScaleShift"]
