"""UMAP (McInnes, Healy & Melville 2018) in PyTorch: the readout that turns features into round 0's clusters.

Why: k-means on a contrastive embedding keeps its global cluster geometry but ignores how images sit
among their neighbours, and on Fashion-MNIST the pixels have the more label-faithful neighbourhoods
(docs/benchmarks.md). UMAP keeps exactly that: a fuzzy
k-NN graph laid out in a few dimensions, where k-means then finds the dense groups (N2D, McConville et
al. 2020, clusters an autoencoder's features the same way). The steps follow the reference
implementation (umap-learn); the layout's SGD updates every sampled edge at once instead of one after
the other, so an epoch is a few tensor operations per block of edges on the CPU or the GPU. The neighbour
search is exact, O(n²·d) in row chunks, for the tens of thousands of images a clustering run usually
holds, and an inverted file (IVF) above, O(n^1.5·d) with a small constant; every stage after it is linear
in the number of edges and works in blocks of fixed size, so no n × n matrix is ever formed.
"""
import math
import warnings
from typing import Optional, Tuple

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

__all__ = ['knn_cosine', 'knn_ivf', 'nearest_neighbors', 'fuzzy_graph', 'spectral_layout', 'pca_layout',
           'optimize_layout', 'umap_layout', 'joint_features']

# the curve 1 / (1 + a·d^(2b)) that umap-learn fits to its min_dist = 0, spread = 1 (find_ab_params): the
# tightest clumps, which is what a clustering readout wants (N2D's choice)
CURVE_A, CURVE_B = 1.929, 0.7915
GRAD_CLIP = 4.0  # umap-learn's clip of each edge's gradient
REPULSION_EPS = 1e-3  # umap-learn's guard against dividing by a zero distance in the repulsive term
SIGMA_SEARCH_STEPS = 64
MIN_SIGMA_SCALE = 1e-3  # σ_i ≥ this × the mean neighbour distance (umap-learn's MIN_K_DIST_SCALE)
KNN_METHODS = ('auto', 'exact', 'approximate')
EXACT_KNN_MAX_N = 100_000  # 'auto' searches exactly up to this many points, approximately above
SPECTRAL_MAX_N = 100_000  # 'auto' starts the layout at the eigenmap up to this many points, at the PCA above
STARTS = ('auto', 'spectral', 'pca')
# the IVF's defaults, chosen by recall@30 against the exact search on Fashion-MNIST (docs/benchmarks.md)
IVF_CELLS_PER_SQRT_N = 2
IVF_NPROBE = 16
IVF_TRAIN_PER_CELL = 64  # the coarse quantiser learns from this many sampled rows a cell
IVF_TRAIN_ITERS = 10
EDGE_BLOCK = 1 << 20  # sampled edges per SGD block (each with its negatives)
SIMILARITY_BLOCK = 1 << 22  # entries of one query × member similarity block of the IVF search


def _check_neighbors(x: torch.Tensor, k: int) -> None:
    if x.ndim != 2:
        raise ValueError(f'expected a 2-D (n, d) tensor of points, got shape {tuple(x.shape)}')
    if not 1 <= k < x.shape[0]:
        raise ValueError(f'need 1 <= n_neighbors < number of points, got n_neighbors={k} for {x.shape[0]} points')


