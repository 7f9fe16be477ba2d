"""The optional extras, and the one-line error of a feature whose extra is not installed.

The core install (torch, timm, huggingface_hub, safetensors, numpy) is the timm plugin: the models,
the fused kernels and Hub export, push and load. Training, clustering and the figures need an extra;
their modules import it at the top, so a command checks for it before importing them, and a user
reads which extra to install instead of a traceback ending in `No module named 'sklearn'`.
"""
import importlib.util
from typing import Dict, List

__all__ = ['EXTRAS', 'MissingExtraError', 'missing_from_extra', 'require_extra']

# pyproject.toml's extras that code of the package imports: distribution (what pip installs) -> module
EXTRAS: Dict[str, Dict[str, str]] = {
    'train': {'torchvision': 'torchvision', 'pillow': 'PIL', 'pyyaml': 'yaml', 'tqdm': 'tqdm',
              'matplotlib': 'matplotlib', 'scikit-learn': 'sklearn'},
    'cluster': {'torchvision': 'torchvision', 'pillow': 'PIL', 'tqdm': 'tqdm', 'matplotlib': 'matplotlib',
                'scikit-learn': 'sklearn', 'scipy': 'scipy'},
    'triton': {'triton': 'triton'},
    'onnx': {'onnx': 'onnx', 'onnxscript': 'onnxscript', 'onnxruntime': 'onnxruntime'},
}


class MissingExtraError(ImportError):
    """A feature was asked for whose extra is not installed; the message names the extra and what is missing."""


def missing_from_extra(extra: str) -> List[str]:
    """The distributions of `extra` that are not installed, by the names pip installs them under."""
    if extra not in EXTRAS:
        raise ValueError(f'unknown extra {extra!r}; extras: {", ".join(EXTRAS)}')
    return [dist for dist, module in EXTRAS[extra].items() if importlib.util.find_spec(module) is None]


def require_extra(extra: str, feature: str) -> None:
    """Raise MissingExtraError, naming `feature` and the pip command, unless all of `extra` is installed."""
    missing = missing_from_extra(extra)
    if missing:
        raise MissingExtraError(f"{feature} needs the [{extra}] extra: pip install 'timm-supertoken[{extra}]' "
                                f"(missing: {', '.join(missing)})")
