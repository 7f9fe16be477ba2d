"""Deployment paths: `torch.compile` and ONNX export (dynamo exporter + onnxruntime) match eager PyTorch.

Every model is checked in eval mode on a (2, 3, 224, 224) batch against its eager logits, with one
model and one eager reference per name shared by the module (building and running ViT-S dominates
these tests on 2 CPU cores).

Tolerances (float32 logits of magnitude ~1): `torch.compile` and onnxruntime reorder reductions and
fuse ops (LayerNorm, softmax, GELU), which moves logits by ~2e-6 through 12 blocks; rtol = atol =
1e-4 leaves a 50x margin while still catching any wrong op (errors of order 1e-2 and up). The
standalone clustering operator, a few ops on a small map, is held to 1e-5 (observed ~2e-7).
"""
from pathlib import Path
from typing import Tuple

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import timm
from timm_supertoken.layers import SuperTokenClustering

MODEL_NAMES = ('vit_small_patch', 'vit_small_convembed', 'vit_small_stconv')

# A cold inductor compile (C++ codegen) of ViT-S takes ~70 s on 2 CPU cores. It runs for
# vit_small_stconv, whose super-token clustering (pad / reshape / batched matmul / masked softmax, a
# data-independent loop of iterations) is the code inductor has to get right here. The other two
# embeddings are convolutions, LayerNorm and Linear that timm's own models already exercise in
# inductor: they use aot_eager (~6 s), which still runs dynamo's capture of the whole model and
# AOTAutograd's functionalisation, where a graph break or untraceable op of ours would show.
COMPILE_BACKENDS = {
    'vit_small_patch': 'aot_eager',
    'vit_small_convembed': 'aot_eager',
    'vit_small_stconv': 'inductor',
}

MODEL_RTOL = MODEL_ATOL = 1e-4
CLUSTER_RTOL = CLUSTER_ATOL = 1e-5


@pytest.fixture(scope='module', params=MODEL_NAMES)
def model_and_reference(request: pytest.FixtureRequest) -> Tuple[str, nn.Module, torch.Tensor, torch.Tensor]:
    """(name, eval-mode model, input batch, eager logits), built once per model name."""
    torch.manual_seed(0)
    model = timm.create_model(request.param).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
    return request.param, model, x, reference


def _onnxruntime_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    """Check the exported file and run it on onnxruntime's CPU provider."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def test_torch_compile_matches_eager(model_and_reference: Tuple[str, nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """The whole model compiles as one graph (fullgraph: no graph break in our embedding) and matches eager."""
    name, model, x, reference = model_and_reference
    compiled = torch.compile(model, backend=COMPILE_BACKENDS[name], fullgraph=True)
    with torch.no_grad():
        output = compiled(x)
    torch.testing.assert_close(output, reference, rtol=MODEL_RTOL, atol=MODEL_ATOL)


def test_onnx_export_matches_eager(
        model_and_reference: Tuple[str, nn.Module, torch.Tensor, torch.Tensor],
        tmp_path: Path,
) -> None:
    """Dynamo-based ONNX export (torch.export -> onnxscript) of the model runs on onnxruntime and matches eager."""
    name, model, x, reference = model_and_reference
    path = tmp_path / f'{name}.onnx'
    torch.onnx.export(model, (x,), path, dynamo=True)
    torch.testing.assert_close(_onnxruntime_run(path, x), reference, rtol=MODEL_RTOL, atol=MODEL_ATOL)


# the legacy exporter warns that it is legacy, and its tracer about every Python-level shape check it meets
@pytest.mark.filterwarnings('ignore::DeprecationWarning', 'ignore::torch.jit.TracerWarning',
                            'ignore:Constant folding:UserWarning')
def test_torchscript_onnx_export_of_a_frozen_stconv(tmp_path: Path) -> None:
    """The TorchScript-based exporter (`dynamo=False`, what older deployment scripts call) on a frozen model.

    With every parameter frozen nothing needs autograd, so the eager stem would take its in-place inference
    path; tracing and export must record the plain modules instead, and the clustering must stay traceable.
    """
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_stconv').eval().requires_grad_(False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference = model(x)
    path = tmp_path / 'vit_tiny_stconv.onnx'
    torch.onnx.export(model, (x,), path, dynamo=False)
    torch.testing.assert_close(_onnxruntime_run(path, x), reference, rtol=MODEL_RTOL, atol=MODEL_ATOL)


def test_onnx_export_super_token_clustering_ragged(tmp_path: Path) -> None:
    """The operator alone exports, including the padded border cells of a map that is no multiple of the grid.

    9×11 on a 2×2 grid gives 5×6 super tokens whose last row and column own 1 or 2 real pixels, so the
    exported graph must keep the padding masks (in means, softmax and sums), not just the shapes.
    """
    module = SuperTokenClustering(grid=2, iters=3).eval()
    x = torch.randn(1, 8, 9, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = module(x)
    assert reference.shape == (1, 8, 5, 6)
    path = tmp_path / 'super_token_clustering.onnx'
    torch.onnx.export(module, (x,), path, dynamo=True)
    torch.testing.assert_close(_onnxruntime_run(path, x), reference, rtol=CLUSTER_RTOL, atol=CLUSTER_ATOL)
