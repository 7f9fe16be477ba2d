"""transformers reaches an exported folder through its TimmWrapper classes, and gets what timm gets from it.

transformers routes any folder whose config.json has a `pretrained_cfg` to TimmWrapper, which builds the
model with `timm.create_model(architecture, ...)`: the start-up hook is what makes our architectures known
there. Everything runs offline on a `timm-supertoken export` of a 1-block ViT-S at 64x64.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm
import transformers

from timm_supertoken.hub import export

TINY = dict(depth=1, embed_dim=48, num_heads=2, img_size=64)
NUM_CLASSES = 7
LABELS = [f'class_{i}' for i in range(NUM_CLASSES)]


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    """An exported 7-class vit_small_stconv with label names."""
    torch.manual_seed(0)
    model = timm.create_model('vit_small_stconv', num_classes=NUM_CLASSES, **TINY)
    root = tmp_path_factory.mktemp('transformers')
    torch.save(model.state_dict(), root / 'weights.pth')
    (root / 'labels.txt').write_text('\n'.join(LABELS))
    return export(root / 'weights.pth', root / 'export', model_name='vit_small_stconv', model_args=TINY,
                  label_names=root / 'labels.txt')


@pytest.fixture(scope='module')
def timm_model(folder: Path) -> torch.nn.Module:
    return timm.create_model(f'local-dir:{folder}', pretrained=True).eval()


@pytest.fixture(scope='module')
def image() -> Image.Image:
    """A photo-like RGB picture (smooth gradients plus noise), larger than the model's input."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    base = np.stack([xx * 2, yy * 2.5, (xx + yy)], axis=-1) % 256
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))


def test_auto_model_for_image_classification_matches_timm(folder, timm_model):
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == 'TimmWrapperForImageClassification'
    assert [model.config.id2label[i] for i in range(NUM_CLASSES)] == LABELS
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        expected = timm_model(x)
    # the same weights through the same timm modules: equal to float32 rounding
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_auto_model_gives_timm_features_and_pre_logits(folder, timm_model):
    model = transformers.AutoModel.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(pixel_values=x)
        tokens = timm_model.forward_features(x)
        pre_logits = timm_model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(out.last_hidden_state, tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pooler_output, pre_logits, rtol=1e-5, atol=1e-6)


def test_image_processor_preprocesses_as_timm(folder, timm_model, image):
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    data_config = timm.data.resolve_model_data_config(timm_model)
    as_tuples = lambda config: {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}  # noqa: E731
    assert as_tuples(processor.data_config) == as_tuples(data_config)  # JSON lists vs transformers' tuples
    transform = timm.data.create_transform(**data_config, is_training=False)
    pixels = processor(images=image, return_tensors='pt')['pixel_values']
    assert pixels.shape == (1, 3, 64, 64)
    torch.testing.assert_close(pixels, transform(image).unsqueeze(0), rtol=0, atol=0)


def test_pipeline_labels_an_image_with_the_exported_names(folder, timm_model, image):
    classifier = transformers.pipeline('image-classification', model=str(folder))
    predictions = classifier(image, top_k=3)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(timm_model), is_training=False)
    with torch.no_grad():
        probabilities = timm_model(transform(image).unsqueeze(0)).softmax(dim=-1)[0]
    top = probabilities.topk(3)
    assert [p['label'] for p in predictions] == [LABELS[i] for i in top.indices]
    np.testing.assert_allclose([p['score'] for p in predictions], top.values.numpy(), rtol=1e-5)


def _fresh_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A new interpreter that never imports timm_supertoken itself: only the start-up hook can register it."""
    environ = {k: v for k, v in os.environ.items() if k != 'TIMM_SUPERTOKEN_NO_AUTOREGISTER'}
    environ.update(HF_HUB_OFFLINE='1', **env)
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=300)


def test_fresh_process_finds_the_architecture_through_the_hook(folder, tmp_path):
    """transformers probes for timm (importlib.util.find_spec) before importing it; the hook must see both."""
    code = ('import transformers, sys; '
            f'p = transformers.pipeline("image-classification", model={str(folder)!r}); '
            'import numpy as np; from PIL import Image; '
            'print(p(Image.fromarray(np.full((64, 64, 3), 128, np.uint8)), top_k=1)[0]["label"] in '
            f'{LABELS!r}, "timm_supertoken" in sys.modules)')
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ['True', 'True']


def test_unregistered_architecture_says_what_to_import(folder, tmp_path):
    """With the start-up hook opted out, transformers' load fails on one line that names the import."""
    code = f'import transformers; transformers.AutoModelForImageClassification.from_pretrained({str(folder)!r})'
    done = _fresh_python(code, tmp_path, TIMM_SUPERTOKEN_NO_AUTOREGISTER='1')
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        'RuntimeError: vit_small_stconv is a timm-supertoken model, not registered because '
        'TIMM_SUPERTOKEN_NO_AUTOREGISTER is set: `import timm_supertoken` before creating it')
