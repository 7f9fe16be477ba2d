from .supertoken_vit import checkpoint_filter_fn, default_cfgs

REGISTERED_MODEL_NAMES = tuple(default_cfgs)  # every size: what export, push and load accept
# the paper's three ViT-S models: what compare, info and the benchmarks run by default
MODEL_NAMES = tuple(name for name in REGISTERED_MODEL_NAMES if name.startswith('vit_small_'))
