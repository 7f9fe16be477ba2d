"""Training: the paper's recipe from timm's pieces, a resumable DDP-capable trainer, and the embedding comparison."""
from .compare import CompareConfig, build_compare_config, parse_model_spec, results_markdown, run_compare
from .recipe import PAPER_RECIPE, Recipe, load_recipe, recipe_to_yaml
from .trainer import TrainConfig, create_training_model, evaluate, fit, train_one_epoch