def _exact_rows(xn: torch.Tensor, rows: torch.Tensor, k: int, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities of the unit rows xn[rows] against every row of xn, the row itself excluded."""
    sims, idx = [], []
    for start in range(0, rows.numel(), chunk):
        query = rows[start:start + chunk]
        sim = xn[query] @ xn.T
        sim[torch.arange(query.numel(), device=sim.device), query] = float('-inf')  # not its own neighbour
        s, i = sim.topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def knn_cosine(x: torch.Tensor, k: int, chunk: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest other rows by cosine distance: (indices (n, k), distances (n, k), ascending).

    Exact: every row against every row, chunk rows at a time, so O(n²·d) time and O(chunk·n) memory.
    """
    _check_neighbors(x, k)
    xn = F.normalize(x.float(), dim=1)
    sim, idx = _exact_rows(xn, torch.arange(xn.shape[0], device=xn.device), k, chunk)
    return idx, (1 - sim).clamp_(min=0)


def _spherical_kmeans(xn: torch.Tensor, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Unit centroids of `cells` cells, Lloyd on a sample of the unit rows xn (IVF_TRAIN_PER_CELL a cell)."""
    sample = torch.randperm(xn.shape[0], generator=gen)[:IVF_TRAIN_PER_CELL * cells].to(xn.device)
    train = xn[sample]
    centroids = train[:cells].clone()  # the sample is a random permutation: its first rows a random start
    for _ in range(IVF_TRAIN_ITERS):
        labels = _nearest_cells(train, centroids, 1).squeeze(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, train)
        filled = torch.bincount(labels, minlength=cells) > 0
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=1), centroids)  # an empty cell stays put
    return centroids


def _nearest_cells(xn: torch.Tensor, centroids: torch.Tensor, nprobe: int, chunk: int = 16384) -> torch.Tensor:
    """The nprobe most similar centroids of every unit row, nearest first (n, nprobe)."""
    return torch.cat([(xn[start:start + chunk] @ centroids.T).topk(nprobe, dim=1).indices
                      for start in range(0, xn.shape[0], chunk)])


@torch.no_grad()
def knn_ivf(x: torch.Tensor, k: int, nprobe: int = IVF_NPROBE, cells: Optional[int] = None, seed: int = 0,
            block: int = SIMILARITY_BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Approximate `knn_cosine` with an inverted file (IVF, as faiss's IndexIVFFlat), same outputs.

    A spherical k-means splits the unit rows into cells (IVF_CELLS_PER_SQRT_N·√n by default). Each row
    is a member of its nearest cell and searches its nprobe nearest cells exactly, so near neighbours
    are missed only when they sit past the nprobe-th cell boundary. The search runs cell by cell: the
    rows probing a cell against the cell's members, in blocks of at most `block` similarities, each
    block ranked together with its rows' running top k (one topk a block). With c cells a row compares
    itself with about nprobe·n/c members: O(n·nprobe·n/c·d) in all, O(n^1.5·d) for c ∝ √n, and memory
    O(n·(k + nprobe) + block). The rare row whose probed cells hold fewer than k others is searched
    exactly. Deterministic per seed.
    """
    _check_neighbors(x, k)
    if nprobe < 1:
        raise ValueError(f'nprobe must be at least 1, got {nprobe}')
    n = x.shape[0]
    cells = cells or max(1, round(IVF_CELLS_PER_SQRT_N * math.sqrt(n)))
    if not 1 <= cells <= n:
        raise ValueError(f'need 1 <= cells <= number of points, got cells={cells} for {n} points')
    nprobe = min(nprobe, cells)
    xn = F.normalize(x.float(), dim=1)
    probes = _nearest_cells(xn, _spherical_kmeans(xn, cells, torch.Generator().manual_seed(seed)), nprobe)
    # members of each cell, and the rows that probe it, as contiguous runs of two sorts
    home = probes[:, 0]
    members = torch.argsort(home, stable=True)
    member_start = torch.searchsorted(home[members], torch.arange(cells + 1, device=xn.device))
    rank_in_cell = torch.empty_like(members)
    rank_in_cell[members] = torch.arange(n, device=xn.device) - member_start[home[members]]
    member_start = member_start.tolist()
    flat = probes.reshape(-1)
    probing = torch.argsort(flat, stable=True)
    probe_start = torch.searchsorted(flat[probing], torch.arange(cells + 1, device=xn.device)).tolist()
    probing = probing // nprobe  # position in probes → the row
    best_sim = torch.full((n, k), float('-inf'), device=xn.device)
    best_idx = torch.full((n, k), -1, dtype=torch.long, device=xn.device)
    for cell in range(cells):
        cell_members = members[member_start[cell]:member_start[cell + 1]]
        if cell_members.numel() == 0:
            continue
        points = xn[cell_members]
        rows_per_block = max(1, block // cell_members.numel())
        queries = probing[probe_start[cell]:probe_start[cell + 1]]
        for start in range(0, queries.numel(), rows_per_block):
            query = queries[start:start + rows_per_block]
            sim = xn[query] @ points.T
            own = (home[query] == cell).nonzero().squeeze(1)
            sim[own, rank_in_cell[query[own]]] = float('-inf')  # a row is a member of its home cell
            top_sim, pick = torch.cat([best_sim[query], sim], 1).topk(k, dim=1)
            best_sim[query] = top_sim
            best_idx[query] = torch.cat([best_idx[query], cell_members.expand(query.numel(), -1)], 1).gather(1, pick)
    short = torch.isinf(best_sim[:, -1]).nonzero().squeeze(1)
    if short.numel():
        best_sim[short], best_idx[short] = _exact_rows(xn, short, k, 4096)
    return best_idx, (1 - best_sim).clamp_(min=0)


def nearest_neighbors(x: torch.Tensor, k: int, method: str = 'auto', exact_max_n: int = EXACT_KNN_MAX_N,
                      seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The readout's k-NN search: 'exact' (`knn_cosine`), 'approximate' (`knn_ivf`), or 'auto'.

    'auto' is exact up to exact_max_n points, where the quadratic search is still affordable and the graph
    stays the reference's, and the IVF above, where the quadratic cost would dominate the readout.
    Both return (indices (n, k), cosine distances (n, k)), ascending, without the point itself.
    """
    if method not in KNN_METHODS:
        raise ValueError(f'knn must be one of {", ".join(KNN_METHODS)}, got {method!r}')
    if method == 'exact' or (method == 'auto' and x.shape[0] <= exact_max_n):
        return knn_cosine(x, k)
    return knn_ivf(x, k, seed=seed)


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
    """The k-NN graph's symmetric fuzzy simplicial set A + Aᵀ − A∘Aᵀ (fuzzy union), a coalesced sparse (n, n).

    Each edge i → j is keyed i·n + j, and its mirror j·n + i; one sort of both lists brings the two
    directions of an edge side by side, where they combine. That is the memory of 2·n·k keys and values,
    instead of the several coalesced copies that sparse A + Aᵀ − A∘Aᵀ goes through.
    """
    n, k = idx.shape
    if n and bool((idx == torch.arange(n, device=idx.device)[:, None]).any()):
        raise ValueError('a point is listed as its own neighbour; the k-NN graph has no self-loops')
    rows = torch.arange(n, device=idx.device).repeat_interleave(k)
    cols = idx.reshape(-1).long()
    weights = _membership(dist).reshape(-1)
    keys, order = torch.cat([rows * n + cols, cols * n + rows]).sort()
    del rows, cols
    values = torch.cat([weights, weights])[order]
    del order
    # a key at most twice (i → j and j → i); both halves of a pair go into its first, the second is dropped
    pair = keys[1:] == keys[:-1]
    first, second = values[:-1][pair], values[1:][pair]
    values[:-1][pair] = first + second - first * second
    keep = torch.ones_like(keys, dtype=torch.bool)
    keep[1:] = ~pair
    keys, values = keys[keep], values[keep]
    return torch.sparse_coo_tensor(torch.stack([keys // n, keys % n]), values, (n, n), is_coalesced=True,
                                   check_invariants=False)


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
    return _scaled(layout, rng)


def _scaled(layout: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """A start with its exact ties split by a little noise and each axis scaled to [0, 10], as umap-learn's."""
    layout = layout + rng.normal(scale=1e-4 * np.abs(layout).max(), size=layout.shape)
    span = layout.max(0) - layout.min(0)
    return torch.from_numpy(10 * (layout - layout.min(0)) / np.where(span > 0, span, 1)).float()


@torch.no_grad()
def pca_layout(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """The points' first dim principal coordinates, each axis scaled to [0, 10]: the start of large layouts.

    Why: ARPACK's eigenmap costs about n^1.65 (its iterations grow with the graph), the PCA one pass over
    the points (a seeded randomised SVD), so above SPECTRAL_MAX_N points the start stops dominating the readout.
    umap-learn offers the same start as init='pca'.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # pca_lowrank draws its sketch from the global generator
    try:
        # a sketch of 10 more directions than kept, as randomised SVDs oversample, makes the kept ones accurate
        _, _, basis = torch.pca_lowrank(x.float(), q=min(dim + 10, *x.shape), center=True, niter=4)
    finally:
        torch.random.set_rng_state(generator_state)
    layout = ((x.float() - x.float().mean(0)) @ basis[:, :dim]).cpu().double().numpy()
    return _scaled(layout, np.random.default_rng(seed))


@torch.no_grad()
def optimize_layout(graph: torch.Tensor, layout: torch.Tensor, epochs: int = 200, negatives: int = 5,
                    seed: int = 0, edge_block: int = EDGE_BLOCK) -> torch.Tensor:
    """UMAP's cross-entropy SGD: pull sampled edges together, push 'negatives' random points away; lr 1 → 0.

    Edge e is sampled in an epoch with probability w_e / max w (umap-learn samples it every max w / w_e
    epochs), after dropping edges below max w / epochs as umap-learn does. Gradients are its closed
    forms for the curve 1 / (1 + a·d^(2b)), each clipped to ±4; an edge moves both ends, a negative only
    its head. An epoch's sampled edges are applied edge_block at a time, each block's step from the
    positions the previous one left, so the memory stays bounded however many edges the graph has; the
    edge list is kept as int32 where n allows. Runs on layout's device with a generator seeded there.
    """
    y = layout.clone()
    index_dtype = torch.int32 if y.shape[0] < 2 ** 31 else torch.long
    heads, tails = graph.indices().to(device=y.device, dtype=index_dtype)
    weights = graph.values().to(y.device)
    top = weights.max()
    keep = weights >= top / epochs
    heads, tails, prob = heads[keep], tails[keep], weights[keep] / top
    del keep, weights
    gen = torch.Generator(device=y.device).manual_seed(seed)
    for epoch in range(epochs):
        lr = 1 - epoch / epochs
        active = (torch.rand(prob.shape, generator=gen, device=y.device) < prob).nonzero().squeeze(1)
        for start in range(0, active.numel(), edge_block):
            block = active[start:start + edge_block]
            _sgd_step(y, heads[block], tails[block], negatives, lr, gen)
    return y


def _sgd_step(y: torch.Tensor, h: torch.Tensor, t: torch.Tensor, negatives: int, lr: float,
              gen: torch.Generator) -> None:
    """One block of edges (h, t) and `negatives` random pushes per edge, applied to y in place at rate lr.

    A negative moves only its edge's head, so each head's pull and pushes are summed before the one
    scatter into it: two index_add_ calls per block, not one per sample.
    """
    a, b = CURVE_A, CURVE_B
    h, t = h.long(), t.long()  # index_add_ is much slower with int32 indices on the CPU
    y_h = y.index_select(0, h)
    diff = y_h - y.index_select(0, t)
    d2 = diff.pow(2).sum(1, keepdim=True)
    # ∂/∂y of −log(1 / (1 + a·d^(2b))); zero at d = 0, where d^(2b−2) is infinite
    d2_b1 = d2.pow(b - 1)
    pull = torch.where(d2 > 0, -2 * a * b * d2_b1 / (1 + a * d2_b1 * d2), torch.zeros_like(d2))
    grad = (pull * diff).clamp_(-GRAD_CLIP, GRAD_CLIP)
    other = torch.randint(y.shape[0], (h.numel(), negatives), generator=gen, device=y.device)
    # y_negative − y_head, computed in the gathered buffer: the push on the head is along its negation
    away = y.index_select(0, other.reshape(-1)).view(h.numel(), negatives, -1).sub_(y_h.unsqueeze(1))
    d2 = away.pow(2).sum(2, keepdim=True)
    # ∂/∂y of −log(1 − 1 / (1 + a·d^(2b))); a point on top of its negative gets the clip's full push, a point
    # drawn as its own negative none
    itself = (other == h.unsqueeze(1)).unsqueeze(2)
    push = (2 * b / ((REPULSION_EPS + d2) * (1 + a * d2.pow(b)))).masked_fill_(itself, 0)
    push_grad = away.mul_(push).clamp_(-GRAD_CLIP, GRAD_CLIP).masked_fill_((d2 == 0) & ~itself, -GRAD_CLIP)
    step = torch.zeros_like(y)
    step.index_add_(0, h, grad - push_grad.sum(1)).index_add_(0, t, grad.neg_())
    y.add_(step, alpha=lr)


def umap_layout(x: torch.Tensor, dim: int = 10, n_neighbors: int = 30, epochs: int = 200, seed: int = 0,
                knn: str = 'auto', exact_max_n: int = EXACT_KNN_MAX_N, start: str = 'auto',
                spectral_max_n: int = SPECTRAL_MAX_N) -> torch.Tensor:
    """UMAP of the rows of x (cosine metric) into dim dimensions, computed on x's device; deterministic per seed.

    knn picks the neighbour search (`nearest_neighbors`): exact up to exact_max_n points under 'auto'.
    start picks where the SGD starts: the graph's eigenmap (`spectral_layout`) or the points' PCA
    (`pca_layout`); 'auto' takes the eigenmap up to spectral_max_n points.
    """
    if start not in STARTS:
        raise ValueError(f'start must be one of {", ".join(STARTS)}, got {start!r}')
    if x.ndim != 2:
        raise ValueError(f'expected a 2-D (n, d) tensor of points, got shape {tuple(x.shape)}')
    if not torch.isfinite(x).all():
        raise ValueError('the points to lay out contain NaN or Inf')
    if not 1 <= dim < x.shape[0] - 1:
        raise ValueError(f'need 1 <= dim < n - 1 for a spectral start, got dim={dim} for {x.shape[0]} points')
    idx, dist = nearest_neighbors(x, min(n_neighbors, x.shape[0] - 1), knn, exact_max_n, seed)
    graph = fuzzy_graph(idx, dist)
    if start == 'pca' or (start == 'auto' and x.shape[0] > spectral_max_n):
        initial = pca_layout(x, dim, seed)
    else:
        initial = spectral_layout(graph, dim, seed)
    return optimize_layout(graph, initial.to(x.device), epochs=epochs, seed=seed)


def joint_features(*blocks: torch.Tensor) -> torch.Tensor:
    """Feature blocks side by side, each centred and L2-normalised per row, so each weighs the same in cosines.

    The readout's input is [pixels, embedding]: side by side, their nearest neighbours agree with the labels
    more often than either block's alone.
    """
    blocks = [block.float() for block in blocks]
    return torch.cat([F.normalize(block - block.mean(0), dim=1) for block in blocks], 1)
