"""k-means in PyTorch: k-means++ seeding, several restarts, chunked distances.

Runs wherever its input lives (CPU or GPU), so the deep-clustering loop clusters embeddings without
leaving the device. Distances are computed in row chunks, so 70k × 384 needs only a chunk × k matrix
at a time instead of an n × k one per step plus temporaries.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ['KMeansResult', 'kmeans', 'kmeans_predict', 'check_embeddings']

DEFAULT_CHUNK = 16384


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d), float32
    labels: torch.Tensor  # (n,), int64
    inertia: float  # sum of squared distances to the assigned centroid (float64 accumulation)
    n_iter: int


def check_embeddings(x: torch.Tensor, k: int) -> None:
    """Reject input that k-means cannot cluster meaningfully, with a message naming the problem."""
    if x.ndim != 2:
        raise ValueError(f'expected a 2-D (n, d) tensor of points, got shape {tuple(x.shape)}')
    if x.shape[0] == 0:
        raise ValueError('cannot cluster an empty set of points (n = 0)')
    if k < 2:
        raise ValueError(f'k must be at least 2, got k={k}')
    if k > x.shape[0]:
        raise ValueError(f'k={k} clusters requested but there are only {x.shape[0]} points')
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(1).nonzero().flatten()
        raise ValueError(f'{rows.numel()} of {x.shape[0]} points contain NaN or Inf (first at row {rows[0].item()}); '
                         'the model has diverged or the input is corrupt - lower the learning rate or check the data')


def _sq_dist_min(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and squared distance per row, computed chunk by chunk via ‖x‖² − 2x·c + ‖c‖²."""
    c_sq = (c * c).sum(1)
    dists, labels = [], []
    for start in range(0, x.shape[0], chunk):
        d = torch.addmm(c_sq, x[start:start + chunk], c.T, alpha=-2).add_(x_sq[start:start + chunk, None])
        m, i = d.min(1)
        dists.append(m.clamp_(min=0))  # cancellation can go slightly negative
        labels.append(i)
    return torch.cat(dists), torch.cat(labels)


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator, chunk: int) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): sample 2 + log k candidates ∝ D², keep the one lowering potential most."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (1,), generator=gen, device='cpu').item()
    centers[0] = x[first]
    closest, _ = _sq_dist_min(x, x_sq, centers[:1], chunk)
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point already sits on a centre (duplicates): any choice is as good
            cand = torch.randint(n, (trials,), generator=gen, device='cpu').to(x.device)
        else:
            probs = (closest / total).double().cpu()
            cand = torch.multinomial(probs, trials, replacement=True, generator=gen).to(x.device)
        # potential after adding each candidate: sum over points of min(closest, d(point, candidate))
        cand_pts = x[cand]
        best_pot, best_i, best_closest = None, 0, closest
        for t in range(trials):
            d_t, _ = _sq_dist_min(x, x_sq, cand_pts[t:t + 1], chunk)
            new_closest = torch.minimum(closest, d_t)
            pot = new_closest.double().sum().item()
            if best_pot is None or pot < best_pot:
                best_pot, best_i, best_closest = pot, t, new_closest
        centers[c] = cand_pts[best_i]
        closest = best_closest
    return centers


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float,
           chunk: int) -> Tuple[torch.Tensor, torch.Tensor, float, int]:
    """Lloyd iterations until the centre shift is below tol (relative to the data variance, as scikit-learn)."""
    k = centers.shape[0]
    tol_abs = tol * x.var(0).mean().item()
    it = 0
    for it in range(1, max_iter + 1):
        _, labels = _sq_dist_min(x, x_sq, centers, chunk)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        new = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            # an empty cluster takes the points farthest from their centres, so k clusters survive
            d, _ = _sq_dist_min(x, x_sq, centers, chunk)
            far = d.topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = ((new - centers) ** 2).sum().item()
        centers = new
        if shift <= tol_abs:
            break
    d, labels = _sq_dist_min(x, x_sq, centers, chunk)
    return centers, labels, d.double().sum().item(), it


def kmeans(x: torch.Tensor, k: int, n_init: int = 4, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0, chunk_size: int = DEFAULT_CHUNK) -> KMeansResult:
    """Cluster the rows of x into k groups; best of n_init k-means++ restarts by inertia. Deterministic per seed."""
    check_embeddings(x, k)
    if n_init < 1:
        raise ValueError(f'n_init must be at least 1, got {n_init}')
    x = x.detach().float()
    # centring changes no distance but keeps ‖x‖² − 2x·c + ‖c‖² from cancelling catastrophically
    mean = x.mean(0, keepdim=True)
    x = x - mean
    x_sq = (x * x).sum(1)
    gen = torch.Generator().manual_seed(seed)
    best: Optional[KMeansResult] = None
    for _ in range(n_init):
        centers = _kmeans_pp(x, x_sq, k, gen, chunk_size)
        centers, labels, inertia, n_iter = _lloyd(x, x_sq, centers, max_iter, tol, chunk_size)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers + mean, labels, inertia, n_iter)
    return best


def kmeans_predict(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Assign each row of x to its nearest centroid (chunked, so it scales like `kmeans`)."""
    x = x.detach().float()
    _, labels = _sq_dist_min(x, (x * x).sum(1), centroids.to(x), chunk_size)
    return labels
