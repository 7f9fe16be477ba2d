"""Benchmark results as data, and the one page rendered from them.

Each benchmark script ends with `write_result(result_record(...))`: its tables as rows, with the run's
hardware, versions, commit, date and command, go to `benchmarks/results/<benchmark>.json`, and
`docs/benchmarks.md` is rendered again from every result file, so the page shows each benchmark's latest
run once and nobody edits it by hand (`python benchmarks/docs_page.py` re-renders it). The scripts run as
`python benchmarks/<script>.py`, which puts this folder on sys.path, so they import it as `docs_page`;
tests/conftest.py adds the folder for the tests.
"""
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from timm_supertoken.runtime import cpu_name

__all__ = ['Table', 'met', 'target_verdict', 'reproducing_command', 'run_metadata', 'result_record', 'write_result',
           'render_section', 'render_page', 'write_page', 'tables_from_markdown']

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / 'benchmarks' / 'results'
PAGE = ROOT / 'docs' / 'benchmarks.md'
# the page's order; a result not named here follows, alphabetically
ORDER = ('cpu_inference', 'gpu_supertoken', 'kernel_report', 'data_loader', 'compare_step', 'reproduce',
         'cluster_cpu_fashion_mnist', 'cluster_cpu_fashion_mnist_test', 'cluster_cpu_digits', 'readout_scale',
         'pixel_features', 'cluster_gpu', 'cluster_views')
PLACEHOLDER = '—'
Cell = Union[str, int, float, None]


@dataclass
class Table:
    """One table of a result: column names, rows of values, and per column an optional str.format pattern.

    Numbers stay numbers in the JSON; `formats` (e.g. '{:.3f}×', '{:,}') say how the page prints them.
    None prints as a dash. A table with `on_page=False` is kept in the result file only, which keeps the
    page short where a script records more detail than a reader needs.
    """
    columns: List[str]
    rows: List[List[Cell]]
    formats: Optional[List[Optional[str]]] = None
    title: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    on_page: bool = True

    def __post_init__(self):
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f'table {self.title or self.columns}: a row has {len(row)} cells for '
                                 f'{len(self.columns)} columns: {row}')
        if self.formats is not None and len(self.formats) != len(self.columns):
            raise ValueError(f'table {self.title or self.columns}: {len(self.formats)} formats for '
                             f'{len(self.columns)} columns')


def met(ok: bool) -> str:
    """A target's verdict as every result states it."""
    return 'met' if ok else 'NOT met'


def target_verdict(ratio: float, best_ratio: float, target: float) -> str:
    """Met, not met, or inconclusive when the median and the fastest repeat fall on either side of the target."""
    if min(ratio, best_ratio) >= target:
        return 'met'
    if max(ratio, best_ratio) < target:
        return 'NOT met'
    return 'inconclusive: the median and the fastest repeat disagree, the machine was too noisy'


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> Optional[str]:
    """The checkout's short commit, with '+changes' when tracked files differ from it; None outside git."""
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD'], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ('+changes' if dirty else '')


def reproducing_command(script: str, argv: Sequence[str]) -> str:
    """`python benchmarks/<script> <argv>` minus where the results go, shell-quoted: what the page shows."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith(('--results-dir=', '--page=')):
            skip = False
        elif arg in ('--results-dir', '--page'):
            skip = True
        else:
            kept.append(arg)
    return shlex.join(['python', f'benchmarks/{script}', *kept])


def run_metadata(command: Optional[str] = None, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """What a figure is meaningless without: date, commit, command, hardware and versions."""
    gpu = None
    if device is not None and device.type == 'cuda':
        gpu = torch.cuda.get_device_name(device)
    if command is None:
        command = reproducing_command(Path(sys.argv[0]).name, sys.argv[1:])
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        'commit': _commit(),
        'command': command,
        'hardware': {'cpu': cpu_name(), 'cores': os.cpu_count(), 'gpu': gpu},
        'versions': {'torch': torch.__version__, 'timm': _version('timm'), 'triton': _version('triton'),
                     'cuda': torch.version.cuda if gpu else None,
                     'python': '.'.join(map(str, sys.version_info[:3]))},
    }


def result_record(
        benchmark: str,
        title: str,
        tables: Sequence[Table],
        setting: Sequence[str] = (),
        findings: Sequence[str] = (),
        command: Optional[str] = None,
        device: Optional[torch.device] = None,
) -> Dict[str, Any]:
    """One run as the dict a result file holds: the tables as rows, with the run's metadata."""
    return {'benchmark': benchmark, 'title': title, **run_metadata(command, device),
            'setting': list(setting), 'tables': [asdict(t) for t in tables], 'findings': list(findings)}


