"""q3r: the Quadratic Reweighted Rank Regularizer (Q3R) for low-rank training in PyTorch.

``import q3r`` does no GPU work and needs neither Triton nor the native extension.
"""

__version__ = "0.1.0"

from . import reference
from .compress import compress, load_compressed, save_compressed
from .optim import AdamQ3R
from .regularizer import Q3R
from .targets import Target, find_targets, param_groups

__all__ = ["AdamQ3R", "Q3R", "Target", "compress", "load_compressed", "save_compressed", "find_targets", "param_groups", "reference", "__version__"]
