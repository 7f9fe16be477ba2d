"""The run's figures: titles that name what is plotted, and a cluster grid that fills its canvas."""
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from timm_supertoken.clustering.plots import plot_cluster_grid, plot_nmi_curve


def test_nmi_curve_title_names_every_plotted_metric_and_all_baselines_are_drawn(tmp_path, monkeypatch):
    saved = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, 'savefig', lambda fig, *a, **kw: (saved.append(fig), savefig(fig, *a, **kw))[1])
    history = [{'round': r, 'nmi': 0.5 + r / 10, 'ari': 0.4 + r / 10, 'acc': 0.6 + r / 10} for r in range(3)]
    baselines = {name: {'nmi': v} for name, v in (('kmeans_pixels', 0.5), ('kmeans_untrained_embedding', 0.3),
                                                  ('kmeans_contrastive_embedding', 0.6),
                                                  ('umap_contrastive_embedding_and_pixels', 0.65))}
    plot_nmi_curve(history, baselines, tmp_path / 'nmi_per_round.png')
    ax = saved[0].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert {'NMI', 'ARI', 'ACC'} <= set(labels)
    for metric in ('NMI', 'ARI', 'ACC'):
        assert metric in ax.get_title(), (metric, ax.get_title())
    assert sum(label.startswith(('NMI kmeans', 'NMI umap')) for label in labels) == 4


def test_cluster_grid_fills_its_canvas(tmp_path):
    k, per_cluster = 10, 12
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 120, (k * per_cluster, 1, 8, 8), dtype=torch.uint8, generator=gen)
    assignments = torch.arange(k).repeat_interleave(per_cluster)
    embeddings = torch.randn(k * per_cluster, 4, generator=gen)
    centroids = torch.stack([embeddings[assignments == c].mean(0) for c in range(k)])
    path = plot_cluster_grid(images, assignments, embeddings, centroids, assignments.numpy(), tmp_path / 'c.png')
    gray = np.asarray(Image.open(path).convert('L'))
    ink = gray < 250
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    bbox_share = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / gray.size
    assert bbox_share > 0.9, f'content spans only {bbox_share:.0%} of the figure'
    assert ink.mean() > 0.55, f'image tiles cover only {ink.mean():.0%} of the figure'
