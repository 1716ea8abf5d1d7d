from .base import Method, Step

__all__ = ["Method", "Step"]
