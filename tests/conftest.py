"""Session-wide test setup.

benchmarks/ is put on sys.path, as running one of its scripts does, so tests import the scripts and their
shared `docs_page` module by name.

The fused Triton kernels (timm_supertoken.ops) are tested on CPU through Triton's interpreter. Triton
reads TRITON_INTERPRET when its modules are imported, and torch.compile imports Triton too, so the
variable is set here, before any test module runs. Only without a GPU: there Inductor generates C++,
not Triton, so nothing else changes; on a GPU runner the kernels are compiled and tested on CUDA tensors,
each autotuned kernel with its first fitting config per shape (TIMM_SUPERTOKEN_AUTOTUNE=0, as the interpreter
does): autotuning compiles and times every config at every new shape, and the tests' many shapes then took
minutes on an H200. tests/test_super_token_triton.py runs every config by itself.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))

if torch.cuda.is_available():
    os.environ.setdefault('TIMM_SUPERTOKEN_AUTOTUNE', '0')
else:
    os.environ.setdefault('TRITON_INTERPRET', '1')
