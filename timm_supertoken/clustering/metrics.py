"""Clustering metrics against ground truth: NMI (the paper's), ARI, and ACC with Hungarian matching."""
from typing import Dict

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ['nmi', 'ari', 'cluster_acc', 'match_clusters', 'cluster_metrics']


def _as_labels(a) -> np.ndarray:
    """Any 1-D label container (list, numpy, torch) as an int64 numpy array."""
    a = np.asarray(a.cpu() if hasattr(a, 'cpu') else a)
    if a.ndim != 1:
        raise ValueError(f'labels must be 1-D, got shape {a.shape}')
    return a.astype(np.int64)


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default, DEC/N2D's)."""
    return float(normalized_mutual_info_score(_as_labels(labels_true), _as_labels(labels_pred)))


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index: pair-counting agreement, 0 for chance, 1 for identical partitions."""
    return float(adjusted_rand_score(_as_labels(labels_true), _as_labels(labels_pred)))


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts of (a, b) pairs, rows indexed by b's values and columns by a's."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((bi.max() + 1, ai.max() + 1), dtype=np.int64)
    np.add.at(table, (bi, ai), 1)
    return table


def cluster_acc(labels_true, labels_pred) -> float:
    """Accuracy under the best one-to-one map from clusters to classes (Hungarian, as DEC's ACC)."""
    t, p = _as_labels(labels_true), _as_labels(labels_pred)
    if t.shape != p.shape:
        raise ValueError(f'label arrays differ in length: {t.shape[0]} vs {p.shape[0]}')
    table = _contingency(t, p)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.shape[0])


def match_clusters(new, reference, k: int) -> np.ndarray:
    """Permutation perm (len k) with perm[new_id] = reference_id maximising overlap, so cluster ids stay stable."""
    n, r = _as_labels(new), _as_labels(reference)
    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, (n, r), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    perm = np.empty(k, dtype=np.int64)
    perm[rows] = cols
    return perm


def cluster_metrics(labels_true, labels_pred) -> Dict[str, float]:
    """NMI, ARI and ACC in one dict, the row format of the per-round table."""
    return {'nmi': nmi(labels_true, labels_pred), 'ari': ari(labels_true, labels_pred),
            'acc': cluster_acc(labels_true, labels_pred)}
