"""One LightningModule per method."""
from lightning_mim.methods.base import MIMMethod, OptimConfig
from lightning_mim.methods.beit import BEiT
from lightning_mim.methods.beyond_masking import BeyondMasking
from lightning_mim.methods.lut import LUT
from lightning_mim.methods.mae import MAE
from lightning_mim.methods.mapet import MaPeT
from lightning_mim.methods.simmim import SimMIM
from lightning_mim.methods.symmim import SymMIM

__all__ = ["BEiT", "BeyondMasking", "LUT", "MAE", "MaPeT", "MIMMethod", "OptimConfig", "SimMIM", "SymMIM"]
