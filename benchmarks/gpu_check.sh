#!/usr/bin/env bash
# One-shot GPU check on an H100/H200 with PyTorch, Triton and timm installed (no network, no pip install): the
# fused-kernel tests compiled on CUDA, then the operator and model benchmarks and the profile of a training step
# (benchmarks/bench_supertoken.py), written into docs/benchmarks.md with the GPU and the versions named.
#
# It fits one 10-minute command by default: GPU_CHECK_MINUTES (default 9) bounds the whole run. The tests get at
# most a third of it; the benchmark starts no stage once its share is spent and rewrites its docs section after
# every stage, so a run cut short keeps what it measured. Both always run; the exit status is non-zero if either
# failed. Run from anywhere:  [GPU_CHECK_MINUTES=20] bash benchmarks/gpu_check.sh [bench_supertoken.py args]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels on CUDA tensors, not the interpreter

python3 - <<'PY' || exit 2
import torch
assert torch.cuda.is_available(), 'gpu_check.sh needs a CUDA GPU'
print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}', flush=True)
PY

total_s=$(awk "BEGIN { printf \"%d\", ${GPU_CHECK_MINUTES:-9} * 60 }")
start_s=$(date +%s)

# Kernel tests compiled on CUDA (tests/conftest.py sets the interpreter only where there is no GPU).
# The kernel report's tests compile for sm_80/sm_90 without the GPU and are CI's job: not repeated here.
timeout $((total_s / 3)) python3 -m pytest -q -p no:cacheprovider tests/test_super_token_triton.py tests/test_super_token.py
tests_rc=$?

left_s=$((total_s - ($(date +%s) - start_s)))
# the last stage to start may run a few minutes (compiling four models): it must start early enough
budget_min=$(awk "BEGIN { b = ($left_s - 180) / 60; printf \"%.1f\", (b > 0 ? b : 0) }")
timeout "$left_s" python3 benchmarks/bench_supertoken.py --budget-minutes "$budget_min" "$@"
bench_rc=$?

echo "gpu_check: tests exit ${tests_rc}, benchmark exit ${bench_rc} (124: cut by the time limit)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
