"""Data: the MIMDataModule, its sources and the ImageFolder -> WebDataset shard writer."""
from lightning_mim.data.datamodule import MIMDataModule
from lightning_mim.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist, read_idx
from lightning_mim.data.imagefolder import SkippingImageFolder
from lightning_mim.data.shards import write_shards
from lightning_mim.data.skipping import SkipCounter
from lightning_mim.data.synthetic import SyntheticImages
from lightning_mim.data.views import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGENET_MEAN", "IMAGENET_STD", "MIMDataModule",
           "SkipCounter", "SkippingImageFolder", "SyntheticImages", "load_fashion_mnist", "read_idx", "write_shards"]
