"""NMI, ARI, Hungarian ACC and cluster-id matching."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from timm_supertoken.clustering import ari, cluster_acc, cluster_metrics, match_clusters, nmi


def test_permuted_labels_score_perfectly():
    y = np.random.default_rng(0).integers(0, 5, 300)
    pred = np.array([3, 0, 4, 1, 2])[y]
    assert cluster_metrics(y, pred) == pytest.approx({'nmi': 1.0, 'ari': 1.0, 'acc': 1.0})


def test_acc_known_example():
    # clusters {0,0,0,1 | 1,1 | 2,2} vs truth: best map 0->0, 1->1, 2->2 gets 3 + 2 + 2 = 7 of 8 right
    y = [0, 0, 0, 1, 1, 1, 2, 2]
    p = [5, 5, 5, 5, 7, 7, 9, 9]
    assert cluster_acc(y, p) == pytest.approx(7 / 8)
    # more clusters than classes: the unmatched cluster counts as wrong
    assert cluster_acc([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)


def test_scores_agree_with_sklearn_on_random_partitions():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 10, 500), rng.integers(0, 7, 500)
    assert nmi(y, p) == pytest.approx(normalized_mutual_info_score(y, p))
    assert ari(torch.from_numpy(y), p) == pytest.approx(adjusted_rand_score(y, p))
    assert 0.0 <= cluster_acc(y, p) < 0.3  # chance level for 10 balanced classes


def test_match_clusters_recovers_permutation():
    ref = np.random.default_rng(2).integers(0, 6, 400)
    perm_true = np.array([2, 5, 0, 1, 4, 3])
    new = np.argsort(perm_true)[ref]  # new id j holds the members of reference id perm_true[j]
    perm = match_clusters(new, ref, 6)
    assert np.array_equal(perm, perm_true)
    assert np.array_equal(perm[new], ref)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match='differ in length'):
        cluster_acc([0, 1, 1], [0, 1])
