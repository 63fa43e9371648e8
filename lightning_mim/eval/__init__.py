"""Evaluation of pre-trained encoders: weighted k-NN on frozen features."""
from lightning_mim.eval.knn import extract_features, gather_features, knn_accuracy, knn_classify

__all__ = ["extract_features", "gather_features", "knn_accuracy", "knn_classify"]
