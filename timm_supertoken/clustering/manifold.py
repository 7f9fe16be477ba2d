"""UMAP (McInnes, Healy & Melville 2018) in PyTorch: the readout that turns features into round 0's clusters.

Why: k-means on a contrastive embedding keeps its global cluster geometry but ignores how images sit
among their neighbours, and on Fashion-MNIST the pixels have the more label-faithful neighbourhoods
(docs/benchmarks.md). UMAP keeps exactly that: a fuzzy
k-NN graph laid out in a few dimensions, where k-means then finds the dense groups (N2D, McConville et
al. 2020, clusters an autoencoder's features the same way). The steps follow the reference
implementation (umap-learn); the layout's SGD updates every sampled edge at once instead of one after
the other, so an epoch is a handful of tensor operations on the CPU or the GPU. The neighbour search is
exact, O(n²·d) in row chunks: made for the tens of thousands of images a clustering run holds, not millions.
"""
import math
import warnings
from typing import Tuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

__all__ = ['knn_cosine', 'fuzzy_graph', 'spectral_layout', 'optimize_layout', 'umap_layout', 'joint_features']

# the curve 1 / (1 + a·d^(2b)) that umap-learn fits to its min_dist = 0, spread = 1 (find_ab_params): the
# tightest clumps, which is what a clustering readout wants (N2D's choice)
CURVE_A, CURVE_B = 1.929, 0.7915
GRAD_CLIP = 4.0  # umap-learn's clip of each edge's gradient
REPULSION_EPS = 1e-3  # umap-learn's guard against dividing by a zero distance in the repulsive term
SIGMA_SEARCH_STEPS = 64
MIN_SIGMA_SCALE = 1e-3  # σ_i ≥ this × the mean neighbour distance (umap-learn's MIN_K_DIST_SCALE)


@torch.no_grad()
def knn_cosine(x: torch.Tensor, k: int, chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest other rows by cosine distance: (indices (n, k), distances (n, k), ascending)."""
    if not 1 <= k < x.shape[0]:
        raise ValueError(f'need 1 <= n_neighbors < number of points, got n_neighbors={k} for {x.shape[0]} points')
    xn = F.normalize(x.float(), dim=1)
    idx, dist = [], []
    for start in range(0, xn.shape[0], chunk):
        sim = xn[start:start + chunk] @ xn.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + start] = float('-inf')  # a point is not its own neighbour
        s, i = sim.topk(k, dim=1)
        idx.append(i)
        dist.append((1 - s).clamp_(min=0))
    return torch.cat(idx), torch.cat(dist)


@torch.no_grad()
def _membership(dist: torch.Tensor) -> torch.Tensor:
    """exp(−(d_ij − ρ_i)/σ_i) per neighbour: ρ_i the nearest non-zero distance, σ_i so that Σ_j = log2 k."""
    positive = torch.where(dist > 0, dist, torch.full_like(dist, float('inf')))
    rho = positive.min(1, keepdim=True).values
    rho = torch.where(torch.isinf(rho), torch.zeros_like(rho), rho)  # all neighbours are duplicates
    excess = (dist - rho).clamp_(min=0)
    target = math.log2(dist.shape[1])
    lo = torch.zeros_like(rho)
    hi = torch.full_like(rho, float('inf'))
    sigma = torch.ones_like(rho)
    for _ in range(SIGMA_SEARCH_STEPS):  # bisection on every row at once
        too_wide = torch.exp(-excess / sigma).sum(1, keepdim=True) > target
        hi = torch.where(too_wide, sigma, hi)
        lo = torch.where(too_wide, lo, sigma)
        sigma = torch.where(torch.isinf(hi), sigma * 2, (lo + hi) / 2)
    sigma = torch.maximum(sigma, MIN_SIGMA_SCALE * dist.mean(1, keepdim=True).clamp(min=1e-12))
    return torch.exp(-excess / sigma)


@torch.no_grad()
def fuzzy_graph(idx: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """The k-NN graph's symmetric fuzzy simplicial set A + Aᵀ − A∘Aᵀ (fuzzy union), as a coalesced sparse (n, n)."""
    n, k = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(k)
    a = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), _membership(dist).reshape(-1), (n, n),
                                check_invariants=True)
    a = a.coalesce()
    at = a.t().coalesce()
    return (a + at - a * at).coalesce()


def _drop_trivial_direction(vectors: np.ndarray, trivial: np.ndarray) -> np.ndarray:
    """The leading eigenvectors (by eigenvalue, descending) with the trivial direction D^½·1 taken out.

    On a connected graph that direction is the first eigenvector, and this returns the rest as they are.
    A graph of c components has eigenvalue 1 c times, and the solver returns any basis of that space: its
    vectors mix the trivial direction with the ones that tell the components apart, so none may be dropped
    whole. Removing the direction from every vector and re-orthonormalising in eigenvalue order keeps them.
    """
    trivial = trivial / np.linalg.norm(trivial)
    rest = vectors - np.outer(trivial, trivial @ vectors)
    q, r = np.linalg.qr(rest)
    q = q * np.sign(np.where(np.diag(r) == 0, 1, np.diag(r)))  # QR's signs: keep each vector's own
    keep = np.sort(np.argsort(np.abs(np.diag(r)))[1:])  # the column the removal emptied goes
    return q[:, keep]


