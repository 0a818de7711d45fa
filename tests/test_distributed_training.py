"""DDP and FSDP2 (gloo, 2 CPU processes) and HSDP (FSDP2 on a 2 x 2 mesh, 4 processes) against a
single-process run of the same global batch.

One spawn runs every distributed scenario (process start-up dominates on CPU); the tests below
read its results. The FSDP2 run uses a sketch as wide as each matrix, which makes its randomized
refresh the exact SVD up to rounding, so the weights must agree to fp32 rounding with the
single-process run (exact refresh); the accuracy of the default (narrower) sketch is checked in
test_distributed_units.py.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import q3r
from q3r.distributed.rangefinder import sketch_width
from q3r.distributed.sharded_refresh import SKETCH

import _distributed_worker as worker
from _kernel_utils import needs_kernels

WORLD = 2
FULL_WIDTH = 10_000  # oversampling that caps every sketch at min(d1, d2)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ddp_path, fsdp_path, hsdp_path = tmp / "ddp.pt", tmp / "fsdp.pt", tmp / "hsdp.pt"
    worker.spawn(worker.both_worker, WORLD, str(ddp_path), str(fsdp_path), str(tmp / "ckpt"), FULL_WIDTH)
    # HSDP: 2 replica groups of WORLD shards; q3r's collectives must stay inside a shard group
    worker.spawn(worker.hsdp_worker, 2 * WORLD, str(hsdp_path), str(tmp / "hsdp_ckpt"), FULL_WIDTH,
                 str(tmp / "ckpt"), str(tmp / "resharded.pt"))
    torch.set_num_threads(1)
    extras = {kind: {} for kind in worker.OPTIMIZERS}
    single = {kind: worker.single_process(kind, extras[kind]) for kind in worker.OPTIMIZERS}
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731  (our own file)
    return {"ddp": load(ddp_path), "fsdp": load(fsdp_path), "hsdp": load(hsdp_path),
            "resharded": load(tmp / "resharded.pt"), "single": single, "single_extras": extras}


def _max_rel_diff(got: dict, ref: dict) -> float:
    assert set(got) == set(ref)
    return max(float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)


def _slices(model):
    """(d1, d2, rank) of every target slice of the test model."""
    out = []
    for t in worker.make_targets(model):
        shapes = q3r.targets.slice_shapes(t.param.shape, t.slice_dim, t.slices)
        out += [(d1, d2, q3r.reference.resolve_rank(t.target_rank, d1, d2)) for d1, d2 in shapes]
    return out


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["adamq3r", "q3r_adamw", "q3r_penalty"])
def test_matches_single_process(runs, engine, kind):
    assert _max_rel_diff(runs[engine][kind]["weights"], runs["single"][kind]) < 2e-5


def _local_slice_count(rank, world) -> int:
    """Target slices with rows on this rank of the test model under FSDP2 (torch.chunk rows)."""
    from q3r.distributed.placement import local_slices

    count = 0
    for t in worker.make_targets(worker.make_model()):
        rows = t.param.shape[0]
        chunk = -(-rows // world)
        start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        views = local_slices(torch.empty(stop - start, t.param.shape[1]), start, t.slice_dim, t.slices)
        count += sum(view.numel() > 0 for view, _, _ in views)
    return count


@pytest.mark.parametrize("kind", ["q3r_adamw", "q3r_penalty"])
def test_fsdp_with_slices_absent_from_some_ranks_matches_single_process(runs, kind):
    """On 2 * WORLD ranks some ranks hold no rows of some qkv slices (add_grad_ and penalty;
    AdamQ3R is covered by the resume on that mesh)."""
    assert _max_rel_diff(runs["resharded"][f"{kind} on ({2 * WORLD},)"], runs["single"][kind]) < 2e-5


def test_factors_saved_unsharded_are_refused_for_a_sharded_parameter(runs):
    assert "saved unsharded" in runs["fsdp"]["unsharded_factors"]


def test_compress_refuses_an_fsdp2_model_and_its_recipe_works(runs):
    """compress, truncate_weights_, save_compressed and load_compressed refuse FSDP2-sharded
    weights on every rank with a TypeError naming the DTensor and the way out, leaving the model
    as it was; that way out (a full state dict into a dense model, compressed on rank 0) gives
    the factored model of the trained weights."""
    got = runs["fsdp"]["compress"]
    for name, error in got["errors"].items():
        assert error is not None and error.startswith(f"{name} needs a model with full weights"), (name, error)
        assert "is a DTensor" in error and "get_model_state_dict" in error
    assert got["unchanged"] and got["still_sharded"] == "DTensor"
    assert got["weights_match"]  # (the gathered state dict is the trained weights)
    assert got["factored"] == ["LowRankFusedLinear", "LowRankLinear"]
    assert got["output_diff"] < 1e-4


def test_sharded_terms_in_low_precision_and_before_the_first_refresh(runs):
    paths = runs["fsdp"]["term_paths"]
    assert paths["bf16_vs_fp32"] < 8e-3  # bfloat16 rounding of the same R(X)_r (2^-8 relative)
    assert paths["never_refreshed_adds_X"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="runs the kernels on CPU tensors: needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
@needs_kernels
def test_fsdp_with_the_fused_kernels_matches_single_process(runs, tmp_path):
    """The sharded step runs q3r.ops' fused kernels on each rank's shard with its local factors
    and adds the low-rank rest (ShardedTerms): under the Triton interpreter, forced."""
    path = tmp_path / "kernels.pt"
    worker.spawn(worker.fsdp_kernels_worker, WORLD, str(path), FULL_WIDTH)
    res = torch.load(path, weights_only=False)
    # AdamQ3R: every slice with rows on rank 0 in the fused plan (none left to the reference path)
    assert res["adamq3r"]["plans"] == ["adam"]
    assert res["adamq3r"]["q3r_regions"] == _local_slice_count(0, WORLD) and res["adamq3r"]["rejected"] == 0
    # Q3R.add_grad_ and the penalty's backward: the grouped reweighting plan
    assert "reweight" in res["q3r_adamw"]["plans"] and "reweight" in res["q3r_penalty"]["plans"]
    for kind in worker.OPTIMIZERS:
        assert _max_rel_diff(res[kind]["weights"], runs["single"][kind]) < 2e-5, kind


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "hsdp"])
def test_penalty_value_matches_single_process(runs, engine):
    """Q3R.penalty() on every rank is the whole model's value (FSDP2: summed over the shards)."""
    got, ref = runs[engine]["q3r_penalty"]["penalties"], runs["single_extras"]["q3r_penalty"]["penalties"]
    assert len(got) == len(ref) == worker.STEPS and min(ref) > 0
    for g, r in zip(got, ref):
        assert abs(g - r) <= 2e-5 * r


