"""ViT deep clustering ("Deep Clustering Based on Vision Transformer (ViT) for Images") for any timm model.

Library API, k-means, the UMAP readout and its bounded pixel features, metrics, figures, CLI.
"""
from .deep_clustering import ClusterConfig, create_cluster_model, embed, run_deep_clustering, train_round
from .features import pixel_features
from .kmeans import KMeansResult, kmeans, kmeans_predict
from .manifold import joint_features, umap_layout
from .metrics import ari, cluster_acc, cluster_metrics, match_clusters, nmi
