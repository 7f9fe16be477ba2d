#!/usr/bin/env bash
# One-shot GPU check, ≤ 20 minutes on an H100/H200 with PyTorch, Triton and timm installed (no network, no
# pip install): the fused-kernel tests compiled on CUDA, then the operator and model benchmarks and the
# profile of a training step (benchmarks/bench_supertoken.py), written into docs/benchmarks.md with the
# GPU and the versions named. Run from anywhere:  bash benchmarks/gpu_check.sh [bench_supertoken.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels on CUDA tensors, not the interpreter

python3 - <<'EOF'
import torch
assert torch.cuda.is_available(), 'gpu_check.sh needs a CUDA GPU'
print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}', flush=True)
EOF

# Kernel tests compiled on CUDA (tests/conftest.py sets the interpreter only where there is no GPU).
# The kernel report's tests compile for sm_80/sm_90 without the GPU and are CI's job: not repeated here.
python3 -m pytest -q -p no:cacheprovider tests/test_super_token_triton.py tests/test_super_token.py

python3 benchmarks/bench_supertoken.py "$@"
