"""Evaluation of frozen backbones: weighted kNN monitor, offline linear probe, backbone export."""
from .knn import extract_features, knn_classify, knn_eval

__all__ = ["extract_features", "knn_classify", "knn_eval"]
