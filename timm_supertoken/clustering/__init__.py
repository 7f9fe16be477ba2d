"""ViT deep clustering (paper 003) for any timm model: library API, k-means, metrics, data, figures, CLI."""
from .data import ImageSet, load_dataset, load_digits_set, load_fashion_mnist, load_image_folder, read_idx
from .deep_clustering import ClusterConfig, create_cluster_model, embed, run_deep_clustering, train_round
from .kmeans import KMeansResult, kmeans, kmeans_predict
from .metrics import ari, cluster_acc, cluster_metrics, match_clusters, nmi
