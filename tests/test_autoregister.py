"""Registration without import: the .pth hook makes timm know our models in a fresh interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import timm_supertoken

OPT_OUT = 'TIMM_SUPERTOKEN_NO_AUTOREGISTER'


def _python(code: str, tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run a fresh interpreter outside the repository, so only the installed package can be found."""
    environ = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, 'PYTHONPATH')}
    environ.update(env)
    return subprocess.run(
        [sys.executable, *args, '-c', code], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300)


def test_create_model_without_importing_the_plugin(tmp_path):
    result = _python(
        "import sys, timm; m = timm.create_model('vit_small_stconv'); "
        "print(type(m.patch_embed).__name__, 'vit_small_convembed' in timm.list_models())",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['SuperTokenConvEmbed', 'True']


def test_every_size_is_registered_without_importing_the_plugin(tmp_path):
    """The hook imports the package, whose import registers every model in its cfgs: tiny and base sizes too.

    PYTHONPATH points at this checkout, so the hook registers the models of the code under test.
    """
    result = _python(
        "import timm; print(timm.create_model('vit_tiny_stconv').num_features, "
        "*timm.list_models(module='supertoken_vit'))",
        tmp_path, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    assert result.returncode == 0, result.stderr
    width, *names = result.stdout.split()
    assert width == '192' and names == sorted(timm_supertoken.REGISTERED_MODEL_NAMES)
    assert {'vit_tiny_patch', 'vit_base_convembed', 'vit_base_stconv'} <= set(names)


def test_from_imports_used_by_timm_scripts(tmp_path):
    """train.py / validate.py / benchmark.py import `from timm.models import create_model`, not `import timm`."""
    result = _python("from timm.models import create_model; print(create_model('vit_small_patch').num_features)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '384'


def test_startup_imports_neither_torch_nor_the_plugin(tmp_path):
    result = _python(
        "import sys; print(sorted(m for m in ('torch', 'timm', 'timm_supertoken', '_timm_supertoken_autoregister') "
        "if m in sys.modules))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['_timm_supertoken_autoregister']"


def test_importtime_shows_a_single_stdlib_free_module(tmp_path):
    """`python -X importtime -c pass`: the hook is one module that imports nothing of its own."""
    result = _python('pass', tmp_path, '-X', 'importtime')
    lines = [line for line in result.stderr.splitlines() if line.startswith('import time:')]
    names = [line.rsplit('|', 1)[-1] for line in lines]
    hook = [i for i, name in enumerate(names) if name.strip() == '_timm_supertoken_autoregister']
    assert len(hook) == 1, result.stderr
    assert not any(n.strip().startswith(('torch', 'timm', 'importlib.util', 'numpy')) for n in names)
    # importtime lists a module's own imports just before it, indented deeper: the hook has none
    previous = names[hook[0] - 1]
    assert len(previous) - len(previous.lstrip()) <= len(names[hook[0]]) - len(names[hook[0]].lstrip())


def test_opt_out_environment_variable(tmp_path):
    result = _python("import timm; timm.create_model('vit_small_stconv')", tmp_path, **{OPT_OUT: '1'})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f'RuntimeError: vit_small_stconv is a timm-supertoken model, not registered because {OPT_OUT} is set: '
        '`import timm_supertoken` before creating it')
    # timm's own error for every other unknown name is left as it is
    result = _python("import timm; timm.create_model('vit_small_nonsense')", tmp_path, **{OPT_OUT: '1'})
    assert result.stderr.strip().splitlines()[-1] == 'RuntimeError: Unknown model (vit_small_nonsense)'
    result = _python("import timm, timm_supertoken; print(timm.create_model('vit_small_stconv').num_features)",
                     tmp_path, **{OPT_OUT: '1'})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '384'


@pytest.mark.parametrize('module', ['timm.models', 'timm.data'])
def test_importing_a_timm_submodule_first(tmp_path, module):
    result = _python(f"import {module}; import timm; print('vit_small_stconv' in timm.list_models())", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'True'


def test_a_probe_for_timm_before_importing_it(tmp_path):
    """transformers' is_timm_available() calls importlib.util.find_spec('timm') first; the import after it counts."""
    result = _python("import importlib.util; importlib.util.find_spec('timm'); import timm; "
                     "print('vit_small_stconv' in timm.list_models())", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'True'


def test_the_hook_knows_every_registered_name():
    """The stdlib-only hook spells the names out; they must be the registry's."""
    import _timm_supertoken_autoregister as hook

    assert sorted(hook.MODEL_NAMES) == sorted(timm_supertoken.REGISTERED_MODEL_NAMES)
