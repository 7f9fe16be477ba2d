"""timm's own model tests (`tests/test_models.py` of the installed timm's sdist), run on all our models.

timm's parametrisation cannot be reused: it is computed from `list_models(...)` at import, and the
`forward_intermediates` / features / prune tests select models by the name of the module that defines
them (`module=FEAT_INTER_FILTERS`), which a plugin's module (`supertoken_vit`) never matches. So the
suite is loaded as a plain module and its test functions are called with our model names, the batch
sizes read from their own `parametrize` marks, and `cfg_device='meta'` (its fixture's value on torch
with device contexts). The suite comes from `$TIMM_TESTS_DIR` (a folder holding `test_models.py`) or
from the sdist matching the installed timm, downloaded once into `~/.cache/timm-supertoken/`.
"""
import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, Optional

import pytest
import torch

import timm
import timm_supertoken  # noqa: F401  registers the models before timm's suite computes its model lists

EMBEDDINGS = ('patch', 'convembed', 'stconv')
MODEL_NAMES = tuple(f'vit_{size}_{embedding}' for size in ('tiny', 'small', 'base') for embedding in EMBEDDINGS)

# timm's test functions run on every model, each with the signature (model_name[, batch_size][, cfg_device])
CONFORMANCE_TESTS = (
    'test_model_forward',
    'test_model_backward',
    'test_model_default_cfgs_non_std',
    'test_model_forward_torchscript',
    'test_model_forward_intermediates',
    'test_model_forward_intermediates_features',
    'test_prune_intermediate_layers_contract',
    'test_model_forward_fx',
    'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
)

# the ones timm's collection restricts to models defined in its own modules (list_models(module=...))
MODULE_FILTERED_TESTS = (
    'test_model_forward_intermediates',
    'test_model_forward_intermediates_features',
    'test_prune_intermediate_layers_contract',
)

# `test_prune_intermediate_layers_contract` prunes a copy of the model at every block and back-propagates
# through each: its cost grows with the square of the depth (2-3 min per ViT-S on 2 CPU cores). The
# contract concerns the embedding + VisionTransformer's prune/tap logic, which is the same at any
# depth, so its `create_model` builds a 4-block trunk (taps 0..3, three pruned before the last).
PRUNE_TEST_DEPTH = 4
REDUCED_DEPTH_TESTS = ('test_prune_intermediate_layers_contract',)

# The tiny and base sizes add to what ViT-S already tests only the embeddings at widths 192 and 768 (with 3 and
# 12 heads): their code paths are the same at every width, and the trunk's blocks are timm's own. So they run
# at FAMILY_TEST_IMG_SIZE (16 tokens instead of 196) with a FAMILY_TEST_DEPTH-block trunk, the shortest that has
# the 3 taps `features_only` takes by default (out_indices=3): tracing, scripting and the prune test's
# per-block copies cost per block. Measured on 2 loaded CPU cores: the six models' 60 calls take 217 s in all,
# against 123 s for vit_small_stconv's 10 (and 341 s for the six with ViT-Ti at its full 12 blocks).
FAMILY_TEST_IMG_SIZE = 64
FAMILY_TEST_DEPTH = 3


def _create_kwargs(model_name: str, test_name: str) -> Dict[str, Any]:
    """The kwargs a test's create_model gets on top of its own, to keep the test within a few seconds."""
    if not model_name.startswith('vit_small_'):
        size = (3, FAMILY_TEST_IMG_SIZE, FAMILY_TEST_IMG_SIZE)
        return dict(img_size=FAMILY_TEST_IMG_SIZE, pretrained_cfg_overlay=dict(input_size=size), depth=FAMILY_TEST_DEPTH)
    return dict(depth=PRUNE_TEST_DEPTH) if test_name in REDUCED_DEPTH_TESTS else {}


# `cfg_device` fixture of timm's suite: 'meta' where torch.device is a context manager (torch >= 2.0)
CFG_DEVICE = 'meta'

CACHE_DIR = Path.home() / '.cache' / 'timm-supertoken'


def _timm_version() -> str:
    return importlib.metadata.version('timm')


def _download_timm_tests(version: str) -> Path:
    """Fetch and unpack timm's sdist for `version` into the cache (once); return its `tests` folder.

    Unpacks into a temporary folder renamed into place, so an interrupted or concurrent run (xdist
    workers) never leaves a half-extracted suite behind.
    """
    root = CACHE_DIR / 'timm-sdist'
    tests_dir = root / f'timm-{version}' / 'tests'
    if (tests_dir / 'test_models.py').is_file():
        return tests_dir

    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
        f'timm=={version}', '-d', str(root),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f'`{" ".join(cmd)}` timed out; set TIMM_TESTS_DIR to a folder holding timm {version} '
                    f'tests/test_models.py')
    sdist = root / f'timm-{version}.tar.gz'
    if proc.returncode != 0 or not sdist.is_file():
        pytest.fail(
            f'could not download the timm {version} sdist, which holds the test-suite these tests run:\n'
            f'`{" ".join(cmd)}` exited with {proc.returncode}\n{proc.stderr[-2000:]}\n'
            f'Set TIMM_TESTS_DIR to a folder holding timm {version} tests/test_models.py to run offline.')

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter='data')
        extracted = Path(tmp) / f'timm-{version}'
        if not (extracted / 'tests' / 'test_models.py').is_file():
            pytest.fail(f'{sdist} has no timm-{version}/tests/test_models.py')
        with contextlib.suppress(OSError):  # another process put its copy in place first
            extracted.rename(root / f'timm-{version}')
    if not (tests_dir / 'test_models.py').is_file():
        pytest.fail(f'could not unpack {sdist} to {tests_dir.parent}')
    return tests_dir


