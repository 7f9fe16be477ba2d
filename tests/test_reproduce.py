"""benchmarks/reproduce.py writes its tables as results/reproduce.json and renders the benchmarks page from it."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'reproduce.py'


def test_trained_and_speed_only_tables(tmp_path):
    """Table 6 trained (one seed, one epoch of the quick recipe) beside Table 8 timed untrained, as a GPU budget
    runs them: each table as it ran, Table 7 absent, and the command that reproduces the result."""
    page, results = tmp_path / 'benchmarks.md', tmp_path / 'results'
    run = subprocess.run([sys.executable, str(SCRIPT), '--tables', '6', '8', '--speed-only', '8', '--seeds', '0',
                          '--epochs', '1', '--results-dir', str(results), '--page', str(page),
                          '--work-dir', str(tmp_path / 'runs')],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((results / 'reproduce.json').read_text())
    assert record['command'] == 'python benchmarks/reproduce.py --epochs 1 --seeds 0 --tables 6 8 --speed-only 8'
    assert record['date'] and record['hardware']['cpu'] and record['versions']['torch']
    assert any('Table 8: timed untrained (`--speed-only`), so no top-1' in line for line in record['setting'])
    table_6, table_8 = record['tables']
    assert table_6['title'].startswith('Table 6') and table_8['title'].startswith('Table 8')
    assert [row[0] for row in table_6['rows']] == ['vit_small_patch', 'vit_small_convembed', 'vit_small_stconv']
    top1, img_per_s = table_6['columns'].index('top-1 (ours)'), table_6['columns'].index('img/s')
    assert all(0.0 <= row[top1] <= 100.0 and row[img_per_s] > 0 for row in table_6['rows'])  # measured
    assert [row[0] for row in table_8['rows']] == [1, 2, 3, 4]
    assert all(row[1] > 0 and row[3] is None for row in table_8['rows'])  # timed, no top-1
    text = page.read_text()
    assert '## Paper Tables 6-8' in text and 'Table 7' not in text
    assert '| vit_small_stconv |' in text


def test_speed_only_table_must_be_run():
    run = subprocess.run([sys.executable, str(SCRIPT), '--tables', '7', '--speed-only', '8'],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert '--speed-only [8] names tables that --tables [7] does not run' in run.stderr
