"""Figures of a deep-clustering run: NMI per round (paper Fig. 4) and images per cluster (Fig. 5)."""
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..runtime import headless_pyplot

__all__ = ['plot_nmi_curve', 'plot_cluster_grid']

# clusters.png layout in inches: a square tile per image, a line of title text above each row
TILE_IN = 0.7
ROW_TITLE_IN = 0.2
SUPTITLE_IN = 0.3


def plot_nmi_curve(history: List[Dict[str, Any]], baselines: Dict[str, Dict[str, float]], path: Path) -> Path:
    """NMI, ARI and ACC per round, with the NMI of each baseline (k-means, UMAP readout) as a horizontal line."""
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100, layout='constrained')
    rounds = [h['round'] for h in history]
    for key, style in (('nmi', 'o-'), ('ari', 's--'), ('acc', '^:')):
        if history and key in history[0]:
            ax.plot(rounds, [h[key] for h in history], style, label=key.upper())
    for (name, m), color in zip(baselines.items(), ('tab:gray', 'tab:brown', 'tab:purple', 'tab:olive')):
        if 'nmi' in m:
            ax.axhline(m['nmi'], color=color, ls='-.', lw=1, label=f'NMI {name.replace("_", " ")}')
    ax.set_xlabel('round (0: initial training, L_ViT only)')
    ax.set_ylabel('score')
    ax.set_xticks(rounds)
    ax.set_title('ViT deep clustering: NMI, ARI and ACC per round (paper Fig. 4)')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_cluster_grid(images: torch.Tensor, assignments: torch.Tensor, embeddings: torch.Tensor,
                      centroids: torch.Tensor, labels: Optional[np.ndarray], path: Path, per_cluster: int = 12) -> Path:
    """One row per cluster: its members nearest the centroid, titled with size and majority class (Fig. 5)."""
    plt = headless_pyplot()
    k = centroids.shape[0]
    dist = (embeddings.float() - centroids.float()[assignments]).pow(2).sum(1)
    # sized to the tiles themselves: a fixed figure size leaves most of it blank once imshow keeps tiles square
    height = SUPTITLE_IN + k * (TILE_IN + ROW_TITLE_IN)
    fig, axes = plt.subplots(k, per_cluster, figsize=(per_cluster * TILE_IN, height), dpi=100, squeeze=False,
                             gridspec_kw=dict(left=0.005, right=0.995, bottom=0.005, top=1 - SUPTITLE_IN / height,
                                              wspace=0.04, hspace=ROW_TITLE_IN / TILE_IN))
    for c in range(k):
        members = (assignments == c).nonzero().flatten()
        order = members[dist[members].argsort()][:per_cluster]
        title = f'cluster {c} (n={members.numel()})'
        if labels is not None and members.numel():
            counts = np.bincount(labels[members.numpy()])
            title += f', majority class {counts.argmax()} ({counts.max() / members.numel():.0%})'
        axes[c, 0].set_title(title, fontsize=7, loc='left')
        for j in range(per_cluster):
            ax = axes[c, j]
            ax.set_axis_off()
            if j < order.numel():
                img = images[order[j]].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray', interpolation='nearest')
    fig.suptitle('members nearest each centroid (paper Fig. 5)', fontsize=9, y=1 - 0.05 / height, va='top')
    fig.savefig(path)
    plt.close(fig)
    return path
