"""Evaluation of frozen backbones: weighted kNN monitor, offline linear probe, backbone export."""
from .export import backbone_state_dict, export_backbone, load_into_reference, read_checkpoint, reference_model
from .knn import extract_features, knn_classify, knn_eval

__all__ = ["extract_features", "knn_classify", "knn_eval", "read_checkpoint", "backbone_state_dict",
           "reference_model", "load_into_reference", "export_backbone"]
