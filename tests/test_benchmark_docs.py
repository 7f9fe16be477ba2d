"""docs/benchmarks.md is rendered from benchmarks/results/*.json, which the scripts write; their paths run in CI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench_supertoken import STAGES
from docs_page import (PAGE, RESULTS_DIR, Table, render_page, result_record, tables_from_markdown, target_verdict,
                       write_result)


def test_committed_page_is_rendered_from_the_committed_results():
    assert PAGE.read_text(encoding='utf-8') == render_page(RESULTS_DIR), \
        'docs/benchmarks.md is stale: run python benchmarks/docs_page.py'
    # a page of results, not a log: each benchmark's latest run in a section that fits a screen
    sections = PAGE.read_text(encoding='utf-8').split('\n## ')[1:]
    assert sections and all(len(section.splitlines()) <= 40 for section in sections), \
        [section.splitlines()[0] for section in sections if len(section.splitlines()) > 40]
    assert len(PAGE.read_text(encoding='utf-8').splitlines()) <= 300


def test_every_result_states_where_and_how_it_was_measured():
    for path in sorted(RESULTS_DIR.glob('*.json')):
        record = json.loads(path.read_text(encoding='utf-8'))
        assert record['benchmark'] == path.stem
        assert set(record) >= {'title', 'date', 'commit', 'command', 'hardware', 'versions', 'tables'}, path.name
        assert set(record['hardware']) == {'cpu', 'cores', 'gpu'} and 'torch' in record['versions'], path.name
        for table in record['tables']:
            assert table['rows'] and all(len(row) == len(table['columns']) for row in table['rows']), path.name


def test_a_new_result_replaces_the_old_one_and_others_survive(tmp_path):
    results, page = tmp_path / 'results', tmp_path / 'benchmarks.md'
    old = Table(['model', 'img/s'], [['vit_small_stconv', 11.04]], [None, '{:.1f}'])
    new = Table(['model', 'img/s'], [['vit_small_stconv', 12.96]], [None, '{:.1f}'])
    write_result(result_record('cpu_inference', 'CPU inference', [old], command='python a.py'), results, page)
    write_result(result_record('data_loader', 'Data loader', [old], command='python b.py'), results, page)
    write_result(result_record('cpu_inference', 'CPU inference', [new], ['batch 8'], ['met'], 'python a.py'),
                 results, page)
    text = page.read_text()
    assert sorted(p.name for p in results.iterdir()) == ['cpu_inference.json', 'data_loader.json']
    assert text.count('## CPU inference') == 1 and '| vit_small_stconv | 13.0 |' in text and '11.0' in text
    assert text.index('## CPU inference') < text.index('## Data loader')  # the page's order, not the run order
    cpu = text.split('## CPU inference')[1].split('## Data loader')[0]
    assert '| vit_small_stconv | 13.0 |' in cpu and '11.0' not in cpu and '- batch 8' in cpu and '- met' in cpu
    record = json.loads((results / 'cpu_inference.json').read_text())
    assert record['tables'][0]['rows'] == [['vit_small_stconv', 12.96]]  # the number, not its printed form
    assert record['date'] and record['versions']['torch'] and record['hardware']['cores']


def test_markdown_tables_become_typed_rows_that_print_back_the_same(tmp_path):
    text = ('Intro.\n\nTimes:\n\n| model | ms | ratio | note |\n|---|---:|---:|---|\n'
            '| a | 1,204.5 | 0.950× | — |\n| b | 3.0 | 1.000× | fast |\n\nAfter.\n')
    leading, (table,) = tables_from_markdown(text)
    assert leading == ['Intro.'] and table.title == 'Times:' and table.notes == ['After.']
    assert table.rows == [['a', 1204.5, 0.95, None], ['b', 3.0, 1.0, 'fast']]
    assert table.formats == [None, '{:,.1f}', '{:.3f}×', None]
    write_result(result_record('x', 'X', [table], command='c'), tmp_path, page=None)
    page = render_page(tmp_path)
    assert '| a | 1,204.5 | 0.950× | — |' in page and '| b | 3.0 | 1.000× | fast |' in page


def test_headings_title_the_next_table_and_off_page_tables_stay_in_the_result_file(tmp_path):
    text = ('## Report\n\n- map a\n- map b\n\n### Fit\n\nAll maps:\n\n| map | regs |\n|---|---:|\n| a | 64 |\n\n'
            'Note on fit.\n\n### Detail\n| kernel | regs |\n|---|---:|\n| k | 80 |\n')
    leading, (fit, detail) = tables_from_markdown(text)
    assert leading == ['map a', 'map b'] and fit.title == '### Fit\n\nAll maps:' and fit.notes == ['Note on fit.']
    assert detail.title == '### Detail'
    fit.on_page = False
    write_result(result_record('kernel_report', 'Kernel report', [fit, detail], leading, command='c'), tmp_path,
                 page=None)
    page = render_page(tmp_path)
    assert '| k | 80 |' in page and '| a | 64 |' not in page and '- map a\n- map b\n' in page
    assert '1 more table(s) in `benchmarks/results/kernel_report.json`' in page
    record = json.loads((tmp_path / 'kernel_report.json').read_text())
    assert record['tables'][0]['rows'] == [['a', 64]] and record['tables'][0]['on_page'] is False


def test_a_table_row_must_match_its_columns():
    with pytest.raises(ValueError, match='a row has 1 cells for 2 columns'):
        Table(['model', 'img/s'], [['vit_small_stconv']])


@pytest.mark.slow
def test_gpu_benchmark_runs_every_path_on_cpu():
    """bench_supertoken.py --smoke: a script error shows up here, not on a borrowed GPU (about a minute)."""
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_supertoken.py'
    run = subprocess.run([sys.executable, str(script), '--smoke'], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for heading in ('### Operator', '### Models', '`patch_embed`', 'Table 8', 'reduce-overhead',
                    '### GPU kernels where'):
        assert heading in run.stdout
    for statistic in ('host time to issue fwd / fwd+bwd', 'host time by op', 'lowest–highest round',
                      "host's time to issue it", 'as built, host time by op', 'training step: host ms / GPU ms',
                      'training ratio by GPU time', 'GPU time in kernels, ms'):
        assert statistic in run.stdout
    assert 'smoke run: every path ran; nothing written' in run.stdout


def test_gpu_benchmark_starts_no_stage_past_its_time_budget():
    """--budget-minutes 0: every stage is named as not measured, and none of them ran."""
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_supertoken.py'
    run = subprocess.run([sys.executable, str(script), '--smoke', '--budget-minutes', '0'],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'Not measured in this run (time budget of 0 min spent): operator; models, eager and channels_last;' \
        in run.stdout
    for heading in ('### Operator', '### Models', '### GPU kernels where'):
        assert heading not in run.stdout
    assert f'{len(STAGES)} stage(s) skipped by the time budget' in run.stdout


def test_compare_benchmark_runs_both_loops_on_cpu():
    """bench_compare.py --smoke: the bare loop and compare's fit, timed and tabled, before a GPU ever runs it."""
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_compare.py'
    run = subprocess.run([sys.executable, str(script), '--smoke'], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for row in ('| bare step, pass 2 |', '| compare, epoch 1 (starts the workers, not timed) |', '| compare, epoch 2 |'):
        assert row in run.stdout
    assert 'the bare step (medians;' in run.stdout and 'not judged: it is set for a GPU' in run.stdout
    assert 'smoke run: every path ran; nothing written' in run.stdout


@pytest.mark.parametrize('ratio,best,verdict', [(0.97, 0.96, 'met'), (0.90, 0.94, 'NOT met'), (0.967, 0.919, 'inconclusive')])
def test_target_verdict_needs_median_and_fastest_repeat_to_agree(ratio, best, verdict):
    assert target_verdict(ratio, best, 0.95).startswith(verdict)


def test_cpu_benchmark_writes_its_result_with_noise_and_floor(tmp_path):
    """bench_cpu.py at a toy size: the table, the verdict, the run's noise and the embedding-based estimate."""
    import bench_cpu
    page, results = tmp_path / 'benchmarks.md', tmp_path / 'results'
    bench_cpu.main(['--batch-size', '1', '--img-size', '32', '--repeats', '1', '--warmup', '0',
                    '--results-dir', str(results), '--page', str(page)])
    text = page.read_text()
    for needle in ('## CPU inference', '| vit_small_stconv |', 'Target: vit_small_stconv', 'Noise: vit_small_patch',
                   'From the embedding times (shared trunk', 'with clustering and BatchNorm free the ratio would be at most',
                   'model GFLOPs', '1 more table(s) in `benchmarks/results/cpu_inference.json`'):
        assert needle in text
    assert '| stage | ms / batch |' not in text  # the per-stage detail stays in the result file
    models, stages = json.loads((results / 'cpu_inference.json').read_text())['tables']
    assert [row[0] for row in models['rows']][-1] == 'vit_small_stconv' and stages['rows'][-1][0] == 'whole patch_embed'
