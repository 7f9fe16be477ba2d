"""The UMAP readout (clustering/manifold.py): each step against its definition, and the layout against k-means."""
import json
import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from timm_supertoken.clustering import cluster_metrics, kmeans
from timm_supertoken.clustering.features import pixel_features
from timm_supertoken.clustering.manifold import (_membership, fuzzy_graph, joint_features, knn_cosine, knn_ivf,
                                                 nearest_neighbors, optimize_layout, pca_layout, spectral_layout,
                                                 umap_layout)
from timm_supertoken.data import load_digits_set


def blobs(n_per: int, centres: int, dim: int = 8, spread: float = 0.05, seed: int = 0):
    """Well-separated Gaussian blobs on random directions (cosine geometry), with their blob ids."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=gen)
    x = means.repeat_interleave(n_per, 0) + spread * torch.randn(centres * n_per, dim, generator=gen)
    return x, np.repeat(np.arange(centres), n_per)


@pytest.mark.parametrize('chunk', [7, 4096])
def test_knn_matches_scikit_learn_and_excludes_the_point_itself(chunk):
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    idx, dist = knn_cosine(x, 5, chunk=chunk)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=6, metric='cosine').fit(x.numpy()).kneighbors(x.numpy())
    assert torch.equal(idx, torch.from_numpy(ref_idx[:, 1:]))
    np.testing.assert_allclose(dist.numpy(), ref_dist[:, 1:], atol=1e-5)
    assert not (idx == torch.arange(50)[:, None]).any()


def test_memberships_follow_umaps_normalisation():
    dist = torch.rand(40, 15, generator=torch.Generator().manual_seed(2)).sort(1).values + 0.1
    w = _membership(dist)
    # the nearest neighbour is fully connected, and σ_i makes each row's memberships sum to log2 k
    torch.testing.assert_close(w[:, 0], torch.ones(40))
    torch.testing.assert_close(w.sum(1), torch.full((40,), math.log2(15)), rtol=1e-4, atol=1e-4)
    assert (w[:, 1:] <= w[:, :-1]).all()  # farther is weaker


def test_fuzzy_union_is_symmetric_and_combines_both_directions():
    # 0 → 1 only (1's neighbour is 2): the union keeps 0-1 with 0's membership; 1-2 and 2-1 combine
    idx = torch.tensor([[1], [2], [1]])
    dist = torch.tensor([[0.2], [0.3], [0.3]])
    g = fuzzy_graph(idx, dist).to_dense()
    torch.testing.assert_close(g, g.T)
    assert g[0, 1] == 1 and g[1, 2] == 1 and g[0, 2] == 0 and g.diagonal().eq(0).all()


def test_spectral_start_separates_disconnected_groups_and_fills_the_box():
    x, labels = blobs(30, 2)
    graph = fuzzy_graph(*knn_cosine(x, 10))
    start = spectral_layout(graph, dim=2, seed=0)
    assert start.shape == (60, 2) and start.min() >= 0 and start.max() <= 10 + 1e-4
    km = kmeans(start, 2, n_init=2, seed=0).labels.numpy()
    assert cluster_metrics(labels, km)['nmi'] == 1.0


def test_layout_pulls_neighbours_together_and_is_reproducible_per_seed():
    x, labels = blobs(40, 3)
    graph = fuzzy_graph(*knn_cosine(x, 10))
    start = torch.rand(120, 2, generator=torch.Generator().manual_seed(0)) * 10  # no spectral help
    y = optimize_layout(graph, start, epochs=100, seed=0)
    assert cluster_metrics(labels, kmeans(y, 3, n_init=4, seed=0).labels.numpy())['nmi'] == 1.0
    assert torch.equal(y, optimize_layout(graph, start, epochs=100, seed=0))
    assert not torch.equal(y, optimize_layout(graph, start, epochs=100, seed=1))
    assert torch.equal(start, torch.rand(120, 2, generator=torch.Generator().manual_seed(0)) * 10)  # not in place


def test_readout_of_digits_pixels_beats_kmeans_on_them():
    # the reason the readout exists: on scikit-learn's digits k-means on pixels scores NMI 0.74
    digits = load_digits_set()
    pixels = pixel_features(digits.images, torch.device('cpu'))
    on_pixels = cluster_metrics(digits.labels, kmeans(pixels, 10, n_init=4, seed=0).labels.numpy())['nmi']
    layout = umap_layout(joint_features(pixels), seed=0)
    assert layout.shape == (len(digits), 10) and torch.isfinite(layout).all()
    on_layout = cluster_metrics(digits.labels, kmeans(layout, 10, n_init=4, seed=0).labels.numpy())['nmi']
    assert on_pixels < 0.76 and on_layout > 0.85, (on_pixels, on_layout)


def test_joint_features_weigh_each_block_the_same():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 5, generator=gen) + 7, 100 * torch.randn(20, 3, generator=gen)
    f = joint_features(a, b)
    assert f.shape == (20, 8)
    torch.testing.assert_close(f[:, :5].norm(dim=1), torch.ones(20))
    torch.testing.assert_close(f[:, 5:].norm(dim=1), torch.ones(20))


@pytest.mark.parametrize('x, match', [
    (torch.zeros(10), 'expected a 2-D'),
    (torch.tensor([[0.0, float('nan')]] * 20), 'NaN or Inf'),
    (torch.randn(8, 3), 'need 1 <= dim < n - 1'),
])
def test_bad_input_is_named(x, match):
    with pytest.raises(ValueError, match=match):
        umap_layout(x, dim=10)


def test_too_many_neighbours_is_named():
    with pytest.raises(ValueError, match='n_neighbors=5 for 5 points'):
        knn_cosine(torch.randn(5, 3), 5)


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return (approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean().item()


@pytest.fixture(scope='module')
def digits_pixels():
    digits = load_digits_set()
    return pixel_features(digits.images, torch.device('cpu'))


def test_ivf_finds_the_exact_neighbours_in_order_and_never_the_point_itself(digits_pixels):
    idx, dist = knn_ivf(digits_pixels, 30, seed=0)
    exact_idx, _ = knn_cosine(digits_pixels, 30)
    assert idx.shape == dist.shape == (len(digits_pixels), 30)
    assert recall(idx, exact_idx) >= 0.9
    assert not (idx == torch.arange(len(digits_pixels))[:, None]).any()
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    assert (idx.sort(1).values[:, 1:] != idx.sort(1).values[:, :-1]).all()  # k distinct neighbours
    unit = torch.nn.functional.normalize(digits_pixels, dim=1)
    cosine = 1 - (unit.unsqueeze(1) * unit[idx]).sum(2)
    torch.testing.assert_close(dist, cosine.clamp(min=0), atol=1e-5, rtol=0)


def test_ivf_is_deterministic_per_seed(digits_pixels):
    first = knn_ivf(digits_pixels, 10, nprobe=2, seed=3)
    again = knn_ivf(digits_pixels, 10, nprobe=2, seed=3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_ivf_searches_exactly_where_the_probed_cells_hold_too_few_points():
    # 100 cells of ~4 points and one probe: most rows see fewer than k others and take the exact search
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(4))
    idx, dist = knn_ivf(x, 8, cells=100, nprobe=1)
    exact_idx, exact_dist = knn_cosine(x, 8)
    assert (idx >= 0).all() and not (idx == torch.arange(400)[:, None]).any()
    assert (dist >= exact_dist - 1e-6).all()  # never closer than the true neighbours
    assert recall(idx, exact_idx) > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_ivf_runs_on_the_points_device(digits_pixels):
    idx, dist = knn_ivf(digits_pixels.cuda(), 30)
    assert idx.is_cuda and dist.is_cuda
    assert recall(idx.cpu(), knn_cosine(digits_pixels, 30)[0]) >= 0.9


def test_auto_search_is_exact_up_to_the_threshold_and_approximate_above(digits_pixels):
    n = len(digits_pixels)
    exact, approx = knn_cosine(digits_pixels, 15), knn_ivf(digits_pixels, 15, seed=1)
    assert not torch.equal(exact[0], approx[0])  # the two searches differ here, so the switch is visible
    assert torch.equal(nearest_neighbors(digits_pixels, 15, 'auto', exact_max_n=n, seed=1)[0], exact[0])
    assert torch.equal(nearest_neighbors(digits_pixels, 15, 'auto', exact_max_n=n - 1, seed=1)[0], approx[0])
    assert torch.equal(nearest_neighbors(digits_pixels, 15, 'approximate', seed=1)[0], approx[0])
    x = digits_pixels[:300]
    layout = umap_layout(x, dim=2, n_neighbors=10, epochs=20, knn='auto', exact_max_n=299)
    assert torch.equal(layout, umap_layout(x, dim=2, n_neighbors=10, epochs=20, knn='approximate'))
    layout = umap_layout(x, dim=2, n_neighbors=10, epochs=20, knn='auto', exact_max_n=300)
    assert torch.equal(layout, umap_layout(x, dim=2, n_neighbors=10, epochs=20, knn='exact'))


def test_pca_start_fills_the_box_and_auto_takes_it_above_the_threshold(digits_pixels):
    x = digits_pixels[:300]
    start = pca_layout(x, 3, seed=0)
    assert start.shape == (300, 3) and torch.allclose(start.amin(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(start.amax(0), torch.full((3,), 10.0), atol=1e-5)
    assert torch.equal(start, pca_layout(x, 3, seed=0))
    # its first axis is the first principal direction: the variance along it is the largest of any axis
    centred = x - x.mean(0)
    first = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    axis = (start[:, 0] - start[:, 0].mean()) / start[:, 0].std()
    assert abs(torch.corrcoef(torch.stack([axis, centred @ first]))[0, 1]) > 0.999
    settings = dict(dim=2, n_neighbors=10, epochs=20, knn='exact')
    assert torch.equal(umap_layout(x, start='auto', spectral_max_n=299, **settings),
                       umap_layout(x, start='pca', **settings))
    assert torch.equal(umap_layout(x, start='auto', spectral_max_n=300, **settings),
                       umap_layout(x, start='spectral', **settings))


@pytest.mark.parametrize('call, match', [
    (lambda x: umap_layout(x, start='random'), "start must be one of auto, spectral, pca, got 'random'"),
    (lambda x: knn_ivf(x, 5, nprobe=0), 'nprobe must be at least 1'),
    (lambda x: knn_ivf(x, 5, cells=51), 'cells=51 for 50 points'),
    (lambda x: knn_ivf(x, 50), 'n_neighbors=50 for 50 points'),
    (lambda x: knn_ivf(x[0], 5), 'expected a 2-D'),
    (lambda x: nearest_neighbors(x, 5, 'annoy'), "knn must be one of auto, exact, approximate, got 'annoy'"),
    (lambda x: fuzzy_graph(torch.tensor([[1], [1]]), torch.tensor([[0.1], [0.2]])), 'its own neighbour'),
])
def test_bad_search_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(50, 4, generator=torch.Generator().manual_seed(5)))


def test_scale_benchmark_times_every_stage_and_fits_the_exponent(tmp_path):
    import bench_readout_scale as bench  # benchmarks/ is on sys.path (conftest.py)

    results, page = tmp_path / 'results', tmp_path / 'benchmarks.md'
    bench.main(['--sizes', '1500', '3000', '--threads', '1', '--results-dir', str(results), '--page', str(page)])
    record = json.loads((results / 'readout_scale.json').read_text())
    assert [r['n'] for r in record['runs']] == [1500, 3000]
    for run in record['runs']:
        assert run['recall'] > 0.9 and run['peak_rss_gb'] > 0 and 0 < run['pca_start_nmi'] <= 1
        for knn in ('approximate', 'exact'):
            assert all(run[knn][stage]['wall_s'] >= 0 for stage in bench.STAGES) and 0 < run[knn]['nmi'] <= 1
    assert 'Growth exponent of the total time over 1,500 → 3,000 points' in ' '.join(record['findings'])
    assert '| 3,000 | approximate |' in page.read_text()
