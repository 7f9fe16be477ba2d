"""Benchmarks share docs/benchmarks.md: each rewrites only its own section."""
from timm_supertoken.benchmark import write_markdown_section


def test_sections_are_replaced_in_place_and_others_survive(tmp_path):
    page = tmp_path / 'docs' / 'benchmarks.md'
    write_markdown_section(page, '## CPU', '## CPU\n\nold cpu\n')
    write_markdown_section(page, '## GPU', '## GPU\n\ngpu\n')
    write_markdown_section(page, '## CPU', '## CPU\n\nnew cpu\n')
    assert page.read_text() == '# Benchmarks\n\n## CPU\n\nnew cpu\n\n## GPU\n\ngpu\n'
