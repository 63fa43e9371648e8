"""Training callbacks: torch.compile, checkpointing, online k-NN accuracy, reconstruction images, throughput, text
progress lines, SLURM requeue at a step boundary."""
from lightning_mim.callbacks.checkpoint import MIMCheckpoint
from lightning_mim.callbacks.compile import CompileLosses
from lightning_mim.callbacks.knn_monitor import KNNMonitor
from lightning_mim.callbacks.mode import ModeGuard
from lightning_mim.callbacks.progress import TextProgress
from lightning_mim.callbacks.reconstruction import ReconstructionImages
from lightning_mim.callbacks.requeue import RequeueAtStepBoundary
from lightning_mim.callbacks.throughput import Throughput

__all__ = ["CompileLosses", "KNNMonitor", "MIMCheckpoint", "ModeGuard", "ReconstructionImages",
           "RequeueAtStepBoundary", "TextProgress", "Throughput"]
