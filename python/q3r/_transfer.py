"""Small host-made tensors sent to the device without draining its stream.

``torch.tensor(values, device="cuda")`` copies from pageable host memory, and such a copy
waits for the stream to finish every kernel queued before it: one such index or scalar table
in a refresh stalls the host until the device catches up, so host work and device work stop
overlapping. Copied from pinned memory with ``non_blocking=True`` the same transfer is queued
like a kernel (the pinned block is not reused before the copy has run: torch's caching host
allocator records the stream's use of it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(values, dtype: torch.dtype, device) -> Tensor:
    """torch.tensor(values, dtype=dtype) on ``device``, queued behind the stream's work."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
