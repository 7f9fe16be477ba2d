"""Deployment paths: `torch.compile` and ONNX export (dynamo exporter + onnxruntime) match eager PyTorch.

Every model is checked in eval mode on a (2, 3, 224, 224) batch against its eager logits, with one
model and one eager reference per name shared by the module (building and running ViT-S dominates
these tests on 2 CPU cores).

Tolerances (float32 logits of magnitude ~1): `torch.compile` and onnxruntime reorder reductions and
fuse ops (LayerNorm, softmax, GELU), which moves logits by ~2e-6 through 12 blocks; rtol = atol =
1e-4 leaves a 50x margin while still catching any wrong op (errors of order 1e-2 and up). The
standalone clustering operator, a few ops on a small map, is held to 1e-5 (observed ~2e-7).

Deployment (`timm_supertoken.deploy.export_onnx`, and timm's own `timm.utils.onnx.onnx_export`): a dynamic
batch for all nine models, checked on onnxruntime at two batch sizes, and a dynamic height and width for the
ViT-Ti models built with `dynamic_img_size=True` at two image sizes and two batch sizes, plus a size whose
conv-stem map is no multiple of the super-token grid (the padding path). An export costs tens of seconds on
2 CPU cores whatever the width (the stconv graph's clustering iterations make it the slowest), so each model
is exported once.
"""
import re
import sys
from pathlib import Path
from typing import Sequence, Tuple, Union

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import timm
from timm.utils.onnx import onnx_export as timm_onnx_export
from timm_supertoken import REGISTERED_MODEL_NAMES
from timm_supertoken.deploy import ONNX_INSTALL_HINT, export_onnx
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


def _input_dims(path: Path) -> Tuple[Union[int, str], ...]:
    """The ONNX graph input's shape: axis names for symbolic axes, sizes for fixed ones."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_param or d.dim_value for d in dims)


def _assert_matches_eager(model: nn.Module, path: Path, shapes: Sequence[Tuple[int, ...]]) -> None:
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = model(x)
        torch.testing.assert_close(_onnxruntime_run(path, x), reference, rtol=MODEL_RTOL, atol=MODEL_ATOL)


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
    """Dynamo-based ONNX export (torch.export -> onnxscript) with a dynamic batch runs on onnxruntime and matches
    eager at the example's batch and another one."""
    name, model, x, reference = model_and_reference
    path = tmp_path / f'{name}.onnx'
    torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: 'batch'},), verbose=False)
    assert _input_dims(path) == ('batch', 3, 224, 224)
    torch.testing.assert_close(_onnxruntime_run(path, x), reference, rtol=MODEL_RTOL, atol=MODEL_ATOL)
    _assert_matches_eager(model, path, [(3, 3, 224, 224)])


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


# A dynamic batch for all nine models: ViT-S in test_onnx_export_matches_eager, ViT-Ti in
# test_export_onnx_dynamic_size (any size, any batch) and through timm's exporter, ViT-B here.
@pytest.mark.parametrize('name', [n for n in REGISTERED_MODEL_NAMES if n.startswith('vit_base_')])
def test_export_onnx_dynamic_batch(name: str, tmp_path: Path) -> None:
    """`export_onnx` gives the model a symbolic batch axis and checks onnxruntime against eager at batch 1 and 2."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    path = export_onnx(model, tmp_path / f'{name}.onnx', batch_size=1)
    assert _input_dims(path) == ('batch', 3, 224, 224)


@pytest.mark.parametrize('name', ['vit_tiny_patch', 'vit_tiny_convembed', 'vit_tiny_stconv'])
def test_export_onnx_dynamic_size(name: str, tmp_path: Path) -> None:
    """Built with dynamic_img_size=True, each embedding exports a dynamic batch, height and width.

    `export_onnx` checks (2 or 3) x (224x224 or 192x256); 256 pixels are 16 super tokens wide, so eager
    PyTorch splits each row into two blocks where the exported graph keeps one. The conv embeddings also take
    200x232: a 25x29 stem map, no multiple of the 2x2 super-token grid, so the border cells are padded.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, dynamic_img_size=True).eval()
    path = export_onnx(model, tmp_path / f'{name}.onnx', dynamic_size=True)
    assert _input_dims(path) == ('batch', 3, 'height', 'width')
    if not name.endswith('_patch'):  # the patch embedding takes whole patches only
        _assert_matches_eager(model, path, [(1, 3, 200, 232)])


def test_export_onnx_refuses_a_fixed_size_model(tmp_path: Path) -> None:
    """A model built for one size names the kwarg that makes its size dynamic, before any export work."""
    model = timm.create_model('vit_tiny_stconv')
    with pytest.raises(ValueError, match=r"fixed input size.*dynamic_img_size=True"):
        export_onnx(model, tmp_path / 'fixed.onnx', dynamic_size=True)
    assert not (tmp_path / 'fixed.onnx').exists()


class _FixedWidthPool(nn.Module):
    """Pools any image but insists on its width in Python: torch.export must fix that axis."""
    pretrained_cfg = {'architecture': 'fixed_width_pool', 'input_size': (3, 8, 8)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[3] != 8:
            raise ValueError('width must be 8')
        return x.mean((2, 3))


def test_export_onnx_refuses_an_axis_the_model_fixes(tmp_path: Path) -> None:
    """An axis asked to be dynamic that the model's code fixes is refused by name, with the size it was fixed to."""
    with pytest.raises(ValueError, match=r'fixed_width_pool cannot be exported with a dynamic width: .* width to 8'):
        export_onnx(_FixedWidthPool(), tmp_path / 'pool.onnx', dynamic_size=True)


@pytest.mark.parametrize('missing', ['onnx', 'onnxscript', 'onnxruntime'])
def test_export_onnx_names_the_extra_when_a_tool_is_missing(missing: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(ImportError, match=rf'{missing} is missing.*{re.escape(ONNX_INSTALL_HINT)}'):
        export_onnx(nn.Identity(), tmp_path / 'identity.onnx')


@pytest.mark.parametrize('dynamic_size', [False, True], ids=['batch', 'batch_height_width'])
def test_timm_onnx_export_script_path(dynamic_size: bool, tmp_path: Path) -> None:
    """timm's `onnx_export.py --dynamo [-b 1] [--dynamic-size] --check-forward` calls `timm.utils.onnx.onnx_export`
    with these arguments; the file it writes has the dynamic axes and matches eager on onnxruntime.

    The script builds the model itself and cannot pass dynamic_img_size=True, so `--dynamic-size` needs a model
    built for any size (from Python, as here).
    """
    # the stconv model with the script's defaults; with a dynamic size, the cheaper convembed one (the
    # clustering's dynamic size is tested through export_onnx, which makes the same export call)
    name = 'vit_tiny_convembed' if dynamic_size else 'vit_tiny_stconv'
    torch.manual_seed(0)
    model = timm.create_model(name, dynamic_img_size=dynamic_size, exportable=True)
    path = tmp_path / f'{name}.onnx'
    timm_onnx_export(model, str(path), opset=None, dynamic_size=dynamic_size, aten_fallback=False,
                     keep_initializers=False, check_forward=True, training=False, verbose=False,
                     use_dynamo=True, input_size=None, batch_size=1)
    size = ('height', 'width') if dynamic_size else (224, 224)
    assert _input_dims(path) == ('batch', 3) + size
    image_sizes = [(224, 224), (192, 256)] if dynamic_size else [(224, 224)]
    _assert_matches_eager(model, path, [(b, 3) + hw for b in (1, 3) for hw in image_sizes])
