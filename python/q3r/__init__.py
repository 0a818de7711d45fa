"""q3r: the Quadratic Reweighted Rank Regularizer (Q3R) for low-rank training in PyTorch."""

__version__ = "0.1.0"

from . import reference  # noqa: F401
