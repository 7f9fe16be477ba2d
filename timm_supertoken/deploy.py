"""ONNX export for deployment: a dynamic batch axis, optionally a dynamic image size, checked on onnxruntime.

`export_onnx` runs the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript) with
`dynamic_shapes`, then checks what it wrote: onnxruntime matches eager PyTorch at two batch sizes and, for a
dynamic size, two image sizes. A model whose code fixes a requested axis is refused by name.

Every model has a dynamic batch. A dynamic height and width needs a model built to accept any size
(`timm.create_model(name, dynamic_img_size=True)`: the position embedding is resampled to the token grid of
each input). The conv embeddings then take any size of at least 16×16 pixels; the patch embedding takes
multiples of 16 (or any size when built with `dynamic_img_pad=True` as well).
"""
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.layers import to_2tuple

from .models.complexity import model_input_size

__all__ = ['export_onnx', 'OnnxMismatchError', 'ONNX_INSTALL_HINT']

ONNX_INSTALL_HINT = "pip install 'timm-supertoken[onnx]'"
INPUT_NAME = 'input0'  # timm.utils.onnx's names, so files from either exporter are fed alike
OUTPUT_NAME = 'output0'
# The second image size of the check differs from the first by this much in each side: a multiple of every token
# stride and output stride (16, 32), so models that take whole patches only accept it too.
SIZE_STEP = 32
# float32 logits of magnitude ~1: onnxruntime fuses and reorders LayerNorm, softmax, GELU and the matmuls,
# which moves them by ~1e-6 through 12 blocks; 1e-4 still catches a wrong op (errors of 1e-2 and up).
DEFAULT_TOLERANCE = 1e-4
# how torch.export reports an axis asked to be dynamic that the traced code fixes
_SPECIALISED = re.compile(r'inferred a static shape of (\d+) for dimension inputs\[0\]\.shape\[(\d+)\]')


class OnnxMismatchError(RuntimeError):
    """The exported file runs on onnxruntime but its output differs from eager PyTorch."""


def _import_onnx_tools():
    """onnx, onnxruntime and onnxscript (the dynamo exporter's translator), or a one-line install hint."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx imports it lazily; fail here, by name)
    except ImportError as e:
        raise ImportError(f'ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): '
                          f'{ONNX_INSTALL_HINT}') from None
    return onnx, onnxruntime


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def _input_size(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]]) -> Tuple[int, int, int]:
    """(C, H, W) of the example: what the model was built for, with `img_size` for H and W if given."""
    channels, height, width = model_input_size(model)
    return (channels,) + (to_2tuple(img_size) if img_size is not None else (height, width))


def _second_size(height: int, width: int) -> Tuple[int, int]:
    """Another, non-square image size for the check: wider by SIZE_STEP, and shorter where that leaves pixels."""
    return height - SIZE_STEP if height > SIZE_STEP else height + SIZE_STEP, width + SIZE_STEP


def _dynamic_axes(dynamic_batch: bool, dynamic_size: bool) -> Dict[int, str]:
    axes = {0: 'batch'} if dynamic_batch else {}
    if dynamic_size:
        axes.update({2: 'height', 3: 'width'})
    return axes


def _check_dynamic_size_supported(model: nn.Module) -> None:
    """A ViT built for one size asserts it (and its position embedding has that grid): name the kwarg."""
    if getattr(model, 'dynamic_img_size', True) is False:
        raise ValueError(
            f'{_model_name(model)} was built for a fixed input size, so its height and width cannot be dynamic: '
            f"create it with timm.create_model('{_model_name(model)}', dynamic_img_size=True)")


def _specialised_axes(error: BaseException) -> Dict[int, int]:
    """{axis: size} of the input axes that torch.export found fixed by the model, from the export error's causes."""
    while error is not None:
        found = {int(axis): int(size) for size, axis in _SPECIALISED.findall(str(error))}
        if found:
            return found
        error = error.__cause__ or error.__context__
    return {}


def _check_on_onnxruntime(model: nn.Module, path: Path, shapes: Sequence[Tuple[int, ...]], tolerance: float) -> None:
    onnx, onnxruntime = _import_onnx_tools()
    onnx.checker.check_model(str(path), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        (output,) = session.run(None, {input_name: x.numpy()})
        output = torch.from_numpy(output)
        if output.shape != expected.shape or not torch.allclose(output, expected, rtol=tolerance, atol=tolerance):
            error = (output - expected).abs().max().item() if output.shape == expected.shape else 'shape'
            raise OnnxMismatchError(
                f'{path} on onnxruntime differs from eager PyTorch for input {tuple(shape)}: output '
                f'{tuple(output.shape)} vs {tuple(expected.shape)}, max |difference| {error} (tolerance {tolerance})')


def export_onnx(
        model: nn.Module,
        path: Union[str, Path],
        *,
        batch_size: int = 2,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        dynamic_batch: bool = True,
        dynamic_size: bool = False,
        opset: Optional[int] = None,
        check: bool = True,
        tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Export `model` (in eval mode) to an ONNX file with a dynamic batch and, if asked, dynamic height and width.

    Args:
        model: a timm model; for `dynamic_size`, built with `dynamic_img_size=True`.
        path: the .onnx file to write.
        batch_size: batch of the example input (and the first checked batch); with a dynamic batch the
            example has at least 2 images, since torch.export fixes a size-1 axis.
        img_size: image size of the example and of the file when not dynamic (default: the model's input size).
        dynamic_batch: make the batch axis symbolic.
        dynamic_size: make height and width symbolic.
        opset: ONNX opset (default: the exporter's).
        check: check the file with the ONNX checker and compare onnxruntime with eager PyTorch at two batch
            sizes (if dynamic) times two image sizes (if dynamic), within `tolerance` (rtol = atol).

    Returns the path written. Raises ValueError for a dynamic size the model cannot keep, OnnxMismatchError
    when onnxruntime disagrees with PyTorch, ImportError naming the `[onnx]` extra when a tool is missing.
    """
    _import_onnx_tools()
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if dynamic_size:
        _check_dynamic_size_supported(model)
    path = Path(path)
    name = _model_name(model)
    channels, height, width = _input_size(model, img_size)
    axes = _dynamic_axes(dynamic_batch, dynamic_size)
    example = torch.randn(max(batch_size, 2) if dynamic_batch else batch_size, channels, height, width)

    was_training = model.training
    model.eval()
    try:
        try:
            torch.onnx.export(
                model, (example,), path, dynamo=True, dynamic_shapes=(axes,) if axes else None,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False)
        except torch.onnx.OnnxExporterError as e:
            fixed = {axes[axis]: size for axis, size in _specialised_axes(e).items() if axis in axes}
            if not fixed:
                raise
            sizes = ' and '.join(f'the {axis} to {size}' for axis, size in fixed.items())
            raise ValueError(f'{name} cannot be exported with a dynamic {" and ".join(fixed)}: its traced code '
                             f'fixes {sizes}; export it with a fixed size') from e
        if check:
            batches = (batch_size, batch_size + 1) if dynamic_batch else (batch_size,)
            sizes = ((height, width), _second_size(height, width)) if dynamic_size else ((height, width),)
            shapes = [(b, channels, h, w) for b in batches for h, w in sizes]
            _check_on_onnxruntime(model, path, shapes, tolerance)
    finally:
        model.train(was_training)
    return path
