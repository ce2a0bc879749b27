"""The modules of armnet_ops, one import away: `from armnet_ops.nn import CARAFEPack`."""
from .carafe import CARAFE, CARAFEPack
from .cca import CrissCrossAttention
from .directional_conv import DirectionalConv2d, DirectionalConv2dPair

__all__ = ["CARAFE", "CARAFEPack", "CrissCrossAttention", "DirectionalConv2d", "DirectionalConv2dPair"]