def write_result(record: Dict[str, Any], results_dir: Path = RESULTS_DIR, page: Optional[Path] = PAGE) -> Path:
    """Write a `result_record` to `results_dir/<benchmark>.json`, replacing the last run's, and render `page`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f'{record["benchmark"]}.json'
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    if page is not None:
        write_page(results_dir, page)
    return path


def _cell(value: Cell, fmt: Optional[str]) -> str:
    if value is None:
        return PLACEHOLDER
    if fmt is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value).replace('|', '\\|')


def _markdown_table(table: Dict[str, Any]) -> List[str]:
    columns, rows = table['columns'], table['rows']
    formats = table.get('formats') or [None] * len(columns)
    numeric = [all(r[i] is None or isinstance(r[i], (int, float)) for r in rows) and any(r[i] is not None for r in rows)
               for i in range(len(columns))]
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + ''.join('---:|' if n else '---|' for n in numeric)]
    lines += ['| ' + ' | '.join(_cell(v, f) for v, f in zip(row, formats)) + ' |' for row in rows]
    return lines


def _machine(record: Dict[str, Any]) -> str:
    hw, versions = record.get('hardware') or {}, record.get('versions') or {}
    cpu = hw.get('cpu') or 'CPU not recorded'
    if hw.get('cores'):
        cpu += f' ({hw["cores"]} cores)'
    where = f'{hw["gpu"]}, {cpu}' if hw.get('gpu') else cpu
    names = {'torch': 'torch', 'timm': 'timm', 'triton': 'Triton', 'cuda': 'CUDA', 'python': 'Python'}
    software = ', '.join(f'{names[k]} {versions[k]}' for k in names if versions.get(k))
    return f'{where}; {software}' if software else where


def render_section(record: Dict[str, Any]) -> str:
    """One result as a `## ` section: a line of provenance, the setting, the tables, the findings."""
    provenance = [f'`{record["command"]}`' if record.get('command') else 'command not recorded',
                  record.get('date') or 'date not recorded',
                  f'commit {record["commit"]}' if record.get('commit') else 'commit not recorded']
    lines = [f'## {record["title"]}', '', ' · '.join(provenance) + f' · {_machine(record)}.']
    lines += [f'- {item}' for item in record.get('setting', [])] + ['']
    tables = record.get('tables', [])
    for table in tables:
        if not table.get('on_page', True):
            continue
        if table.get('title'):
            lines.append(table['title'])
        lines += _markdown_table(table) + ['']
        if table.get('notes'):
            lines += [f'- {note}' for note in table['notes']] + ['']
    findings = list(record.get('findings', []))
    hidden = sum(not table.get('on_page', True) for table in tables)
    if hidden:
        findings.append(f'{hidden} more table(s) in `benchmarks/results/{record["benchmark"]}.json`.')
    if findings:
        lines += [f'- {item}' for item in findings] + ['']
    return '\n'.join(lines)


def _load(results_dir: Path) -> List[Dict[str, Any]]:
    records = [json.loads(p.read_text(encoding='utf-8')) for p in sorted(results_dir.glob('*.json'))]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(records, key=lambda r: (rank.get(r['benchmark'], len(ORDER)), r['benchmark']))


def render_page(results_dir: Path = RESULTS_DIR) -> str:
    """docs/benchmarks.md from every result file: each benchmark's latest run, once."""
    head = ['# Benchmarks', '',
            'Generated from `benchmarks/results/*.json` by `benchmarks/docs_page.py`; each benchmark script '
            'rewrites its own result file when it runs. Do not edit this page by hand.', '']
    return '\n'.join(head) + '\n' + '\n'.join(render_section(r) for r in _load(results_dir)).rstrip('\n') + '\n'


