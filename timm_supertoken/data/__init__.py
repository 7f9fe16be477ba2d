"""Real datasets: Fashion-MNIST (idx), scikit-learn digits, ImageFolder trees; ImageFolder export; ImageNet-100."""
from .image_sets import (
    DATASETS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    ImageSet,
    load_dataset,
    load_digits_set,
    load_digits_splits,
    load_fashion_mnist,
    load_image_folder,
    load_splits,
    read_idx,
    stratified_split,
)
from .image_folder import FASHION_MNIST_CLASSES, export_image_folder, per_class_subset
from .imagenet100 import CMC_IMAGENET100, build_imagenet100