@pytest.mark.parametrize("engine", ["fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["adamq3r", "q3r_adamw"])
def test_diagnostics_of_sharded_targets_match_single_process(runs, engine, kind):
    """diagnostics() gathers each sharded weight and its U: the values of one process."""
    got, ref = runs[engine][kind]["diagnostics"], runs["single_extras"][kind]["diagnostics"]
    assert set(got) == set(ref) and any(k.endswith("/penalty") for k in ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("kind", ["adamq3r", "q3r_adamw"])
def test_ddp_collectives(runs, kind):
    slices = _slices(worker.make_model())
    target_bytes = 4 * sum(d1 * d2 for d1, d2, _ in slices)
    logs = runs["ddp"][kind]["logs"]
    assert any(log["refreshed"] for log in logs) and not all(log["refreshed"] for log in logs)
    for log in logs:
        # CommDebugMode sees every collective inside opt.step(), ours or not
        assert log["all_calls"] == log["q3r_calls"]
        if not log["refreshed"]:
            assert log["q3r_calls"] == 0  # no per-step collective under DDP
        else:
            # the same targets everywhere? header, factors; and at AdamQ3R's first step, once, whether
            # its ranks hold the same targets at all (ZeroRedundancyOptimizer's do not)
            once = int(kind == "adamq3r" and log["first_refresh"])
            assert log["ops"] == ["all_gather"] * (3 + once)
            # the factors of a refresh are a fraction of one full-size buffer of the targets,
            # which the reference scheme all-reduces at every step
            assert 0 < log["q3r_bytes"] < target_bytes


@pytest.mark.parametrize("engine", ["fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["adamq3r", "q3r_adamw"])
def test_fsdp_collectives(runs, engine, kind):
    slices = _slices(worker.make_model())
    widths = [sketch_width(r, d1, d2, FULL_WIDTH) for d1, d2, r in slices]
    a_bytes = 4 * sum(k * d2 for (d1, d2, _), k in zip(slices, widths))
    r_bytes = 4 * sum(r * d2 for d1, d2, r in slices)
    def refresh_calls(q):
        # finite flags, one Z = X^T Y per power iteration, two Cholesky-QR Gram passes, B = Q^T X,
        # the ranks' agreement on widenings (none here: the sketches are as wide as the matrices)
        return 1 + q + 2 + 1 + 1

    logs = runs[engine][kind]["logs"]
    assert logs[0]["refreshed"] and not logs[1]["refreshed"]
    for log in logs:
        assert log["all_calls"] == log["q3r_calls"]  # no hidden DTensor redistribution / gather
        # HSDP: a refresh also compares the replicas' shards (one all_gather over the replicate dim),
        # and each of the 2 replicas, having refreshed its share of the targets, broadcasts their
        # factors' widths and the factors over the replicate dim (refresh_owners)
        checks = int(engine == "hsdp" and log["refreshed"])
        shares = 2 * 2 * checks
        assert log["ops"].count("all_gather") == checks and log["ops"].count("broadcast") == shares
        assert log["ops"].count("all_reduce") == log["q3r_calls"] - checks - shares
        if not log["refreshed"]:
            # one collective for all targets, of the r_env x d2 matrices A = U^T W: right after
            # the first refresh r_env = r (min schedule), later r <= r_env <= k
            assert log["q3r_calls"] == 1
            assert (log["q3r_bytes"] == r_bytes) if log["step"] == 1 else (r_bytes <= log["q3r_bytes"] <= a_bytes)
        elif log["first_refresh"]:
            assert log["q3r_calls"] == refresh_calls(SKETCH.cold_power_iters) + 1 + checks + shares  # + the step's A = U^T W
        else:
            assert log["q3r_calls"] == refresh_calls(SKETCH.power_iters) + 1 + checks + shares  # warm start


@pytest.mark.parametrize("engine", ["fsdp", "hsdp"])
def test_fsdp_checkpoint_resumes_identically(runs, engine):
    res = runs[engine]["resume"]
    for name, w in res["straight"].items():
        assert torch.equal(w, res["resumed"][name]), name
    # factor U of the k slice of qkv: a DTensor in parameter rows, sharded like the weight
    assert res["U_type"] == "DTensor"
    assert res["U_shape"][0] == 3 * worker.WIDTH
    assert res["U_local_rows"] == res["W_local_rows"] == 3 * worker.WIDTH // WORLD
    assert res["U_placements"] == res["W_placements"]
    if engine == "hsdp":
        assert res["W_placements"] == "(Replicate(), Shard(dim=0))"


@pytest.mark.parametrize("mesh", [f"({2 * WORLD},)", f"(2, {WORLD})"])
def test_fsdp_checkpoint_resumes_on_another_mesh(runs, mesh):
    """Saved by FSDP2 on WORLD ranks, resumed on 2 * WORLD ranks (weights, moments and U split in
    twice as many row shards) or on an HSDP mesh: the same weights up to fp32 rounding (the
    reductions are ordered differently; the sketch is as wide as each matrix)."""
    assert _max_rel_diff(runs["resharded"][mesh], runs["fsdp"]["resume"]["straight"]) < 2e-5


def test_hsdp_replicas_that_drifted_apart_are_made_equal_at_the_next_refresh(runs):
    drift = runs["hsdp"]["drift"]
    assert not drift["equal_after_perturbing"]  # the test's perturbation of one replica
    assert not drift["equal_before_refresh"]  # a plain step does not undo it
    assert drift["equal_after_refresh"] and drift["warned"]
    # the replicas of another shard than the first rank's: repaired and warned about, once
    assert drift["other_shard"] == {"equal_after_refresh": True, "warnings": 1}
    # a non-finite replica is named as the cause, and repaired from the first
    (message,) = drift["non_finite"]
    assert "had drifted apart (w: replica(s) [1] of this group held non-finite weights); copied from the" in message


def test_hsdp_replicas_divide_the_refresh_and_hold_the_same_factors(runs):
    """Each slice is factored by one replica group (refresh_owners) and its factors broadcast
    over the replicate dim: the two replicas of a shard together factor every slice once per
    refresh, each a part of them, and hold bitwise the same factors (before, each replica
    factored every slice)."""
    ranks = runs["hsdp"]["replica_shares"]
    for shard in range(WORLD):
        pair = [r for r in ranks if r["coordinate"][1] == shard]
        assert len(pair) == 2 and all(r["same"] for r in pair), pair
        slices, refreshes = pair[0]["slices"], pair[0]["refreshes"] // pair[0]["slices"]
        assert refreshes == 3  # (5 steps, period 2)
        assert sum(r["factored"] for r in pair) == slices * refreshes
        assert all(0 < r["factored"] < slices * refreshes for r in pair)


@pytest.mark.parametrize("layout", ["replicas", "blocks"])
def test_a_shared_target_is_warned_about_once_whichever_rank_refreshes_it(runs, layout):
    """A target's owner (refresh_owners) depends on which targets are due with it: the warning
    about its non-finite weights comes from one rank of the mesh, not from each rank that was
    its owner at some refresh (that gave it twice here)."""
    warned = runs["hsdp"]["shared_warnings"][layout]
    assert len(warned) == 1 and "'AdamQ3R param group 1 param 0' has non-finite weights" in warned[0], warned


@pytest.mark.parametrize("layout", ["replicas", "blocks"])
def test_a_shared_targets_envelope_left_filling_its_sketch_is_warned_about_once(runs, layout):
    """The truncated-envelope warning of a target that another rank of its group refreshed
    reaches the mesh's first rank through refresh_owners.share_'s header (r_env of a truncated
    envelope): one warning over all ranks, as one process gives."""
    warned = runs["hsdp"]["shared_truncated"][layout]
    assert len(warned) == 1, warned
    assert ("'AdamQ3R param group 0 param 1' (24 singular values above eps) still filled its sketch of 24 after 0 "
            "widenings") in warned[0], warned


def test_hsdp_refuses_layouts_it_cannot_handle_when_built(runs):
    refused = runs["hsdp"]["refused"]
    assert len(refused) == 6
    for who, message in refused.items():
        assert "placements" in message and ("(_StridedShard(dim=1, sf=2), Shard(dim=1))" in message
                                            or "(Shard(dim=0), _StridedShard(dim=0, sf=2))" in message
                                            or "must be split as FSDP2 and DTensor split them" in message), who
        assert message.startswith("NotImplementedError: " + ("AdamQ3R param group 0" if who.startswith("AdamQ3R")
                                                             else "Q3R target w")), who
    # (a hand-built Shard(0) DTensor with another row split: refused when built, not at a later step)
    assert "got 5 local rows" in refused["AdamQ3R uneven_rows"] or "got 3 local rows" in refused["AdamQ3R uneven_rows"]


def test_ddp_refuses_ranks_that_are_not_replicas(runs):
    assert "differ across ranks" in runs["ddp"]["not_replicas"]
    # ranks with different targets are told what to do, not left to a collective of mismatched sizes
    assert "configure(replicated=False)" in runs["ddp"]["different_targets"]


@pytest.mark.parametrize("case", ["zero", "zero_unconfigured", "zero_one_target"])
def test_zero_redundancy_optimizer_with_adamq3r_matches_single_process_and_resumes(runs, case):
    """With configure(replicated=False), and without it: AdamQ3R finds at its first step that its
    ranks hold different targets and refreshes each rank's own (before, the unconfigured run
    raised at its first refresh, and with one target the rank without it left the other
    waiting)."""
    zero = runs["ddp"][case]
    # each rank updates and refreshes a share of the targets (one target: one rank)
    assert zero["ranks_owning_targets"] == (1 if case == "zero_one_target" else WORLD)
    single = worker.single_process_adamq3r(["blocks.0.fc1"]) if case == "zero_one_target" else runs["single"]["adamq3r"]
    assert _max_rel_diff(zero["weights"], single) < 2e-5
    # its consolidated state dict, loaded by ZeroRedundancyOptimizer.load_state_dict (which
    # writes each rank's share straight into AdamQ3R's state), continues the run exactly
    assert all(torch.equal(zero["resumed"][k], zero["weights"][k]) for k in zero["weights"])


def test_ddp_factor_exchange_paths_agree(runs):
    paths = runs["ddp"]["paths"]
    assert paths["gather"]["ops"] == ["all_gather"] * 3
    assert paths["broadcast"]["ops"] == ["all_gather"] * 2 + ["broadcast"] * WORLD  # one per owner
    for name in ("broadcast", "local"):
        for got, ref in zip(paths[name]["states"], paths["gather"]["states"]):
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0, equal_nan=True)


def test_the_fsdp2_example_runs_as_one_process_and_checks_its_arguments():
    """Run with plain python it trains on a 1-rank mesh (it asked for torchrun's RANK); a count
    below 1 is refused by name (--steps 0 failed with a KeyError at the end, --log-every 0
    divided by zero)."""
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "examples" / "fsdp2_gpt_pretrain.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(worker.free_port()))
    done = subprocess.run([sys.executable, script, "--steps", "2", "--log-every", "1", "--period", "2", "--width", "32",
                           "--depth", "1", "--seq", "16", "--batch", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mesh (1,)" in done.stdout and "validation loss" in done.stdout
    for flag in ("--steps", "--log-every"):
        refused = subprocess.run([sys.executable, script, flag, "0"], capture_output=True, text=True, timeout=300, env=env)
        assert refused.returncode == 2 and f"error: {flag} must be >= 1, got 0" in refused.stderr, refused.stderr
    # refused before training: 3 heads of a width of 128 failed in the first forward pass, a
    # --compress fraction q3r.compress refuses and a --seq longer than the validation text only
    # after the whole run had trained
    for args, code, message in [(["--heads", "3"], 2, "error: --heads must divide --width, got 3 and 128"),
                                (["--compress", "1.5"], 2, "error: --compress must lie in (0, 1], got 1.5"),
                                (["--compress", "0"], 2, "error: --compress must lie in (0, 1], got 0.0"),
                                (["--seq", "20000", "--width", "32", "--depth", "1", "--batch", "1"], 1,
                                 "--seq 20000 is too long for the validation text"),
                                (["--seq", "10001", "--width", "32", "--depth", "1", "--batch", "1"], 1,
                                 "--seq 10001 is too long for the validation text (10002 characters")]:
        refused = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300, env=env)
        assert refused.returncode == code and message in refused.stderr, (args, refused.stderr[-2000:])


@pytest.mark.parametrize("world,replicas,tensor_parallel", [(2, 1, None), (4, 2, None), (2, 1, ""), (4, 1, "2")])
def test_the_fsdp2_example_runs(world, replicas, tensor_parallel):
    """examples/fsdp2_gpt_pretrain.py under torchrun: FSDP2, HSDP with --replicas, tensor
    parallelism with --tensor-parallel, FSDP2 over it with --tensor-parallel 2 on 4 ranks."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={worker.free_port()}",
           str(root / "examples" / "fsdp2_gpt_pretrain.py"), "--steps", "4", "--log-every", "2", "--period", "2",
           "--width", "32", "--depth", "1", "--seq", "16", "--batch", "2", "--replicas", str(replicas), "--compress", "0.2",
           *([] if tensor_parallel is None else ["--tensor-parallel", *([tensor_parallel] if tensor_parallel else [])])]
    # one more try, as _distributed_worker.spawn gives, where a worker was killed by a signal: a
    # C++ abort (SIGABRT) inside torch's gloo / FSDP2 machinery, and once a SIGSEGV of both
    # workers (CI of 5e4a3c8, whose change touched tests and probes only; where in the example
    # is not known); a worker that raises still fails at once
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
        killed = re.search(r"\((SIG[A-Z]+)\)", done.stderr)
        if done.returncode == 0 or killed is None:
            break
        print(f"a worker of the example died with {killed.group(1)}; trying again")
    assert done.returncode == 0, done.stderr[-3000:]
    mesh = (world // int(tensor_parallel), int(tensor_parallel)) if tensor_parallel else (world,) if replicas == 1 else (replicas, world // replicas)
    assert f"mesh {mesh}" in done.stdout
    assert "validation loss" in done.stdout and "per refresh step" in done.stdout
    # (tensor parallel: 48 of 1 block's 96 fc2 columns per rank would be 3 kB per step; the
    # all-reduces of A = U^T X are of r_env x d2, or r_env x d1 for the Shard(1) weights)
    assert ("per step" in done.stdout and not re.search(r" 0\.0 kB per step", done.stdout)), done.stdout
    # --compress: the gathered model, compressed on rank 0 (its table and the two losses)
    assert re.search(r"^all targets\s+[\d,]+\s+[\d,]+\s+1\d\.\d\s*$", done.stdout, re.M), done.stdout
    assert re.search(r"dense \d+\.\d{4}, compressed to 20% of the target parameters \d+\.\d{4}", done.stdout), done.stdout
