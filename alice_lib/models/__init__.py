"""Model families: one file each (STF in :mod:`.stf`, its Swin layers in :mod:`.swin`)."""

from .stf import STFConfig, SymmetricalTransFormer

__all__ = ["STFConfig", "SymmetricalTransFormer"]
