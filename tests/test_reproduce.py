"""benchmarks/reproduce.py writes docs/reproduction.md's generated section from the experiments it runs."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'reproduce.py'


def test_trained_and_speed_only_tables(tmp_path):
    """Table 6 trained (one seed, one epoch of the quick recipe) beside Table 8 timed untrained, as a GPU budget
    runs them: each table as it ran, Table 7 absent, and the command that regenerates the page."""
    page = tmp_path / 'reproduction.md'
    run = subprocess.run([sys.executable, str(SCRIPT), '--tables', '6', '8', '--speed-only', '8', '--seeds', '0',
                          '--epochs', '1', '--output', str(page), '--work-dir', str(tmp_path / 'runs')],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = page.read_text()
    assert '`python benchmarks/reproduce.py --epochs 1 --seeds 0 --tables 6 8 --speed-only 8`' in text
    assert 'Table 8: timed untrained (`--speed-only`), so no top-1' in text
    assert '### Table 7' not in text
    table_6 = text.split('### Table 6: the three embeddings')[1].split('### Table 8')[0]
    rows = [line.split('|') for line in table_6.splitlines() if line.startswith('| vit_small_')]
    assert [row[1].strip() for row in rows] == ['vit_small_patch', 'vit_small_convembed', 'vit_small_stconv']
    assert all(0.0 <= float(row[6]) <= 100.0 and float(row[4]) > 0 for row in rows)  # top-1 and img/s measured
    table_8 = text.split('### Table 8: clustering iterations t (vit_small_stconv)')[1]
    rows = [line.split('|') for line in table_8.splitlines() if line[:4] in ('| 1 ', '| 2 ', '| 3 ', '| 4 ')]
    assert len(rows) == 4
    assert all(float(row[2]) > 0 and row[4].strip() == '— (timed untrained)' for row in rows)


def test_speed_only_table_must_be_run():
    run = subprocess.run([sys.executable, str(SCRIPT), '--tables', '7', '--speed-only', '8'],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert '--speed-only [8] names tables that --tables [7] does not run' in run.stderr
