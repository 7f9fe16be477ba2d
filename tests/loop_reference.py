"""A slow, obviously-correct loop implementation of super-token clustering (docs/design.md §2), for tests only."""
import math

import torch


def super_token_clustering_loop(x: torch.Tensor, grid: int, iters: int) -> torch.Tensor:
    """Pixel-by-pixel, cell-by-cell transcription of the spec, in float64, with the same gradient rule."""
    B, C, H, W = x.shape
    h, w = math.ceil(H / grid), math.ceil(W / grid)
    xd = x.detach().double()
    cell = lambda i, j: [(y, z) for y in range(i * grid, min((i + 1) * grid, H)) for z in range(j * grid, min((j + 1) * grid, W))]
    neighbours = lambda i, j: [(i + a, j + b) for a in (-1, 0, 1) for b in (-1, 0, 1) if 0 <= i + a < h and 0 <= j + b < w]
    out = []
    for n in range(B):
        s = torch.zeros(h, w, C, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                s[i, j] = torch.stack([xd[n, :, y, z] for y, z in cell(i, j)]).mean(0)
        for step in range(iters):
            num = torch.zeros(h, w, C, dtype=torch.float64)
            den = torch.zeros(h, w, dtype=torch.float64)
            weights = {}
            for i in range(h):
                for j in range(w):
                    nbrs = neighbours(i, j)
                    for y, z in cell(i, j):
                        logits = torch.stack([xd[n, :, y, z] @ s[a, b] for a, b in nbrs]) / math.sqrt(C)
                        a_p = torch.softmax(logits, 0)
                        for (a, b), weight in zip(nbrs, a_p):
                            num[a, b] += weight * xd[n, :, y, z]
                            den[a, b] += weight
                            weights[(y, z, a, b)] = weight
            s = num / den[..., None]
        # last aggregation again, differentiable in x, with the affinities and denominators held constant
        final = [[0 for _ in range(w)] for _ in range(h)]
        for (y, z, a, b), weight in weights.items():
            final[a][b] = final[a][b] + weight / den[a, b] * x[n, :, y, z].double()
        out.append(torch.stack([torch.stack(row) for row in final]).permute(2, 0, 1))
    return torch.stack(out).to(x.dtype)
