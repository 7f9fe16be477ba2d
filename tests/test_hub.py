"""Weights on the Hub: export, push and load in timm's Hub layout, offline.

Hub traffic goes to tests/hub_server.py on 127.0.0.1 through huggingface_hub's real download and upload code
(the server answers "regular" upload mode, so blobs travel inside the commit rather than over LFS/Xet).
Models are ViT-S with a 1-block, 48-wide trunk at 64x64 so that every build takes milliseconds.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import timm
from timm.layers import resample_abs_pos_embed

from timm_supertoken.cli import main
from timm_supertoken.hub import (
    DEFAULT_HUB_ORG, HUB_ORG_ENV, CheckpointError, default_repo_id, export, load_model, push,
    read_checkpoint,
)
from timm_supertoken.references import SUPER_TOKEN_PAPER

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub  # noqa: E402

TINY = dict(depth=1, embed_dim=48, num_heads=2)
IMG = 64
NUM_CLASSES = 7
FILES = ['README.md', 'config.json', 'model.safetensors', 'train_hparams.yaml']  # of a train.py checkpoint


def tiny_model(name: str = 'vit_small_stconv', seed: int = 0, img_size=IMG, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES, img_size=img_size, **TINY, **kwargs).eval()


def outputs(model: torch.nn.Module, size=(IMG, IMG)) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, *size))


class Opaque:
    """A class torch.load(weights_only=True) must refuse to rebuild."""


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A timm train.py-style checkpoint whose EMA and raw weights differ."""
    model, ema = tiny_model(seed=0), tiny_model(seed=1)
    args = argparse.Namespace(
        model='vit_small_stconv', num_classes=NUM_CLASSES, model_kwargs=dict(TINY), img_size=IMG, input_size=None,
        epochs=300, batch_size=128, opt='adamw', lr=1e-3, weight_decay=0.05, mixup=1.0, cutmix=0.8,
        model_ema=True, eval_metric='top1', dataset='', mean=None, std=None, crop_pct=None)
    path = tmp_path_factory.mktemp('train') / 'model_best.pth.tar'
    torch.save({
        'epoch': 299, 'arch': 'vit_small_stconv', 'state_dict': model.state_dict(),
        'state_dict_ema': ema.state_dict(), 'optimizer': torch.optim.AdamW(model.parameters()).state_dict(),
        'version': 2, 'args': args, 'metric': 81.25, 'saver': {'history': [[81.25, 299]]},
    }, path)
    return dict(path=path, model=model, ema=ema)


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    labels = tmp_path_factory.mktemp('labels') / 'labels.txt'
    labels.write_text('\n'.join(f'class_{i}' for i in range(NUM_CLASSES)))
    return export(trained['path'], tmp_path_factory.mktemp('export') / 'out', dataset='imagenet-100',
                  label_names=labels)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local Hub, with huggingface_hub pointed at it and its cache in tmp_path."""
    from huggingface_hub import constants
    cache = str(tmp_path / 'hf-cache')
    with LocalHub() as server:
        monkeypatch.setenv('HF_ENDPOINT', server.endpoint)
        monkeypatch.setenv('HF_HUB_CACHE', cache)
        monkeypatch.setenv('HF_TOKEN', 'hf_local_test_token')
        # huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE once, at import: mirror them into its constants
        monkeypatch.setattr(constants, 'ENDPOINT', server.endpoint)
        monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                            server.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', cache)
        monkeypatch.setattr(constants, 'AGENT_HARNESSES_PATH', str(tmp_path / 'agent_harnesses.json'))
        yield server
        assert not server.unhandled, f'client used endpoints the test server lacks: {server.unhandled}'


# -- export and local round trips ---------------------------------------------------------------------------

def test_export_train_checkpoint_round_trip_uses_ema(trained, exported):
    assert sorted(p.name for p in exported.iterdir()) == FILES
    loaded = timm.create_model(f'local-dir:{exported}', pretrained=True)
    assert torch.equal(outputs(loaded), outputs(trained['ema']))
    assert not torch.equal(outputs(loaded), outputs(trained['model']))

    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == 'vit_small_stconv' and config['num_classes'] == NUM_CLASSES
    assert config['num_features'] == TINY['embed_dim'] and config['global_pool'] == 'token'
    assert {k: config['model_args'][k] for k in TINY} == TINY
    # transformers' TimmWrapper passes num_classes itself and refuses a second one in model_args
    assert 'num_classes' not in config['model_args']
    assert config['pretrained_cfg']['input_size'] == [3, IMG, IMG]
    assert config['pretrained_cfg']['interpolation'] == 'bicubic' and config['pretrained_cfg']['crop_pct'] == 0.9
    assert config['label_names'] == [f'class_{i}' for i in range(NUM_CLASSES)]
    assert config['training']['weights'] == 'state_dict_ema' and config['training']['metrics'] == {'top1': 81.25}
    assert loaded.pretrained_cfg['label_names'][3] == 'class_3'

    readme = (exported / 'README.md').read_text()
    front_matter = readme.split('---\n')[1]
    for line in ('library_name: timm', 'license: apache-2.0', '- timm-supertoken', '- imagenet-100'):
        assert line in front_matter
    for line in ('- transformers', 'pipeline_tag: image-classification'):
        assert line in front_matter
    for text in (SUPER_TOKEN_PAPER.doi, '@misc{rw2019timm', 'top1: 81.250', 'epoch 299', 'lr: 0.001', 'cutmix: 0.8',
                 'Embedding params: 110,352', f"hf-hub:{DEFAULT_HUB_ORG}/vit_small_stconv", 'Image size: 64 x 64',
                 '### Image Classification', '### Feature Map Extraction', '### Image Embeddings',
                 'arxiv.org/abs/2211.11167'):
        assert text in readme

    # every train.py argument of the run, as train.py's own args.yaml holds them
    hparams = yaml.safe_load((exported / 'train_hparams.yaml').read_text())
    assert hparams['model'] == 'vit_small_stconv' and hparams['model_kwargs'] == TINY
    assert (hparams['epochs'], hparams['lr'], hparams['mixup'], hparams['cutmix']) == (300, 1e-3, 1.0, 0.8)


def test_export_no_ema_takes_raw_weights(trained, tmp_path):
    out = main(['export', str(trained['path']), str(tmp_path / 'raw'), '--no-ema'])
    assert out == 0
    loaded = timm.create_model(f'local-dir:{tmp_path / "raw"}', pretrained=True)
    assert torch.equal(outputs(loaded), outputs(trained['model']))


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_export_plain_weights_through_cli(suffix, tmp_path, capsys):
    model = tiny_model('vit_small_patch', seed=3, mlp_ratio=3)
    path = tmp_path / f'weights{suffix}'
    if suffix == '.safetensors':
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    assert main(['export', str(path), str(tmp_path / 'out'), '--model', 'vit_small_patch', '--model-kwargs',
                 'depth=1', 'embed_dim=48', 'num_heads=2', 'mlp_ratio=3', f'img_size={IMG}']) == 0
    assert 'model.safetensors' in capsys.readouterr().out
    loaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert torch.equal(outputs(loaded), outputs(model))
    assert loaded.blocks[0].mlp.fc1.out_features == 3 * 48
    # a bare state dict records no run, so no train_hparams.yaml goes beside it
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == FILES[:3]


def test_export_checkpoint_fine_tuned_from_local_dir(tmp_path):
    """train.py --model local-dir:EXPORT records only that name: export reads the architecture and kwargs there."""
    source = tiny_model('vit_small_patch', seed=5, mlp_ratio=3)
    save_file(source.state_dict(), tmp_path / 'w.safetensors')
    base = export(tmp_path / 'w.safetensors', tmp_path / 'base', model_name='vit_small_patch',
                  model_args=dict(TINY, mlp_ratio=3, img_size=IMG))
    name = f'local-dir:{base}'
    tuned = timm.create_model(name, pretrained=True, num_classes=3)
    args = argparse.Namespace(model=name, num_classes=3, model_kwargs={}, img_size=None, input_size=None)
    checkpoint = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 4, 'arch': 'VisionTransformer', 'state_dict': tuned.state_dict(), 'args': args}, checkpoint)

    assert main(['export', str(checkpoint), str(tmp_path / 'tuned')]) == 0
    config = json.loads((tmp_path / 'tuned' / 'config.json').read_text())
    assert config['architecture'] == 'vit_small_patch' and config['num_classes'] == 3
    assert config['model_args']['mlp_ratio'] == 3
    loaded = load_model(tmp_path / 'tuned')
    assert torch.equal(outputs(loaded), outputs(tuned))

    (base / 'config.json').unlink()
    with pytest.raises(SystemExit, match=rf'^timm-supertoken export: error: {checkpoint}: trained from {name}, '
                                         rf'whose config.json cannot be read \({base}/config.json: missing\); '
                                         rf'pass --model and --model-kwargs instead$'):
        main(['export', str(checkpoint), str(tmp_path / 'again')])


def test_exported_files_share_the_umask_mode(trained, tmp_path):
    previous = os.umask(0o027)
    try:
        out = export(trained['path'], tmp_path / 'out')
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {name: '0o640' for name in FILES}


def test_pretrained_cfg_overlay_file(trained, exported):
    model = timm.create_model(
        'vit_small_stconv', pretrained=True, num_classes=NUM_CLASSES, img_size=IMG, **TINY,
        pretrained_cfg_overlay=dict(file=str(exported / 'model.safetensors'), num_classes=NUM_CLASSES))
    assert torch.equal(outputs(model), outputs(trained['ema']))


def test_load_resets_head_and_resamples_pos_embed(trained, exported):
    model = load_model(exported, num_classes=3, img_size=(96, 80))
    ema = trained['ema']
    assert model.head.weight.shape == (3, 48) and model.pos_embed.shape == (1, 1 + 6 * 5, 48)
    expected = resample_abs_pos_embed(ema.pos_embed, new_size=(6, 5), old_size=(4, 4), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)
    assert outputs(model, (96, 80)).shape == (2, 3)


def test_non_square_source_grid_is_resampled(tmp_path):
    source = tiny_model(seed=4, img_size=(48, 80))
    save_file(source.state_dict(), tmp_path / 'w.safetensors')
    out = export(tmp_path / 'w.safetensors', tmp_path / 'out', model_name='vit_small_stconv',
                 model_args=dict(TINY, img_size=(48, 80)))
    model = load_model(out, img_size=IMG)
    expected = resample_abs_pos_embed(source.pos_embed, new_size=(4, 4), old_size=(3, 5), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected)


# -- the Hub, through huggingface_hub's real client against tests/hub_server.py --------------------------------

def test_push_then_load_from_hf_hub(trained, hub, tmp_path):
    url = push(trained['path'], 'acme/stconv-tiny', commit_message='Add tiny stconv', dataset='imagenet-100')
    assert url.startswith(f'{hub.endpoint}/acme/stconv-tiny/commit/')
    assert hub.commit_messages == ['Add tiny stconv']
    assert all(auth == 'Bearer hf_local_test_token' for method, _, auth in hub.requests if method == 'POST')
    # the upload is exactly what export writes for the same repo id
    reference = export(trained['path'], tmp_path / 'reference', repo_id='acme/stconv-tiny', dataset='imagenet-100')
    files = hub.files('acme/stconv-tiny')
    assert sorted(files) == FILES
    assert json.loads(files['config.json']) == json.loads((reference / 'config.json').read_text())
    assert files['README.md'] == (reference / 'README.md').read_bytes()
    assert files['model.safetensors'] == (reference / 'model.safetensors').read_bytes()

    model = timm.create_model('hf-hub:acme/stconv-tiny', pretrained=True)
    assert torch.equal(outputs(model), outputs(trained['ema']))
    assert ('HEAD', '/acme/stconv-tiny/resolve/main/model.safetensors', 'Bearer hf_local_test_token') in hub.requests
    commit = hub.resolve('acme/stconv-tiny', 'main')
    assert ('GET', f'/acme/stconv-tiny/resolve/{commit}/model.safetensors') in [r[:2] for r in hub.requests]
    snapshot = Path(os.environ['HF_HUB_CACHE']) / 'models--acme--stconv-tiny' / 'snapshots' / commit
    assert sorted(p.name for p in snapshot.iterdir()) == ['config.json', 'model.safetensors']

    headless = load_model('hf-hub:acme/stconv-tiny', num_classes=0, img_size=96)
    assert headless(torch.randn(1, 3, 96, 96)).shape == (1, 48)


def test_push_exported_folder_keeps_readme_and_updates_weights(trained, exported, hub):
    hub.create_repo('acme/stconv-tiny')
    hub.commit('acme/stconv-tiny', 'main', {'README.md': b'---\nlicense: apache-2.0\n---\n# curated card\n'})
    push(exported, 'acme/stconv-tiny', commit_message='Update weights')
    files = hub.files('acme/stconv-tiny')
    # timm's push_to_hf_hub leaves an existing model card alone
    assert files['README.md'] == b'---\nlicense: apache-2.0\n---\n# curated card\n'
    assert files['model.safetensors'] == (exported / 'model.safetensors').read_bytes()
    config = json.loads(files['config.json'])
    assert config == json.loads((exported / 'config.json').read_text())


def test_push_dry_run_uploads_nothing(trained, exported, hub, capsys):
    assert main(['push', str(trained['path']), 'acme/dry', '--dry-run', '--dataset', 'imagenet-100']) == 0
    out = capsys.readouterr().out
    assert 'nothing uploaded' in out and 'acme/dry' in out
    sizes = {line.split()[0]: int(line.split()[1].replace(',', '')) for line in out.splitlines()[1:]}
    assert sorted(sizes) == FILES
    assert sizes['model.safetensors'] == (exported / 'model.safetensors').stat().st_size
    # an exported folder re-stages to the very same files
    staged = dict(push(exported, dry_run=True).files)
    assert staged == {p.name: p.stat().st_size for p in exported.iterdir()}
    assert hub.requests == []


def test_push_dry_run_names_the_repo_it_would_use(exported, monkeypatch, capsys):
    monkeypatch.setenv(HUB_ORG_ENV, 'my-lab')
    assert main(['push', str(exported), '--dry-run']) == 0
    assert 'would upload to my-lab/vit_small_stconv (revision main;' in capsys.readouterr().out
    assert push(exported, 'acme/named', dry_run=True).repo_id == 'acme/named'


def test_push_cli_in_fresh_process_reads_hf_endpoint(exported, hub, tmp_path):
    """The environment variables alone, read by huggingface_hub at import, route the real CLI to the server."""
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / 'hf-home'), HF_TOKEN='hf_cli_token',
               HF_HUB_DISABLE_PROGRESS_BARS='1')
    done = subprocess.run([sys.executable, '-m', 'timm_supertoken.cli', 'push', str(exported), 'acme/from-cli'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'pushed: {hub.endpoint}/acme/from-cli/commit/' in done.stdout
    assert sorted(hub.files('acme/from-cli')) == FILES
    assert ('POST', '/api/repos/create', 'Bearer hf_cli_token') in hub.requests


def test_hub_org_is_configurable(monkeypatch):
    monkeypatch.delenv(HUB_ORG_ENV, raising=False)
    assert default_repo_id('vit_small_stconv') == 'timm-supertoken/vit_small_stconv'
    monkeypatch.setenv(HUB_ORG_ENV, 'my-lab')
    assert default_repo_id('vit_small_stconv') == 'my-lab/vit_small_stconv'


# -- safety: every bad input is refused with an error naming the file ----------------------------------------

def _copy_export(exported: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in FILES:
        (dest / name).write_bytes((exported / name).read_bytes())
    return dest


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_corrupt_safetensors(exported, tmp_path, damage):
    folder = _copy_export(exported, tmp_path / 'bad')
    weights = folder / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == 'truncated' else b'\xff' * 64)
    with pytest.raises(CheckpointError, match=f'{folder}/model.safetensors: not a readable safetensors file'):
        load_model(f'local-dir:{folder}')
    with pytest.raises(CheckpointError, match=f'{weights}: not a readable safetensors file'):
        export(weights, tmp_path / 'out', model_name='vit_small_stconv')


def test_config_architecture_not_ours(exported, tmp_path):
    folder = _copy_export(exported, tmp_path / 'bad')
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(dict(config, architecture='resnet18')))
    with pytest.raises(CheckpointError, match=r"config.json: architecture 'resnet18' is not a timm-supertoken model"):
        load_model(folder)


def test_config_does_not_match_weights(exported, tmp_path):
    folder = _copy_export(exported, tmp_path / 'bad')
    config = json.loads((folder / 'config.json').read_text())
    config['model_args']['embed_dim'] = 64
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r'model.safetensors: weights do not match config.json .*'
                                              r'shape file vs model: cls_token \(1, 1, 48\) vs \(1, 1, 64\)'):
        load_model(folder)


def test_checkpoint_of_another_architecture(trained, tmp_path):
    with pytest.raises(CheckpointError, match=rf"{trained['path']}: weights do not match vit_small_patch.*missing"):
        export(trained['path'], tmp_path / 'out', model_name='vit_small_patch', model_args=dict(TINY, img_size=IMG))
    with pytest.raises(SystemExit, match='weights do not match vit_small_stconv'):
        main(['export', str(trained['path']), str(tmp_path / 'out'), '--num-classes', '10'])


def test_missing_files(exported, tmp_path, hub):
    with pytest.raises(CheckpointError, match=f'{tmp_path / "nope.pth"}: no such file'):
        read_checkpoint(tmp_path / 'nope.pth')
    folder = _copy_export(exported, tmp_path / 'partial')
    (folder / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match=f'{folder}/model.safetensors: missing'):
        load_model(folder)
    with pytest.raises(CheckpointError, match='hf-hub:acme/absent/config.json: cannot download it'):
        load_model('hf-hub:acme/absent')
    state_dict = tmp_path / 'plain.pth'
    torch.save(tiny_model().state_dict(), state_dict)
    with pytest.raises(CheckpointError, match=f'{state_dict}: the file does not name its architecture; pass --model'):
        export(state_dict, tmp_path / 'out')


def test_pickle_needs_trust(tmp_path):
    path = tmp_path / 'pickled.pth.tar'
    torch.save({'state_dict': tiny_model().state_dict(), 'arch': 'vit_small_stconv', 'extra': Opaque()}, path)
    with pytest.raises(CheckpointError, match=rf'{path}: refusing to unpickle.*Opaque.*--trust-pickle'):
        read_checkpoint(path)
    with pytest.raises(SystemExit, match='--trust-pickle'):
        main(['export', str(path), str(tmp_path / 'out')])
    assert main(['export', str(path), str(tmp_path / 'out'), '--trust-pickle',
                 '--model-kwargs', 'depth=1', 'embed_dim=48', 'num_heads=2', f'img_size={IMG}']) == 0
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match=f'{garbage}: not a readable PyTorch checkpoint'):
        read_checkpoint(garbage)


def test_empty_and_garbage_files_are_one_line_errors(tmp_path):
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(SystemExit, match=f'^timm-supertoken export: error: {empty}: the file is empty$'):
        main(['export', str(empty), str(tmp_path / 'out'), '--model', 'vit_small_stconv'])
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'\x80\xd1 a pickle protocol that does not exist')
    with pytest.raises(SystemExit, match=rf'^timm-supertoken export: error: {garbage}: not a readable PyTorch '
                                         rf'checkpoint \(ValueError: unsupported pickle protocol: 209\)$'):
        main(['export', str(garbage), str(tmp_path / 'out'), '--model', 'vit_small_stconv', '--trust-pickle'])


def test_model_card_cites_the_published_paper():
    """The card, the timm cfg and the BibTeX name the paper as printed: J. DCS 25(2):485-494, 2024."""
    assert SUPER_TOKEN_PAPER.doi == '10.9728/dcs.2024.25.2.485'
    cfg = timm.create_model('vit_small_stconv', pretrained=False, **TINY).pretrained_cfg
    assert cfg['paper_ids'] == 'DOI:10.9728/dcs.2024.25.2.485' and cfg['paper_name'] == SUPER_TOKEN_PAPER.title
    bib = SUPER_TOKEN_PAPER.bibtex('key')
    for text in ('author = {Jin Lee and Ju-Hwan Lee and Jin-Young Kim}', 'volume = {25}', 'number = {2}',
                 'pages = {485--494}', 'doi = {10.9728/dcs.2024.25.2.485}'):
        assert text in bib
