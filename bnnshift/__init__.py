"""bnnshift: shift the thresholds of binary activations in PyTorch BNNs."""
from ._version import __version__

__all__ = ["__version__"]
