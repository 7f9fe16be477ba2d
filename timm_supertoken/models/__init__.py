from .supertoken_vit import checkpoint_filter_fn, default_cfgs
