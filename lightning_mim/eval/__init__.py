"""Evaluation of pre-trained encoders: weighted k-NN on frozen features, linear probing, fine-tuning, and loading /
exporting encoder weights."""
from lightning_mim.eval.finetune import FineTune, finetune_optim, layer_decay_param_groups
from lightning_mim.eval.knn import extract_features, gather_features, knn_accuracy, knn_classify
from lightning_mim.eval.linear import LinearProbe, linear_probe_optim
from lightning_mim.eval.weights import LoadReport, export_encoder, load_encoder_state, load_into

__all__ = ["FineTune", "LinearProbe", "LoadReport", "export_encoder", "extract_features", "finetune_optim",
           "gather_features", "knn_accuracy", "knn_classify", "layer_decay_param_groups", "linear_probe_optim",
           "load_encoder_state", "load_into"]
