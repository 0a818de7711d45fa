"""Optimizers: AdamQ3R (torch.optim shape) and its functional step."""

from .adamq3r import AdamQ3R

__all__ = ["AdamQ3R"]
