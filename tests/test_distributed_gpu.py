"""The distributed workers on one GPU: NCCL, world size 1 (DDP and FSDP2 on a 1-rank mesh).

With one rank nothing is communicated, so this checks that the CUDA/NCCL paths of
q3r.distributed (DTensor factors on a CUDA mesh, DCP save/restore, the dispatch in AdamQ3R and
Q3R) run and agree with a plain single-process run. Skipped without CUDA + NCCL.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _distributed_worker as worker

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL"
)


def test_nccl_world_size_one_matches_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("Q3R_TEST_DEVICE", "cuda")  # read by the spawned workers at import
    ddp, fsdp = tmp_path / "ddp.pt", tmp_path / "fsdp.pt"
    worker.spawn(worker.both_worker, 1, str(ddp), str(fsdp), str(tmp_path / "ckpt"), 10_000)
    ddp, fsdp = torch.load(ddp, weights_only=False), torch.load(fsdp, weights_only=False)
    for kind in worker.OPTIMIZERS:
        ref = worker.single_process(kind)  # on the CPU: CUDA vs CPU fp32 rounding only
        for res in (ddp, fsdp):
            got = res[kind]["weights"]
            err = max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
            assert err < 1e-4, (kind, err)
            assert all(log["q3r_calls"] == 0 for log in res[kind]["logs"])  # one rank: nothing to send
    resume = fsdp["resume"]
    for name, w in resume["straight"].items():
        assert torch.equal(w, resume["resumed"][name]), name


def test_nccl_sharded_refresh_meets_the_accuracy_contract(tmp_path, monkeypatch):
    """tests/test_sharded_refresh.py's cases with the weights on the GPU (a 1-rank NCCL mesh):
    the widening, the kept widths and a DCP round trip of grown factors, against the exact SVD."""
    import test_sharded_refresh as sharded

    monkeypatch.setenv("Q3R_TEST_DEVICE", "cuda")
    cases = sharded._cases()
    torch.save(cases, tmp_path / "cases.pt")
    worker.spawn(worker.sharded_refresh_worker, 1, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt"), str(tmp_path / "ckpt"))
    out = torch.load(tmp_path / "out.pt")
    for case in ("random_init", "random_init_oversample_0", "bulk_rising_above_eps"):
        sharded._check_case(cases, out, case)
        assert not out[case]["warnings"] and out[case]["checkpoint"]["equal"], case
