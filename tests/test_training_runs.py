"""`timm-supertoken compare` as users run it: killed and resumed, and under torchrun with two CPU processes.

Every sample's augmentation is seeded by (seed, epoch, index) and every epoch re-seeds the global
RNGs, so a resumed run repeats the interrupted epoch exactly. Two processes see the same global
batches, each rank half of every batch, and DDP averages the gradients; with mixup and drop path
off (they draw per rank, as in train.py) and a LayerNorm-only model, only the order of float
additions differs from one process.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

TINY = ['--model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2', '--img-size', '32', '--batch-size', '32',
        '--warmup-epochs', '1', '--threads', '1', '--device', 'cpu', '--seed', '1']
TIMEOUT_S = 300


def _command(out, *args, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc)]
    return [*launcher, '-m', 'timm_supertoken.cli', 'compare', *TINY, *args, '--out', str(out)]


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def _run(out, *args, nproc=1):
    proc = subprocess.run(_command(out, *args, nproc=nproc), capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / 'results.json').read_text()), proc.stdout


def _histories(results):
    return {spec: r['history'] for spec, r in results['models'].items()}


def _assert_same_training(a, b, top1_abs=0.0, rel=1e-6):
    """Per model and epoch: the same learning rate, training loss and validation top-1 / loss."""
    ha, hb = _histories(a), _histories(b)
    assert list(ha) == list(hb)
    for spec in ha:
        assert [h['epoch'] for h in ha[spec]] == [h['epoch'] for h in hb[spec]]
        for x, y in zip(ha[spec], hb[spec]):
            assert x['lr'] == pytest.approx(y['lr'], rel=1e-12)
            assert x['train_loss'] == pytest.approx(y['train_loss'], rel=rel), spec
            assert x['val_loss'] == pytest.approx(y['val_loss'], rel=rel), spec
            assert abs(x['top1'] - y['top1']) <= top1_abs, spec


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ['--models', 'vit_small_patch', 'vit_small_stconv', '--epochs', '4']
    reference, _ = _run(tmp_path / 'reference', *args)

    out = tmp_path / 'killed'
    proc = subprocess.Popen(_command(out, *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=_env())
    deadline = time.monotonic() + TIMEOUT_S
    for line in proc.stdout:  # kill in the middle of the first model, once epoch 2 is reported
        if 'vit_small_patch epoch 2/4' in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / 'vit_small_stconv').exists()  # the second model had not started

    resumed, stdout = _run(out, *args, '--resume')
    assert 'vit_small_patch: resumed from' in stdout and 'vit_small_stconv: no checkpoint' in stdout
    # same seed, same machine, same thread count: the resumed run reproduces the reference exactly
    _assert_same_training(reference, resumed)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    args = ['--models', 'vit_small_patch', '--epochs', '2', '--mixup', '0', '--cutmix', '0', '--drop-path', '0']
    one, _ = _run(tmp_path / 'one', *args)
    two, stdout = _run(tmp_path / 'two', *args, nproc=2)
    assert (one['world_size'], two['world_size']) == (1, 2)
    assert stdout.count('| vit_small_patch |') == 1  # only rank 0 prints the table
    # float sums in another order: a validation image near a decision boundary may flip (1 of 359 = 0.28%)
    _assert_same_training(one, two, top1_abs=0.6, rel=1e-3)


@pytest.mark.slow
def test_batchnorm_embeddings_train_under_gloo(tmp_path):
    results, _ = _run(tmp_path / 'bn', '--models', 'vit_small_stconv', 'vit_small_convembed', '--epochs', '1', nproc=2)
    # gloo has no SyncBatchNorm: each rank normalises its half batch, so only completion and sanity are checked
    for r in results['models'].values():
        assert r['epochs'] == 1 and 0 <= r['top1'] <= 100 and r['history'][0]['train_loss'] > 0
