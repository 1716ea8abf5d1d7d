from .backbones import build_backbone, BACKBONES
from .heads import MLPHead, ProjectionHead, SplitBatchNorm2d, convert_to_split_bn
from .load import load_backbone

__all__ = ["build_backbone", "BACKBONES", "MLPHead", "ProjectionHead", "SplitBatchNorm2d", "convert_to_split_bn", "load_backbone"]
