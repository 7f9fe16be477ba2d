"""One checkpoint reader with one rule: weights_only plus data-only types, pickle only when trusted."""
import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from timm_supertoken.checkpoint import CheckpointError, load_checkpoint
from timm_supertoken.clustering import ClusterConfig, run_deep_clustering
from timm_supertoken.clustering.deep_clustering import CHECKPOINT_NAME
from timm_supertoken.data import load_digits_set


class Opaque:
    """A class the safe rule must refuse to rebuild."""


def test_data_only_types_load_without_trust(tmp_path):
    """train.py's argparse.Namespace and the NumPy RNG state / metrics of resumable checkpoints."""
    path = tmp_path / 'ckpt.pt'
    saved = {'args': argparse.Namespace(model='vit_small_stconv'), 'rng': {'numpy': np.random.get_state()},
             'nmi': np.float64(0.5), 'weights': torch.arange(3)}
    torch.save(saved, path)
    loaded = load_checkpoint(path)
    assert loaded['args'].model == 'vit_small_stconv' and loaded['nmi'] == 0.5
    assert np.array_equal(loaded['rng']['numpy'][1], saved['rng']['numpy'][1])
    assert torch.equal(loaded['weights'], saved['weights'])


def test_objects_need_trust(tmp_path):
    path = tmp_path / 'pickled.pt'
    torch.save({'extra': Opaque()}, path)
    with pytest.raises(CheckpointError, match=rf'{path}: refusing to unpickle.*Opaque.*--trust-pickle'):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, trust_pickle=True)['extra'], Opaque)


def test_empty_file_is_named(tmp_path):
    path = tmp_path / 'empty.pth'
    path.write_bytes(b'')
    for trust in (False, True):
        with pytest.raises(CheckpointError, match=f'^{path}: the file is empty$'):
            load_checkpoint(path, trust_pickle=trust)


@pytest.mark.parametrize('trust_pickle', [False, True])
def test_garbage_is_named_whatever_the_decoder_raises(tmp_path, trust_pickle):
    """Damaged bytes make pickle raise IndexError, KeyError, UnicodeDecodeError, struct.error, OverflowError..."""
    path = tmp_path / 'garbage.pth'
    rng = random.Random(0)
    samples = [b'not a checkpoint at all', b'\x80\x02\xff', b'\x80\x05\x95' + b'\xff' * 8, b'PK\x03\x04 truncated']
    samples += [bytes(rng.randrange(256) for _ in range(rng.choice([1, 3, 64]))) for _ in range(60)]
    for data in samples:
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=f'^{path}: not a readable PyTorch checkpoint \\(.+\\)$'):
            load_checkpoint(path, trust_pickle=trust_pickle)


def test_deep_clustering_resume_refuses_pickled_objects(tmp_path):
    """Its checkpoints were read with weights_only=False: a planted object would have been rebuilt."""
    torch.save({'config': {}, 'extra': Opaque()}, tmp_path / CHECKPOINT_NAME)
    cfg = ClusterConfig(model_kwargs={'depth': 1, 'embed_dim': 32, 'num_heads': 2}, img_size=16, kmeans_restarts=1)
    with pytest.raises(CheckpointError, match=f'{tmp_path / CHECKPOINT_NAME}: refusing to unpickle.*Opaque'):
        run_deep_clustering(load_digits_set().subset(40, seed=0), cfg, str(tmp_path), resume=True, log=lambda s: None)


def test_every_reader_goes_through_load_checkpoint():
    """One rule only holds if nothing else in the package calls torch.load."""
    package = Path(__file__).resolve().parents[1] / 'timm_supertoken'
    callers = sorted(str(p.relative_to(package)) for p in package.rglob('*.py') if 'torch.load(' in p.read_text())
    assert callers == ['checkpoint.py']
