"""The core install (no extra) is the timm plugin: create_model, forward/backward and local-dir: weights.

The package's wheel is built and installed by pip into a new virtual environment that holds only what
the wheel's core requirements resolve to: every Requires-Dist without an extra, and theirs, recursively.
Those distributions are linked from this test environment's site-packages rather than downloaded, so
the test runs offline and pip only checks that they satisfy the wheel. Anything else, matplotlib,
scikit-learn and scipy included, is absent there, as on a machine that never installed it.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import venv
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Dict, List

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from timm_supertoken import _extras
from timm_supertoken.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CORE = {'torch', 'timm', 'huggingface-hub', 'safetensors', 'numpy'}  # the most the core may depend on
NOT_CORE = ('matplotlib', 'sklearn', 'scipy')


def _applies(req: Requirement, extras=('',)) -> bool:
    """Whether `req` is needed on this platform when its distribution is installed with `extras`."""
    return req.marker is None or any(req.marker.evaluate({**default_environment(), 'extra': e}) for e in extras)


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec('hatchling') is None:
        pytest.fail("hatchling, pyproject.toml's build backend, is not installed: the [test] extra brings it so "
                    "that the wheel builds offline")
    out = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-index',
                    '--no-build-isolation', '--wheel-dir', str(out), str(ROOT)], check=True)
    wheel, = out.glob('timm_supertoken-*.whl')
    return wheel


@pytest.fixture(scope='module')
def requires(wheel) -> List[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name, = (n for n in zf.namelist() if n.endswith('.dist-info/METADATA'))
        text = zf.read(name).decode()
    return [Requirement(line.partition(':')[2].strip()) for line in text.splitlines()
            if line.startswith('Requires-Dist:')]


def test_core_requirements_are_the_plugins_and_pin_no_imaging_library(requires):
    core = {canonicalize_name(r.name) for r in requires if _applies(r)}
    assert core <= CORE and {'torch', 'timm'} <= core
    assert all(not r.specifier for r in requires if canonicalize_name(r.name) == 'pillow')


def test_extras_checked_by_commands_are_the_wheels(requires):
    """_extras.EXTRAS, which names what a command lacks, lists exactly what each extra of pyproject.toml installs."""
    for extra, modules in _extras.EXTRAS.items():
        declared = {canonicalize_name(r.name) for r in requires if not _applies(r) and _applies(r, (extra,))}
        assert declared == {canonicalize_name(d) for d in modules}, extra


def test_command_without_its_extra_names_it_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(_extras.EXTRAS, 'cluster', {**_extras.EXTRAS['cluster'], 'scipy': 'no_such_module'})
    with pytest.raises(SystemExit) as error:
        main(['cluster', '--subset', '20'])
    assert str(error.value) == ("timm-supertoken cluster needs the [cluster] extra: "
                                "pip install 'timm-supertoken[cluster]' (missing: scipy)")
    with pytest.raises(SystemExit):
        build_parser().parse_args(['--help'])
    assert '(needs the [cluster] extra)' in capsys.readouterr().out


def _core_closure(requires: List[Requirement]) -> Dict[str, metadata.Distribution]:
    """The installed distributions that the core requirements resolve to here, by canonical name."""
    found: Dict[str, metadata.Distribution] = {}
    todo = [r for r in requires if _applies(r)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found:
            continue
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), f'{req} but {dist.version} is installed'
        found[name] = dist
        extras = ('', *req.extras)
        todo += [r for r in map(Requirement, dist.requires or []) if _applies(r, extras)]
    return found


def _link_into(site: Path, dists: Dict[str, metadata.Distribution]) -> None:
    """Make `dists` installed in `site`: a link per top-level file or folder of theirs (their scripts stay out)."""
    for dist in dists.values():
        assert dist.files is not None, f'{dist.metadata["Name"]} has no RECORD to link it by'
        for top in {f.parts[0] for f in dist.files} - {'..', '__pycache__'}:
            if not (site / top).exists():
                (site / top).symlink_to(Path(dist.locate_file(top)))


# runs in the core environment, given NOT_CORE: the models through timm alone, then export and the command line
CORE_CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    import torch, timm
    not_core = sys.argv[1:]
    present = [m for m in not_core if importlib.util.find_spec(m) is not None]
    model = timm.create_model('vit_small_stconv', num_classes=10)
    x = torch.randn(2, 3, 224, 224)
    model(x).logsumexp(-1).sum().backward()
    grads = all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())
    imported = [m for m in not_core if m in sys.modules]

    from safetensors.torch import save_file
    from timm_supertoken.cli import main
    save_file(model.state_dict(), 'weights.safetensors')
    main(['export', 'weights.safetensors', 'exported', '--model', 'vit_small_stconv'])
    loaded = timm.create_model(f'local-dir:{Path("exported").resolve()}', pretrained=True).eval()
    same = bool(torch.equal(loaded(x), model.eval()(x)))
    try:
        compare = main(['compare'])
    except SystemExit as e:
        compare = str(e)
    print(json.dumps(dict(present=present, grads=grads, imported=imported, same=same, compare=compare,
                          imported_by_cli=[m for m in not_core if m in sys.modules],
                          plugin=sys.modules['timm_supertoken'].__file__)))
""")


@pytest.mark.slow
def test_core_environment_runs_the_models_and_local_dir_weights(wheel, requires, tmp_path):
    env_dir = tmp_path / 'core'
    venv.create(env_dir, symlinks=True)  # without pip: this environment's pip installs into it (--python), so only links are there
    python = env_dir / 'bin' / 'python'
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    _link_into(site, _core_closure(requires))
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith('PIP_') and k not in ('PYTHONPATH', 'TIMM_SUPERTOKEN_NO_AUTOREGISTER')}
    environ['PIP_CONFIG_FILE'] = os.devnull  # no configured index, find-links or constraints: pip sees the wheel only
    # so pip fails unless the linked distributions satisfy every core requirement
    subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--quiet', '--no-index',
                    '--find-links', str(wheel.parent), 'timm-supertoken'], check=True, env=environ)
    run = subprocess.run([python, '-c', CORE_CHECK, *NOT_CORE], cwd=tmp_path, env=environ,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result['present'] == []  # the environment really lacks them
    assert result['grads'] and result['same']
    assert result['imported'] == result['imported_by_cli'] == []
    assert result['compare'] == ("timm-supertoken compare needs the [train] extra: pip install "
                                 "'timm-supertoken[train]' (missing: matplotlib, scikit-learn)")
    assert Path(result['plugin']).is_relative_to(site)  # the installed wheel, not this checkout
