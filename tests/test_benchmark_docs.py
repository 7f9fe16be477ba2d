"""Benchmarks share docs/benchmarks.md, each rewriting only its own section, and run their code paths in CI."""
import subprocess
import sys
from pathlib import Path

import pytest

from bench_supertoken import STAGES
from docs_page import target_verdict, write_markdown_section


def test_sections_are_replaced_in_place_and_others_survive(tmp_path):
    page = tmp_path / 'docs' / 'benchmarks.md'
    write_markdown_section(page, '## CPU', '## CPU\n\nold cpu\n')
    write_markdown_section(page, '## GPU', '## GPU\n\ngpu\n')
    write_markdown_section(page, '## CPU', '## CPU\n\nnew cpu\n')
    assert page.read_text() == '# Benchmarks\n\n## CPU\n\nnew cpu\n\n## GPU\n\ngpu\n'


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


def test_cpu_benchmark_writes_its_section_with_noise_and_floor(tmp_path):
    """bench_cpu.py at a toy size: the table, the verdict, the run's noise and the embedding-based estimate."""
    import bench_cpu
    page = tmp_path / 'benchmarks.md'
    bench_cpu.main(['--batch-size', '1', '--img-size', '32', '--repeats', '1', '--warmup', '0', '--output', str(page)])
    text = page.read_text()
    for needle in ('## CPU inference', '| vit_small_stconv |', 'Target (issue)', 'Noise of this run: vit_small_patch',
                   'From the embedding times (shared trunk', 'with clustering and BatchNorm free the ratio would be at most',
                   '| operator | calls | self ms |'):
        assert needle in text
