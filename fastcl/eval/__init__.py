"""Evaluation of frozen backbones: weighted kNN monitor, offline linear probe, backbone export.

Names are resolved lazily (PEP 562) so ``python -m fastcl.eval.linear`` / ``-m fastcl.eval.export`` do not
find their module already imported by the package (runpy's RuntimeWarning).
"""
from importlib import import_module

_EXPORTS = {
    "extract_features": "knn", "knn_classify": "knn", "knn_eval": "knn",
    "read_checkpoint": "export", "backbone_state_dict": "export", "reference_model": "export",
    "load_into_reference": "export", "export_backbone": "export", "model_kwargs_of": "export",
    "LinearHeads": "linear", "load_backbone": "linear", "train_linear": "linear",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
