"""PACE: generalizing PEFT by consistency regularization (Ni et al., NeurIPS 2024)."""

from .config import PACEConfig, depth_sigma, head_sigma
from .layer import Linear, PACELayer
from .model import PACEModel

__all__ = ["Linear", "PACEConfig", "PACELayer", "PACEModel", "depth_sigma", "head_sigma"]