def _find_timm_tests() -> Path:
    env_dir = os.environ.get('TIMM_TESTS_DIR')
    if env_dir:
        test_file = Path(env_dir) / 'test_models.py'
        if not test_file.is_file():
            pytest.fail(f'TIMM_TESTS_DIR={env_dir} holds no test_models.py')
        return test_file
    return _download_timm_tests(_timm_version()) / 'test_models.py'


@pytest.fixture(scope='session')
def timm_test_models() -> Iterator[ModuleType]:
    """timm's `tests/test_models.py`, imported as a module from its file.

    Importing it switches TorchScript to the profiling executor with profiling off (timm's speed
    setting for its suite); the previous settings are restored at the end of the session. It is
    imported with GITHUB_ACTIONS unset, since under it timm drops `test_model_forward_fx_torchscript`
    and trims model lists for its own runners' memory.
    """
    test_file = _find_timm_tests()
    spec = importlib.util.spec_from_file_location('timm_suite_test_models', test_file)
    module = importlib.util.module_from_spec(spec)
    github_actions = os.environ.pop('GITHUB_ACTIONS', None)
    prev_executor = torch._C._jit_set_profiling_executor(True)
    prev_mode = torch._C._jit_set_profiling_mode(False)
    try:
        with warnings.catch_warnings():
            # its collection markers (base, forward, fxforward, timeout, ...) are timm's, not registered here
            warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)
            spec.loader.exec_module(module)
    finally:
        if github_actions is not None:
            os.environ['GITHUB_ACTIONS'] = github_actions
    yield module
    torch._C._jit_set_profiling_executor(prev_executor)
    torch._C._jit_set_profiling_mode(prev_mode)


def _parametrize_values(test_fn: Any, argname: str) -> Optional[List[Any]]:
    """The values of `@pytest.mark.parametrize(argname, ...)` on one of timm's test functions."""
    for mark in getattr(test_fn, 'pytestmark', []):
        if mark.name == 'parametrize' and mark.args[0] == argname:
            return list(mark.args[1])
    return None


def _call_kwargs(test_fn: Any, test_name: str) -> List[Dict[str, Any]]:
    """One kwargs dict per call timm's parametrisation would make for a given model."""
    params = set(inspect.signature(test_fn).parameters)
    unknown = params - {'model_name', 'batch_size', 'cfg_device'}
    if unknown:
        pytest.fail(f'timm {_timm_version()} changed {test_name}: it now also takes {sorted(unknown)}')
    base = {'cfg_device': CFG_DEVICE} if 'cfg_device' in params else {}
    if 'batch_size' not in params:
        return [base]
    batch_sizes = _parametrize_values(test_fn, 'batch_size')
    if not batch_sizes:
        pytest.fail(f'timm {_timm_version()} {test_name} takes batch_size but has no batch_size parametrisation')
    return [dict(base, batch_size=b) for b in batch_sizes]


@pytest.mark.conformance
@pytest.mark.parametrize('test_name', CONFORMANCE_TESTS)
@pytest.mark.parametrize('model_name', MODEL_NAMES)
def test_timm_conformance(
        timm_test_models: ModuleType,
        model_name: str,
        test_name: str,
        monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Call timm's `test_name` on `model_name`; a skip inside it (input size over its limits) is a failure."""
    test_fn = getattr(timm_test_models, test_name, None)
    assert test_fn is not None, f"timm {_timm_version()}'s test_models.py has no {test_name}"
    create_kwargs = _create_kwargs(model_name, test_name)
    if create_kwargs:
        monkeypatch.setattr(timm_test_models, 'create_model', functools.partial(timm.create_model, **create_kwargs))
    if 'pretrained_cfg_overlay' in create_kwargs:
        # some tests size their input from the registry's cfg before building the model: give them the same size
        input_size = create_kwargs['pretrained_cfg_overlay']['input_size']
        registry_value = timm_test_models.get_pretrained_cfg_value
        monkeypatch.setattr(timm_test_models, 'get_pretrained_cfg_value',
                            lambda name, key: input_size if key == 'input_size' else registry_value(name, key))
    for kwargs in _call_kwargs(test_fn, test_name):
        try:
            test_fn(model_name, **kwargs)
        except pytest.skip.Exception as e:
            pytest.fail(f"timm's {test_name} skipped {model_name} ({kwargs}): {e.msg}")


@pytest.mark.conformance
def test_timm_collection_reaches_plugin_models(timm_test_models: ModuleType) -> None:
    """Which of these tests timm's own run (with this plugin installed) would apply to our models.

    All but the three selecting by defining module: those are the ones only this file runs on them.
    """
    collected = {
        name: sorted(set(MODEL_NAMES) & set(_parametrize_values(getattr(timm_test_models, name), 'model_name')))
        for name in CONFORMANCE_TESTS
    }
    assert collected == {
        name: [] if name in MODULE_FILTERED_TESTS else sorted(MODEL_NAMES) for name in CONFORMANCE_TESTS
    }
    # why: timm records a model's module as the last part of its defining module's name
    assert timm.list_models(module='supertoken_vit') == sorted(MODEL_NAMES)
    assert not set(MODEL_NAMES) & set(timm.list_models(module=timm_test_models.FEAT_INTER_FILTERS))
