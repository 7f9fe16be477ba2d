"""The model card: stats measured as timm's cards measure them, and usage snippets that run as printed.

The snippets are executed against a `local-dir:` export: the only edits are the model id (the Hub repo
becomes the folder) and the picture (a URL becomes a local image), and every shape a snippet prints must be
the one its comment promises.
"""
import contextlib
import io
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

import timm

from timm_supertoken.hub import CARD_IMAGE_LINE, export
from timm_supertoken.models.complexity import measure_complexity

REPO_ID = 'acme/card-test'
TINY = dict(depth=3, embed_dim=48, num_heads=2, img_size=64)


@pytest.mark.parametrize('name, gmacs, activations_m', [
    # as printed on timm's own Hub cards (Model Stats: GMACs, Activations (M)) for these architectures
    ('vit_small_patch16_224', '4.6', '11.9'),
    ('vit_base_patch16_224', '17.6', '23.9'),
    ('resnet50', '4.1', '11.1'),
    ('resnet18', '1.8', '2.5'),
])
def test_complexity_matches_timm_cards(name, gmacs, activations_m):
    with torch.device('meta'):
        model = timm.create_model(name)
    complexity = measure_complexity(model)  # shapes are all it needs: meta tensors suffice
    assert (f'{complexity.gmacs:.1f}', f'{complexity.activations_m:.1f}') == (gmacs, activations_m)


def test_complexity_counts_our_embedding():
    """The super-token stem costs MACs of its own: more than the patch embedding's single matmul."""
    patch, stconv = (measure_complexity(timm.create_model(f'vit_tiny_{e}', **TINY)) for e in ('patch', 'stconv'))
    assert patch.input_size == stconv.input_size == (3, 64, 64)
    assert stconv.macs > patch.macs > 0 and stconv.activations > patch.activations > 0


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model('vit_small_stconv', num_classes=7, **TINY)
    root = tmp_path_factory.mktemp('card')
    torch.save(model.state_dict(), root / 'weights.pth')
    return export(root / 'weights.pth', root / 'export', repo_id=REPO_ID, model_name='vit_small_stconv',
                  model_args=TINY)


def _snippets(readme: str) -> List[str]:
    return re.findall(r'```python\n(.*?)```', readme, flags=re.S)


def _promised_output(snippet: str) -> List[str]:
    """What a snippet says it prints: `print(...)  # X` gives X; a comment block after `# prints, ...:` its lines."""
    promised, listing = [], False
    for line in snippet.splitlines():
        stripped = line.strip()
        if stripped.startswith('print(') and '  # ' in line:
            promised.append(line.split('  # ', 1)[1])
        elif stripped == '# prints, one line per map:':
            listing = True
        elif listing and stripped.startswith('#'):
            promised.append(stripped.lstrip('# '))
        else:
            listing = False
    return promised


def test_card_has_timm_stats_and_usage_sections(exported):
    readme = (exported / 'README.md').read_text()
    for heading in ('## Model Details', '## Model Usage', '### Image Classification', '### Feature Map Extraction',
                    '### Image Embeddings', '### With transformers', '## Citation'):
        assert heading in readme
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    complexity = measure_complexity(model, (3, 64, 64))
    for line in (f'Params (M): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}',
                 f'GMACs: {complexity.gmacs:.1f}', f'Activations (M): {complexity.activations_m:.1f}',
                 'Image size: 64 x 64'):
        assert f'  - {line}\n' in readme
    assert len(_snippets(readme)) == 4


def test_card_snippets_run_and_print_what_they_promise(exported):
    readme = (exported / 'README.md').read_text()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    for snippet in _snippets(readme):
        assert CARD_IMAGE_LINE in snippet
        runnable = (snippet.replace(CARD_IMAGE_LINE, 'img = PICTURE')
                    .replace(f"'hf-hub:{REPO_ID}'", f"'local-dir:{exported}'")
                    .replace(f"model='{REPO_ID}'", f"model='{exported}'"))
        assert REPO_ID not in runnable and 'urlopen(' not in runnable.replace('import urlopen', '')
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(runnable, 'README.md', 'exec'), {'PICTURE': picture})
        promised = _promised_output(snippet)
        assert promised and printed.getvalue().splitlines() == promised
