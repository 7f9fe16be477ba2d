"""End-to-end deep clustering on a digits subset with a tiny model: outputs, resume after a kill, bad input."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from timm_supertoken.cli import main
from timm_supertoken.clustering import ClusterConfig, cluster_metrics, create_cluster_model, run_deep_clustering
from timm_supertoken.data import ImageSet, load_digits_set
from timm_supertoken.clustering.deep_clustering import CHECKPOINT_NAME, EmbedNet

# vit_small_stconv with 1 block of width 32 on 16×16 inputs, one contrastive epoch: seconds per round on 2 CPU cores
TINY = dict(model='vit_small_stconv', model_kwargs={'depth': 1, 'embed_dim': 32, 'num_heads': 2}, img_size=16,
            epochs=1, batch_size=32, kmeans_restarts=1, lr=1e-3, pretrain='simclr', pretrain_epochs=1,
            pretrain_batch_size=32)
TINY_ARGS = ['--subset', '160', '--model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2', '--img-size', '16',
             '--epochs', '1', '--batch-size', '32', '--kmeans-restarts', '1', '--lr', '1e-3', '--threads', '1',
             '--pretrain', 'simclr', '--pretrain-epochs', '1', '--pretrain-batch-size', '32']


@pytest.fixture(scope='module')
def digits160():
    return load_digits_set().subset(160, seed=0)


def test_cli_end_to_end(tmp_path, capsys):
    assert main(['cluster', *TINY_ARGS, '--max-rounds', '2', '--eps=-1e9', '--out', str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert '| kmeans pixels |' in printed and '| kmeans contrastive embedding |' in printed and '| round 2 |' in printed
    assert '| umap contrastive embedding and pixels |' in printed
    assert ('round 0 trains on k-means of a UMAP layout of the pixels and the contrastive embedding side by side'
            in printed and 'hflip=False' in printed)
    assert 'rounds=paper (eq. 8 on lightly augmented images, re-clustered by k-means of the embedding)' in printed
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert metrics['n'] == 160 and metrics['k'] == 10 and metrics['config']['targets'] == 'pseudo'
    assert metrics['pretrain']['method'] == 'simclr' and metrics['pretrain']['loss_contrastive'] > 0
    assert [r['round'] for r in metrics['rounds']] == [0, 1, 2]
    assert metrics['stop_reason'].startswith('max_rounds')
    assert metrics['rounds'][0]['loss_clustering'] == 0.0 and metrics['rounds'][1]['loss_clustering'] > 0
    for r in metrics['rounds'] + list(metrics['baselines'].values()):
        assert 0.0 <= r['nmi'] <= 1.0 and 0.0 <= r['acc'] <= 1.0
    with open(tmp_path / 'assignments.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 160 and [int(r['index']) for r in rows] == list(range(160))
    assert {int(r['cluster']) for r in rows} <= set(range(10))
    assert [int(r['label']) for r in rows] == load_digits_set().subset(160, seed=0).labels.tolist()
    for png in ('nmi_per_round.png', 'clusters.png'):
        with Image.open(tmp_path / png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert {'model', 'optimizer', 'state', 'config', 'n'} <= ckpt.keys()
    assert ckpt['state']['centroids'].shape == (10, 32) and ckpt['state']['assignments'].shape == (160,)
    # round 0 trained on the UMAP readout, which the baseline row scores
    readout = metrics['baselines']['umap_contrastive_embedding_and_pixels']
    initial = cluster_metrics(load_digits_set().subset(160, seed=0).labels, ckpt['state']['initial_assignments'].numpy())
    assert readout['nmi'] == pytest.approx(initial['nmi']) and readout['time_s'] > 0


@pytest.mark.parametrize('pretrain, readout, initial', [
    ('simclr', 'kmeans', 'kmeans_contrastive_embedding'),
    ('none', 'umap', 'umap_pixels'),
    ('none', 'kmeans', 'kmeans_pixels'),
])
def test_each_readout_gives_round_0_its_targets(tmp_path, digits160, pretrain, readout, initial):
    cfg = ClusterConfig(**dict(TINY, pretrain=pretrain, readout=readout), max_rounds=0)
    result = run_deep_clustering(digits160, cfg, str(tmp_path), log=lambda s: None)
    assert any(name.startswith('umap') for name in result['baselines']) == (readout == 'umap')
    targets = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)['state']['initial_assignments']
    scored = cluster_metrics(digits160.labels, targets.numpy())
    assert result['baselines'][initial]['nmi'] == pytest.approx(scored['nmi'])


def test_cli_defaults_choose_the_stage_per_dataset_and_targets():
    from timm_supertoken.cli import build_parser
    from timm_supertoken.cli.clustering import data_and_config
    from timm_supertoken.clustering.deep_clustering import pretrain_method

    parser = build_parser()

    def config(*argv):
        return data_and_config(parser.parse_args(['cluster', '--subset', '20', *argv]))[1]
    digits = config()
    assert pretrain_method(digits) == 'none' and not digits.hflip  # 8×8 glyphs: no crops, no mirror images
    chosen = config('--pretrain', 'simclr', '--hflip')
    assert pretrain_method(chosen) == 'simclr' and chosen.hflip
    assert pretrain_method(ClusterConfig()) == 'simclr' and pretrain_method(ClusterConfig(targets='true')) == 'none'


class Killed(Exception):
    pass


@pytest.mark.parametrize('rounds', ['paper', 'views'])
def test_resume_after_kill_matches_uninterrupted(tmp_path, digits160, rounds):
    cfg = ClusterConfig(**TINY, max_rounds=2, eps=-1e9, seed=3, rounds=rounds)
    full = run_deep_clustering(digits160, cfg, str(tmp_path / 'full'), log=lambda s: None)

    def kill_after_round_0(r, record):
        if r == 0:
            raise Killed  # the checkpoint of round 0 is already on disk, as after a real kill

    with pytest.raises(Killed):
        run_deep_clustering(digits160, cfg, str(tmp_path / 'cut'), on_round_end=kill_after_round_0, log=lambda s: None)
    assert not (tmp_path / 'cut' / 'assignments.csv').exists()
    # the resumed process must not depend on what the killed one left in the global RNGs
    torch.manual_seed(12345)
    caller_state = torch.get_rng_state()
    resumed = run_deep_clustering(digits160, cfg, str(tmp_path / 'cut'), resume=True, log=lambda s: None)
    assert torch.equal(torch.get_rng_state(), caller_state)  # ... nor leave anything in them for the caller
    assert len(resumed['rounds']) == len(full['rounds']) == 3
    for a, b in zip(full['rounds'], resumed['rounds']):
        for key in ('loss', 'nmi', 'ari', 'acc', 'inertia'):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a['round'], key)
    assert (tmp_path / 'full' / 'assignments.csv').read_text() == (tmp_path / 'cut' / 'assignments.csv').read_text()

    other_rounds = {'paper': 'views', 'views': 'paper'}[rounds]
    for changed in (dict(img_size=24), dict(readout='kmeans'), dict(rounds=other_rounds)):
        with pytest.raises(ValueError, match='written by a different run'):
            run_deep_clustering(digits160, ClusterConfig(**{**TINY, 'rounds': rounds, 'seed': 3, **changed}),
                                str(tmp_path / 'cut'), resume=True, log=lambda s: None)


def test_resume_after_the_representation_stage_skips_it(tmp_path, digits160, monkeypatch):
    from timm_supertoken.clustering import deep_clustering

    cfg = ClusterConfig(**TINY, max_rounds=0)
    stages = []
    pretrain = deep_clustering.pretrain_representation
    monkeypatch.setattr(deep_clustering, 'pretrain_representation',
                        lambda *a, **kw: stages.append(1) or pretrain(*a, **kw))
    monkeypatch.setattr(deep_clustering, 'train_round', lambda *a, **kw: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):  # killed in round 0, after the stage's checkpoint
        run_deep_clustering(digits160, cfg, str(tmp_path), log=lambda s: None)
    first = json.loads(json.dumps(torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)['state']['pretrain']))
    monkeypatch.undo()
    monkeypatch.setattr(deep_clustering, 'pretrain_representation',
                        lambda *a, **kw: stages.append(2) or pretrain(*a, **kw))
    logged = []
    result = run_deep_clustering(digits160, cfg, str(tmp_path), resume=True, log=logged.append)
    assert stages == [1] and result['pretrain'] == first and [r['round'] for r in result['rounds']] == [0]
    assert 'resumed from' in logged[0] and 'after the representation stage' in logged[0]


def test_views_rounds_train_on_views_and_read_out_again(tmp_path, digits160, monkeypatch):
    from timm_supertoken.clustering import deep_clustering

    readouts = []
    readout = deep_clustering.umap_readout
    monkeypatch.setattr(deep_clustering, 'umap_readout', lambda *a, **kw: readouts.append(a[1]) or readout(*a, **kw))
    cfg = ClusterConfig(**TINY, rounds='views', max_rounds=2, eps=-1e9)
    result = run_deep_clustering(digits160, cfg, str(tmp_path), log=lambda s: None)
    assert result['config']['rounds'] == 'views' and [r['round'] for r in result['rounds']] == [0, 1, 2]
    # the stage's readout, then one per round, each of the newest embedding
    assert len(readouts) == 4 and all(z.shape == (160, 32) for z in readouts)
    assert not any(torch.equal(readouts[i], readouts[i + 1]) for i in range(3))
    for r in result['rounds']:
        assert r['loss_contrastive'] > 0 and r['loss'] >= r['loss_contrastive'] + r['loss_vit']
    assert result['rounds'][0]['loss_clustering'] == 0.0 and result['rounds'][1]['loss_clustering'] > 0
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assign, centroids = state['state']['assignments'], state['state']['centroids']
    # eq. 7's centroids are the clusters' mean embeddings; the projection head is saved for a resume
    z = readouts[-1].cpu()
    members = assign == assign[0]
    assert torch.allclose(centroids[assign[0]], z[members].mean(0), atol=1e-5)
    assert state['projection'] is not None and cluster_metrics(digits160.labels, assign.numpy())['nmi'] == \
        pytest.approx(result['rounds'][-1]['nmi'])


def test_true_labels_mode_and_a_timm_model(tmp_path, digits160):
    # the paper as written (ground-truth targets), on timm's own ViT
    cfg = ClusterConfig(model='vit_tiny_patch16_224', model_kwargs={'depth': 1, 'patch_size': 4, 'embed_dim': 32,
                                                                    'num_heads': 2},
                        img_size=16, epochs=1, batch_size=32, kmeans_restarts=1, targets='true', max_rounds=1)
    result = run_deep_clustering(digits160, cfg, str(tmp_path), log=lambda s: None)
    assert [r['round'] for r in result['rounds']] == [0, 1]
    assert result['pretrain'] is None and 'kmeans_contrastive_embedding' not in result['baselines']  # labels: no stage
    assert result['rounds'][1]['loss_vit'] < result['rounds'][0]['loss_vit']  # it learns the labels
    head = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)['model']['model.head.weight']
    assert head.shape == (10, 32)  # one output per ground-truth class


def test_cnn_without_img_size():
    # a timm CNN takes no img_size: the model is created without it and still embeds via forward_head
    cfg = ClusterConfig(model='resnet10t', img_size=16)
    net = EmbedNet(create_cluster_model(cfg, num_classes=4, in_chans=1)).eval()
    z, logits = net(torch.randn(2, 1, 16, 16))
    assert z.shape == (2, 512) and logits.shape == (2, 4)


@pytest.mark.parametrize('kind, cfg_kw, match', [
    ('k1', dict(k=1), 'k must be at least 2'),
    ('kbig', dict(k=161), 'k=161 clusters requested but .* holds only 160 images'),
    ('empty', dict(), 'is empty'),
    ('true_few', dict(k=12, targets='true'), '10 classes, fewer than k=12'),
    ('nolabels', dict(), 'no labels, so k cannot default'),
    ('batch', dict(batch_size=0), 'batch_size=0'),
    ('pretrain', dict(pretrain='byol'), "pretrain must be one of .*'byol'"),
    ('readout', dict(readout='spectral'), "readout must be one of .*'spectral'"),
    ('pretrain_batch', dict(pretrain_batch_size=1), 'pretrain_batch_size >= 2'),
    ('view_scale', dict(view_scale=(0.8, 0.4)), r'view_scale must satisfy 0 < min <= max <= 1.*\(0.8, 0.4\)'),
    ('color_jitter', dict(color_jitter=1.5), r'color_jitter must be in \[0, 1\).*1.5'),
])
def test_bad_input_is_rejected_before_training(tmp_path, digits160, kind, cfg_kw, match):
    data = digits160
    if kind == 'empty':
        data = ImageSet(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), np.zeros(0, np.int64), 'empty')
    elif kind == 'nolabels':
        data = ImageSet(digits160.images, None, 'unlabelled')
    with pytest.raises(ValueError, match=match):
        run_deep_clustering(data, ClusterConfig(**dict(TINY, **cfg_kw)), str(tmp_path), log=lambda s: None)
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_a_bad_option_is_the_first_and_only_output(tmp_path, capsys):
    with pytest.raises(SystemExit, match='^timm-supertoken cluster: error: k must be at least 2, got k=1$'):
        main(['cluster', '--subset', '20', '--k', '1', '--out', str(tmp_path)])
    assert capsys.readouterr() == ('', '')  # no settings, no machine description: the error alone


def test_diverged_model_reports_nan(tmp_path, digits160):
    # a learning rate this large sends the tiny ViT's weights to Inf/NaN within the first round
    cfg = ClusterConfig(**dict(TINY, lr=1e30))
    with pytest.raises((FloatingPointError, ValueError), match='NaN|Inf|nan|inf'):
        run_deep_clustering(digits160, cfg, str(tmp_path), log=lambda s: None)


def test_cluster_benchmark_writes_its_result(tmp_path):
    import bench_cluster as bench  # benchmarks/ is on sys.path (conftest.py)

    results, page = tmp_path / 'results', tmp_path / 'benchmarks.md'
    bench.main(['--dataset', 'digits', *TINY_ARGS, '--max-rounds', '0', '--results-dir', str(results),
                '--page', str(page)])
    record = json.loads((results / 'cluster_cpu_digits.json').read_text())
    assert record['command'].startswith('python benchmarks/bench_cluster.py --dataset digits --subset 160')
    assert str(results) not in record['command']  # the command shown reproduces the numbers, wherever they went
    (table,) = record['tables']
    names = [row[0] for row in table['rows']]
    assert 'kmeans pixels' in names and 'kmeans contrastive embedding' in names and names[-1] == 'round 0'
    assert "Round 0's pseudo-labels: k-means of a UMAP layout of the pixels and the contrastive embedding" in \
        ' '.join(record['setting'])
    text = page.read_text()
    assert '| kmeans pixels |' in text and 'vs k-means on the same pixels' in text and 'CPU time' in text
    assert 'target NMI' not in text  # a subset is not the dataset the targets are set on
    for name in bench.FIGURES:  # the run's figures sit next to the page and the section links them
        assert (tmp_path / 'figures' / f'cluster_cpu_digits_{name}').stat().st_size > 0
        assert f'(figures/cluster_cpu_digits_{name})' in text


def test_cluster_benchmark_judges_each_dataset_by_its_targets():
    import bench_cluster as bench

    result = {'baselines': {'kmeans_pixels': {'nmi': 0.51}, 'umap_contrastive_embedding_and_pixels': {'nmi': 0.69}},
              'rounds': [{'nmi': 0.70, 'acc': 0.66}, {'nmi': 0.73, 'acc': 0.71}]}
    scores, time_line = bench.target_findings(result, bench.TARGETS['fashion-mnist'], minutes=31)
    assert 'target NMI ≥ 0.72: met' in scores and 'target ACC ≥ 0.70: met' in scores
    assert "the rounds add +0.0400 to the readout's 0.6900 (target ≥ +0.02: met)" in scores
    assert 'target ≤ 30 min on 2 cores: NOT met' in time_line
    scores, _ = bench.target_findings(result, bench.TARGETS['fashion-mnist:test'], minutes=5)
    assert 'vs k-means on the same pixels 0.5100: +0.2200 (target ≥ +0.10: met)' in scores
    scores, _ = bench.target_findings(result, bench.TARGETS['digits'], minutes=2)
    assert 'target NMI ≥ 0.88: NOT met' in scores


def test_gpu_cluster_benchmark_writes_its_result_and_figures(tmp_path):
    import bench_cluster_gpu as bench  # benchmarks/ is on sys.path (conftest.py)

    results, page = tmp_path / 'results', tmp_path / 'benchmarks.md'
    bench.main(['--dataset', 'digits', '--device', 'cpu', *TINY_ARGS, '--max-rounds', '0',
                '--results-dir', str(results), '--page', str(page)])
    assert (results / 'cluster_gpu.json').is_file()
    text = page.read_text()
    assert '| kmeans contrastive embedding |' in text and '| round 0 |' in text
    assert 'target ≥ 0.70' in text and 'GPU utilisation: not sampled (not a CUDA run)' in text
    for name in bench.FIGURES:  # the run's figures sit next to the page and the section links them
        assert (tmp_path / 'figures' / f'fashion_mnist_gpu_{name}').stat().st_size > 0
        assert f'(figures/fashion_mnist_gpu_{name})' in text


def test_views_benchmark_scores_every_variant(tmp_path):
    import bench_views as bench

    where = ['--results-dir', str(tmp_path / 'results'), '--page', str(tmp_path / 'benchmarks.md')]
    bench.main(['--dataset', 'digits', *TINY_ARGS, '--variants', '', 'color_jitter=0 hflip=true', *where])
    text = (tmp_path / 'benchmarks.md').read_text()
    assert '| base |' in text and '| color_jitter=0 hflip=true |' in text and '| UMAP readout NMI |' in text
    record = json.loads((tmp_path / 'results' / 'cluster_views.json').read_text())
    assert record['command'].startswith('python benchmarks/bench_views.py --dataset digits')
    assert str(tmp_path) not in record['command']  # the command, less where the results went
    with pytest.raises(SystemExit):  # a typo in a variant stops the run before any training
        bench.main(['--dataset', 'digits', *TINY_ARGS, '--variants', 'colour_jitter=0', *where])


def test_neighbour_agreement_counts_label_matches_among_nearest_neighbours():
    from bench_views import neighbour_agreement

    z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert neighbour_agreement(z, np.array([0, 0, 1, 1]), k=1) == 1.0
    assert neighbour_agreement(z, np.array([0, 1, 0, 1]), k=1) == 0.0
    assert neighbour_agreement(z, np.array([0, 0, 1, 1]), k=1, chunk=3) == 1.0  # chunks see the whole set