def write_page(results_dir: Path = RESULTS_DIR, page: Path = PAGE) -> None:
    """Render the page from `results_dir` into `page`."""
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_page(results_dir), encoding='utf-8')


_NUMBER = re.compile(r'^(-?\d[\d,]*)(\.\d+)?(×|%| ms| s)?$')


def _typed_column(cells: List[str]) -> Optional[tuple]:
    """(values, format) when every cell of a column is a number printed one way, else None."""
    present = [c for c in cells if c not in ('', PLACEHOLDER, '-')]
    matches = [_NUMBER.match(c) for c in present]
    if not present or not all(matches):
        return None
    decimals = {len(m.group(2) or '') for m in matches}
    suffixes = {m.group(3) or '' for m in matches}
    if len(decimals) != 1 or len(suffixes) != 1:
        return None
    places, suffix = decimals.pop(), suffixes.pop()
    comma = ',' if any(',' in m.group(1) for m in matches) else ''
    fmt = f'{{:{comma}.{max(places - 1, 0)}f}}{suffix}' if places else f'{{:{comma}}}{suffix}'
    values = []
    for c in cells:
        if c in ('', PLACEHOLDER, '-'):
            values.append(None)
            continue
        m = _NUMBER.match(c)
        number = m.group(1).replace(',', '') + (m.group(2) or '')
        values.append(float(number) if places else int(number))
    if any(_cell(v, fmt) != c for v, c in zip(values, cells) if v is not None):
        return None
    return values, fmt


def tables_from_markdown(text: str) -> Tuple[List[str], List[Table]]:
    """The paragraphs before the first table, and the Markdown tables of `text` as Tables with typed columns.

    For the scripts that still print Markdown. The paragraph before a table, from the last heading on if
    there is one, becomes its title, and the paragraphs between it and the next table (or the end) its
    notes; a bullet list gives one item per bullet. A column becomes numbers only when printing them
    back gives the same text.
    """
    blocks = [b.strip('\n') for b in re.split(r'\n\s*\n', text) if b.strip()]
    tables: List[Table] = []
    leading: List[str] = []
    pending: List[str] = []
    for block in blocks:
        lines = block.splitlines()
        first_row = next((i for i, line in enumerate(lines) if line.startswith('|')), len(lines))
        if 0 < first_row < len(lines):  # a caption line directly above its table, as the page prints them
            pending.append(' '.join(line.strip() for line in lines[:first_row]))
            block, lines = '\n'.join(lines[first_row:]), lines[first_row:]
        if not lines[0].startswith('|'):
            if block.startswith('## '):
                continue
            if all(line.startswith('- ') or line.startswith('  ') for line in lines):
                pending += [' '.join(item.split()) for item in re.split(r'(?m)^- ', block) if item.strip()]
            else:
                pending.append(' '.join(line.strip() for line in lines))
            continue
        split = [[c.strip() for c in re.split(r'(?<!\\)\|', line.strip())[1:-1]] for line in lines]
        header, body = split[0], split[2:]
        columns = list(zip(*body)) if body else [[] for _ in header]
        values, formats = [], []
        for cells in columns:
            typed = _typed_column([c.replace('\\|', '|') for c in cells])
            values.append(typed[0] if typed else [None if c in ('', PLACEHOLDER) else c.replace('\\|', '|')
                                                   for c in cells])
            formats.append(typed[1] if typed else None)
        rows = [list(r) for r in zip(*values)] if body else []
        start = max([i for i, item in enumerate(pending) if item.startswith('#')] or [len(pending) - 1])
        (tables[-1].notes if tables else leading).extend(pending[:max(start, 0)])
        title = '\n\n'.join(pending[max(start, 0):]) or None
        tables.append(Table(header, rows, formats, title=title))
        pending = []
    (tables[-1].notes if tables else leading).extend(pending)
    return leading, tables


if __name__ == '__main__':
    write_page()
    print(f'rendered {PAGE} from {RESULTS_DIR}')
