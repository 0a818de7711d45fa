"""Shared test setup. Without CUDA, the Triton kernels run under Triton's interpreter: the
variable must be set before triton is first imported, hence at conftest import time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
