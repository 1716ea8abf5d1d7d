"""fastcl: fast self-supervised / contrastive vision pretraining.

Layers import one way: ``recipes/`` -> ``fastcl`` -> ``fastcl.kernels``. The engine knows no method,
a method knows no launcher.
"""
__version__ = "0.1.0"
