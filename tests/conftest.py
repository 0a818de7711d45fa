"""Shared test setup. Without CUDA, the Triton kernels run under Triton's interpreter: the
variable must be set before triton is first imported, hence at conftest import time."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# torch's fp32-precision settings (torch >= 2.9), each "none" (inherit) by default
FP32_PRECISION_KEYS = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("mkldnn", "all"), ("mkldnn", "matmul"))


@pytest.fixture
def fp32_precision_reset():
    """Tests that change torch's fp32 matmul settings (legacy or per-backend API) get
    torch's defaults back afterwards, every setting "none" again."""
    yield
    if hasattr(torch._C, "_set_fp32_precision_setter"):
        for backend, op in FP32_PRECISION_KEYS:
            torch._C._set_fp32_precision_setter(backend, op, "none")
    else:
        torch.set_float32_matmul_precision("highest")
