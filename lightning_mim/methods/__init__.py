"""One LightningModule per method."""
from lightning_mim.methods.base import MIMMethod, OptimConfig
from lightning_mim.methods.lut import LUT
from lightning_mim.methods.mae import MAE

__all__ = ["LUT", "MAE", "MIMMethod", "OptimConfig"]