def spectral_layout(graph: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """The graph's Laplacian eigenmap in dim dimensions (umap-learn's start), each axis scaled to [0, 10].

    The leading eigenvectors of D^−½ W D^−½ are the Laplacian's smallest; the first is the trivial one.
    Falls back to a uniform random start with a warning when ARPACK does not converge.
    """
    n = graph.shape[0]
    ij = graph.indices().cpu().numpy()
    w = scipy.sparse.csr_matrix((graph.values().cpu().double().numpy(), (ij[0], ij[1])), shape=(n, n))
    deg = np.maximum(np.asarray(w.sum(1)).ravel(), 1e-12)
    inv_sqrt_deg = 1 / np.sqrt(deg)
    norm = scipy.sparse.diags(inv_sqrt_deg) @ w @ scipy.sparse.diags(inv_sqrt_deg)
    rng = np.random.default_rng(seed)
    try:
        values, vectors = scipy.sparse.linalg.eigsh(norm, k=dim + 1, which='LA', tol=1e-4, v0=np.ones(n),
                                                    maxiter=n * 5)
        layout = _drop_trivial_direction(vectors[:, np.argsort(values)[::-1]], np.sqrt(deg))
    except (scipy.sparse.linalg.ArpackNoConvergence, scipy.sparse.linalg.ArpackError):
        warnings.warn('the spectral start of the UMAP layout did not converge; starting from random positions')
        layout = rng.uniform(-10, 10, (n, dim))
    layout = layout + rng.normal(scale=1e-4 * np.abs(layout).max(), size=layout.shape)  # split exact ties
    span = layout.max(0) - layout.min(0)
    return torch.from_numpy(10 * (layout - layout.min(0)) / np.where(span > 0, span, 1)).float()


@torch.no_grad()
def optimize_layout(graph: torch.Tensor, layout: torch.Tensor, epochs: int = 200, negatives: int = 5,
                    seed: int = 0) -> torch.Tensor:
    """UMAP's cross-entropy SGD: pull sampled edges together, push 'negatives' random points away; lr 1 → 0.

    Edge e is sampled in an epoch with probability w_e / max w (umap-learn samples it every max w / w_e
    epochs), after dropping edges below max w / epochs as umap-learn does. Gradients are its closed
    forms for the curve 1 / (1 + a·d^(2b)), each clipped to ±4; an edge moves both ends, a negative only
    its head. Runs on layout's device with a generator seeded there.
    """
    y = layout.clone()
    heads, tails = graph.indices().to(y.device)
    weights = graph.values().to(y.device)
    top = weights.max()
    keep = weights >= top / epochs
    heads, tails, prob = heads[keep], tails[keep], weights[keep] / top
    gen = torch.Generator(device=y.device).manual_seed(seed)
    a, b = CURVE_A, CURVE_B
    for epoch in range(epochs):
        lr = 1 - epoch / epochs
        active = torch.rand(prob.shape, generator=gen, device=y.device) < prob
        h, t = heads[active], tails[active]
        diff = y[h] - y[t]
        d2 = diff.pow(2).sum(1, keepdim=True)
        # ∂/∂y of −log(1 / (1 + a·d^(2b))); zero at d = 0, where d^(2b−2) is infinite
        pull = torch.where(d2 > 0, -2 * a * b * d2.pow(b - 1) / (1 + a * d2.pow(b)), torch.zeros_like(d2))
        step = torch.zeros_like(y)
        grad = (pull * diff).clamp_(-GRAD_CLIP, GRAD_CLIP)
        step.index_add_(0, h, grad).index_add_(0, t, -grad)
        h = h.repeat_interleave(negatives)
        other = torch.randint(y.shape[0], h.shape, generator=gen, device=y.device)
        diff = y[h] - y[other]
        d2 = diff.pow(2).sum(1, keepdim=True)
        # ∂/∂y of −log(1 − 1 / (1 + a·d^(2b))); a point on top of its negative gets the clip's full push
        push = 2 * b / ((REPULSION_EPS + d2) * (1 + a * d2.pow(b)))
        grad = torch.where(d2 > 0, (push * diff).clamp_(-GRAD_CLIP, GRAD_CLIP), torch.full_like(diff, GRAD_CLIP))
        grad = grad * (h != other).unsqueeze(1)
        step.index_add_(0, h, grad)
        y.add_(step, alpha=lr)
    return y


def umap_layout(x: torch.Tensor, dim: int = 10, n_neighbors: int = 30, epochs: int = 200,
                seed: int = 0) -> torch.Tensor:
    """UMAP of the rows of x (cosine metric) into dim dimensions, computed on x's device; deterministic per seed."""
    if x.ndim != 2:
        raise ValueError(f'expected a 2-D (n, d) tensor of points, got shape {tuple(x.shape)}')
    if not torch.isfinite(x).all():
        raise ValueError('the points to lay out contain NaN or Inf')
    if not 1 <= dim < x.shape[0] - 1:
        raise ValueError(f'need 1 <= dim < n - 1 for a spectral start, got dim={dim} for {x.shape[0]} points')
    idx, dist = knn_cosine(x, min(n_neighbors, x.shape[0] - 1))
    graph = fuzzy_graph(idx, dist)
    start = spectral_layout(graph, dim, seed).to(x.device)
    return optimize_layout(graph, start, epochs=epochs, seed=seed)


def joint_features(*blocks: torch.Tensor) -> torch.Tensor:
    """Feature blocks side by side, each centred and L2-normalised per row, so each weighs the same in cosines.

    The readout's input is [pixels, embedding]: side by side, their nearest neighbours agree with the labels
    more often than either block's alone.
    """
    blocks = [block.float() for block in blocks]
    return torch.cat([F.normalize(block - block.mean(0), dim=1) for block in blocks], 1)
