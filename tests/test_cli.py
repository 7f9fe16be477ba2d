"""The `timm-supertoken` command, its structure, and the CPU benchmark it shares with benchmarks/bench_cpu.py."""
import argparse
import contextlib
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import timm_supertoken
from timm_supertoken.cli import build_parser, main
from timm_supertoken.figures import FIGURE_DPI, FIGURE_SIZE_IN, super_token_panel_titles
from timm_supertoken.models import MODEL_NAMES
from timm_supertoken.runtime import hardware_info
from timm_supertoken.throughput import BASELINE, benchmark_cpu, throughput_markdown

TINY = ['--batch-size', '1', '--repeats', '1', '--img-size', '32']


@pytest.fixture(scope='module')
def info_run(tmp_path_factory):
    """One tiny `info` run shared by the assertions below (model construction dominates its cost)."""
    out = tmp_path_factory.mktemp('out')
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(['info', *TINY, '--out', str(out)])
    return rc, stdout.getvalue(), out


def test_info_exit_code(info_run):
    assert info_run[0] == 0


def test_info_parameter_table(info_run):
    params = info_run[1].split('CPU inference')[0]
    rows = {line.split('|')[1].strip(): line for line in params.splitlines() if line.startswith('| vit_')}
    assert '| 297,600 | 0.30M |' in rows['vit_small_patch']
    assert '| 1,021,488 | 1.00M |' in rows['vit_small_convembed']
    assert '| 132,192 | 0.09M |' in rows['vit_small_stconv']
    assert '22,050,664' in rows[BASELINE]  # timm's own ViT-S/16, the reference trunk


def test_info_benchmark_table(info_run):
    text = info_run[1]
    for name in (BASELINE,) + MODEL_NAMES:
        assert sum(line.startswith(f'| {name} |') for line in text.splitlines()) == 2  # params + throughput
    assert '| 1.000× |' in text  # the baseline's ratio to itself
    assert 'torch:' in text and 'cpu:' in text


def test_info_writes_figure(info_run):
    out = info_run[2]
    path = out / 'super_tokens.png'
    assert f'wrote {path}' in info_run[1]
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == 'PNG'
        assert img.size == (round(FIGURE_SIZE_IN[0] * FIGURE_DPI), round(FIGURE_SIZE_IN[1] * FIGURE_DPI))


def test_bare_options_mean_info(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(['--no-bench', '--no-plot']) == 0
    text = capsys.readouterr().out
    assert '132,192' in text and 'CPU inference' not in text
    assert not (tmp_path / 'timm-supertoken-out').exists()


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        main(['no-such-command'])


def test_benchmark_cpu_numbers():
    names = (BASELINE, 'vit_small_stconv')
    results = benchmark_cpu(names, batch_size=1, img_size=32, repeats=2, warmup=0)
    assert list(results) == list(names)
    for stats in results.values():
        assert set(stats) == {
            'img_per_s', 'ms_per_batch', 'embed_ms', 'embed_share', 'ratio', 'best_ms_per_batch', 'best_ratio'}
        assert all(math.isfinite(v) and v > 0 for v in stats.values())
        assert 0 < stats['embed_share'] < 5  # separate timings on a noisy machine: loose, but not absurd
        assert math.isclose(stats['img_per_s'], 1e3 / stats['ms_per_batch'])
    assert results[BASELINE]['ratio'] == results[BASELINE]['best_ratio'] == 1.0
    assert results['vit_small_stconv']['best_ms_per_batch'] <= results['vit_small_stconv']['ms_per_batch']
    table = throughput_markdown(results)
    assert table.count('\n| vit_') == 2


def test_benchmark_rejects_zero_repeats():
    with pytest.raises(ValueError, match='repeats'):
        benchmark_cpu(repeats=0)


def test_hardware_info_names_the_machine():
    info = hardware_info()
    assert info['cpu'] and info['torch'] and info['timm']
    assert int(info['threads']) >= 1


def test_super_token_figure_says_which_sizes_are_pixels_and_which_tokens():
    cells, _, painted = super_token_panel_titles(224, 16, 3, (14, 14))
    assert '16×16-px cell' in cells and '224×224 px' in cells
    assert '14×14 tokens' in painted


COMMANDS = ('info', 'compare', 'recipe', 'dataset', 'imagenet100', 'export', 'push', 'cluster')
PACKAGE = Path(timm_supertoken.__file__).parent


def test_every_command_is_registered_with_its_handler():
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(subparsers.choices) == COMMANDS
    for name, parser in subparsers.choices.items():
        assert parser.get_default('func').__name__ == f'cmd_{name}'


def test_module_help_lists_every_command():
    """`python -m timm_supertoken.cli`, the form torchrun launches, is the console script."""
    run = subprocess.run([sys.executable, '-m', 'timm_supertoken.cli', '--help'], capture_output=True, text=True,
                         check=True)
    listed = re.findall(r'^    (\S+)', run.stdout, flags=re.MULTILINE)
    assert tuple(listed) == COMMANDS


def test_command_line_is_parsed_only_in_cli_package():
    """Outside cli/, argparse appears only as the Namespace that timm's train.py pickles into checkpoints."""
    for path in PACKAGE.rglob('*.py'):
        if (PACKAGE / 'cli') in path.parents:
            continue
        text = path.read_text(encoding='utf-8')
        assert 'from argparse' not in text, path
        assert set(re.findall(r'\bargparse\.(\w+)', text)) <= {'Namespace'}, path


def test_run_options_are_the_config_fields():
    """`cluster` and `compare` declare no option of their own for a setting: each is a config field, default and help."""
    from timm_supertoken.clustering.deep_clustering import ClusterConfig, ClusterData
    from timm_supertoken.config_fields import config_from_options

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cluster, compare = subparsers.choices['cluster'], subparsers.choices['compare']
    defaults = vars(cluster.parse_args([]))
    assert config_from_options(ClusterConfig, defaults) == ClusterConfig()  # the command's defaults are the library's
    assert config_from_options(ClusterData, defaults) == ClusterData()
    chosen = vars(cluster.parse_args(['--no-augment', '--hflip', '--view-scale', '0.5', '1', '--model-kwargs',
                                      'depth=2', '--k', '3', '--targets', 'true']))
    assert config_from_options(ClusterConfig, chosen) == ClusterConfig(
        augment=False, hflip=True, view_scale=(0.5, 1.0), model_kwargs={'depth': 2}, k=3, targets='true')
    with pytest.raises(SystemExit):
        cluster.parse_args(['--targets', 'labels'])  # a field's choices are the option's
    for parser in (cluster, compare):
        for action in parser._actions:
            if action.default is not None and action.nargs != 0:  # every valued option shows its default
                assert '(default' in action.help, action.option_strings
