"""Keeping torch.compile out of q3r's step and refresh without importing torch._dynamo.

A compiled loss with ``penalty()`` in it, or ``torch.compile(optimizer.step)``, made dynamo trace
the refresh's host logic and recompile it at every refresh. ``torch.compiler.disable`` stops
that, but applied as a decorator it imports torch._dynamo, and with it triton, when q3r is
imported, which ``import q3r`` must not do (tests/test_backend.py).
"""

from __future__ import annotations

import functools
import sys

import torch

__all__ = ["eager_under_compile"]


def eager_under_compile(fn):
    """``fn``, never traced by torch.compile: called through torch.compiler.disable(fn) once
    torch._dynamo is loaded (made at the first such call; before it is loaded nothing can be
    compiling), so a compiled caller breaks its graph there and fn's own frames run without
    dynamo."""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call
