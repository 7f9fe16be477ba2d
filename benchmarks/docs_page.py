"""What the benchmark scripts share: rewriting their own section of a docs page, and the verdict on a target.

The scripts run as `python benchmarks/<script>.py`, which puts this folder on sys.path, so they import
it as `docs_page`; tests/conftest.py adds the folder for the tests.
"""
from pathlib import Path

__all__ = ['target_verdict', 'write_markdown_section']


def target_verdict(ratio: float, best_ratio: float, target: float) -> str:
    """Met, not met, or inconclusive when the median and the fastest repeat fall on either side of the target."""
    if min(ratio, best_ratio) >= target:
        return 'met'
    if max(ratio, best_ratio) < target:
        return 'NOT met'
    return 'inconclusive: the median and the fastest repeat disagree, the machine was too noisy'


def write_markdown_section(path: Path, heading: str, section: str) -> None:
    """Replace one `## ` section of a Markdown file (or append it), so several benchmarks share one page."""
    text = path.read_text() if path.exists() else ''
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip('\n') + '\n\n' + section if text.strip() else '# Benchmarks\n\n' + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')), len(lines))
        tail = ''.join(lines[end:])
        text = ''.join(lines[:start]) + section + ('\n' + tail if tail else '')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
