#!/usr/bin/env bash
# The GPU checks this project owes, in one command for one lent GPU machine (no network).
# Run from the repository root; results go to $OUT (default: ./gpu-checks-out).
#
#   bash benchmarks/gpu_checks.sh [build] [tests] [step] [refresh] [experiment]   (default: all)
#
#   build       the native extension with its CUDA part (sm_90), then `python -m q3r.info`
#   tests       the suite's CUDA tests: kernels at real sizes in fp32/bf16, native solver,
#               randomized refresh on CUDA, NCCL world size 1, GradScaler with fused AdamW on CUDA
#               (not the multi-process/CPU ones)
#   step        bench_step.py on ViT-B/16 and GPT-2-small: per-step work, step ratios, memory,
#               whole-step T-cycles with real refreshes (plain and staggered), device time per
#               kernel, a sweep of tile settings; fp32 dots at torch's "highest" and "high" precision
#   refresh     bench_refresh.py (ViT-B/16, GPT-2-small, LLaMA-1B-like, LLaMA-7B-sized), then
#               profile_refresh.py (where a warm ViT-B refresh spends its time), then the host
#               timelines of refresh_attempts.py and stagger_timeline.py (probes.txt)
#   experiment  `q3r experiment vit-fmnist --size full` on the fast path, resumable: run it
#               again in the next call while the machine is still warm; needs the four
#               Fashion-MNIST IDX files in .data/fashion-mnist, carried with the tree:
#                 apt-get install -y dataset-fashion-mnist && mkdir -p .data && \
#                 cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
#               (then name .data in the device tool's carry)
#
# Each part writes its log (and CSV) under $OUT; the device tool brings back at most 8 files
# per call, so run "build tests step refresh" in one call and "experiment" in others. The commit is taken from Q3R_COMMIT when
# the tree has no .git (the device tool copies the tree without it).
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-checks-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python:$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(build tests step refresh experiment)
has() { [[ " ${parts[*]} " == *" $1 "* ]]; }

if has build; then
  (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} Q3R_BUILD_NATIVE=1 Q3R_BUILD_CUDA=1 \
     $PY -m pip install --no-build-isolation --no-deps --no-index -e . && $PY -m q3r.info) \
     >"$OUT/build.log" 2>&1
  echo "build rc=$?"; tail -3 "$OUT/build.log"
fi
if has tests; then
  $PY -m pytest -q -rs tests/test_kernels_project.py tests/test_kernels_apply.py tests/test_kernels_adam.py \
      tests/test_backend.py tests/test_native_eigh.py tests/test_randomized_refresh.py tests/test_auto_width.py \
      tests/test_reweight_plan.py tests/test_refresh_host_work.py tests/test_distributed_gpu.py \
      tests/test_amp_scaler.py tests/test_reference_fallback.py tests/test_kernels_device.py \
      >"$OUT/gpu_tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$OUT/gpu_tests.log"
fi
if has step; then
  $PY benchmarks/bench_step.py --models vit_b16,gpt2_small --cycle --profile --sweep --csv "$OUT/bench_step.csv" \
      >"$OUT/bench_step.log" 2>&1
  echo "bench_step (highest) rc=$?"
  $PY benchmarks/bench_step.py --models vit_b16,gpt2_small --fp32-matmul high --csv "$OUT/bench_step.csv" \
      >>"$OUT/bench_step.log" 2>&1
  echo "bench_step (high) rc=$?"; grep -E "ratio_|max_over|mean_over|work_fast|profile_" "$OUT/bench_step.log" | head -60
fi
if has refresh; then
  $PY benchmarks/bench_refresh.py --reps 5 --csv "$OUT/refresh.csv" >"$OUT/refresh.log" 2>&1
  echo "bench_refresh rc=$?"; tail -30 "$OUT/refresh.log"
  $PY benchmarks/profile_refresh.py --model vit >"$OUT/profile_refresh.txt" 2>&1
  echo "profile_refresh rc=$?"; grep -E "warm refresh|top-level" "$OUT/profile_refresh.txt"
  # the two host-timeline probes, in one file (the device tool brings back 8 files a call)
  { $PY benchmarks/refresh_attempts.py && $PY benchmarks/stagger_timeline.py vit_b16; } >"$OUT/probes.txt" 2>&1
  echo "probes rc=$?"; head -3 "$OUT/probes.txt"
fi
if has experiment; then
  # --workers: the ViT-Tiny runs leave an H100 mostly idle; the harness resumes finished runs
  timeout "${EXPERIMENT_SECONDS:-480}" $PY -m q3r.experiments.cli vit-fmnist --size full --device cuda \
      --workers "${EXPERIMENT_WORKERS:-8}" --data-dir .data/fashion-mnist --out "${EXPERIMENT_DIR:-/tmp/vit-fmnist-full}" \
      >>"$OUT/experiment.log" 2>&1
  echo "experiment rc=$? (124: time limit; call again to resume)"
  mkdir -p "$OUT/experiment" && cp "${EXPERIMENT_DIR:-/tmp/vit-fmnist-full}"/results.* "$OUT/experiment"/ 2>/dev/null
  tail -5 "$OUT/experiment.log"
fi
