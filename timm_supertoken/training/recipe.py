"""The paper's training recipe (Table 2 + DeiT augmentation), built from timm's own pieces.

A `Recipe`'s fields carry timm train.py's argument names, so one YAML file drives both train.py
(`--config`) and `timm-supertoken compare --config`. The paper (§4-1) trains every embedding with
Table 2 (AdamW, lr 1e-3, weight decay 0.05, batch 128, mixup 1.0, cutmix 0.8) and "the data
augmentation of DeiT". It deviates from DeiT (Touvron et al. 2021, ViT-S recipe) in:

- mixup α 1.0 and cutmix α 0.8 — DeiT uses 0.8 and 1.0 (the paper swaps them);
- lr 1e-3 at batch 128 — DeiT scales 5e-4 × batch / 512, i.e. 1.25e-4 at 128 (8× lower);
- batch 128 on two GPUs — DeiT uses 1024;
- no mention of warm-up, drop path, repeated augmentation, EMA or label smoothing: we keep DeiT's
  (5 warm-up epochs, drop path 0.1, label smoothing 0.1) but leave out repeated augmentation
  (it needs ≥ 3 processes to mean anything) and EMA (DeiT's released runs do not use it).
"""
import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision import transforms

from timm.data import IMAGENET_DEFAULT_MEAN, Mixup, create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .data import SampleTransform

__all__ = ['Recipe', 'PAPER_RECIPE', 'TRAIN_PY_RUN_KEYS', 'keep_posterize_bits', 'load_recipe', 'recipe_to_yaml',
           'recipe_names', 'recipe_path']

# train.py options a recipe YAML may carry that describe the run (data, model, hardware), not the recipe
TRAIN_PY_RUN_KEYS = frozenset({
    'data_dir', 'dataset', 'train_split', 'val_split', 'num_classes', 'model', 'model_kwargs', 'img_size',
    'input_size', 'mean', 'std', 'amp', 'amp_dtype', 'workers', 'pin_mem', 'seed', 'output', 'experiment',
    'log_interval', 'checkpoint_hist', 'channels_last', 'sync_bn', 'eval_metric', 'pretrained',
})


@dataclass
class Recipe:
    """Optimiser, schedule, augmentation and regularisation of one training run (train.py argument names)."""
    # paper Table 2
    opt: str = 'adamw'
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    mixup: float = 1.0
    cutmix: float = 0.8
    # schedule: cosine with linear warm-up (DeiT)
    sched: str = 'cosine'
    epochs: int = 300
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # DeiT augmentation
    aa: Optional[str] = 'rand-m9-mstd0.5-inc1'
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.3
    train_interpolation: str = 'bicubic'
    reprob: float = 0.25
    remode: str = 'pixel'
    recount: int = 1
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    smoothing: float = 0.1
    drop_path: Optional[float] = 0.1
    crop_pct: Optional[float] = None
    clip_grad: Optional[float] = None
    model_ema: bool = False
    model_ema_decay: float = 0.99996

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        for name in ('lr', 'batch_size', 'epochs'):
            if not getattr(self, name) > 0:
                raise ValueError(f'recipe {name} must be positive, got {getattr(self, name)}')
        for name in ('weight_decay', 'mixup', 'cutmix', 'reprob', 'smoothing', 'warmup_epochs'):
            if getattr(self, name) < 0:
                raise ValueError(f'recipe {name} must be >= 0, got {getattr(self, name)}')

    def replace(self, **changes: Any) -> 'Recipe':
        """A copy with some fields changed (None values are ignored, so CLI options can be passed straight in)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_epochs(self, epochs: int) -> Tuple['Recipe', Optional[str]]:
        """This recipe for `epochs` epochs, and a note when its warm-up had to be scaled (else None).

        A warm-up as long as the run never ends: the learning rate would stay below its peak and never
        decay (`--epochs 3` with the paper's 5 warm-up epochs). Such a warm-up keeps its share of the
        recipe's schedule instead, rounded down to whole epochs as timm's per-epoch scheduler steps.
        """
        if self.warmup_epochs < epochs:
            return self.replace(epochs=epochs), None
        warmup = self.warmup_epochs * epochs // self.epochs
        note = (f'warm-up scaled from {self.warmup_epochs} to {warmup} epoch(s): {epochs} epoch(s) are no longer than '
                f'the recipe\'s warm-up ({self.warmup_epochs} of {self.epochs} epochs), which would never end; '
                f'--warmup-epochs sets it explicitly')
        return self.replace(epochs=epochs, warmup_epochs=warmup), note

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed, which turns the targets into soft labels."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def train_transform(self, img_size: int, mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN) -> SampleTransform:
        """timm's training transform for a prefetching loader: random-resized crop, flip, RandAugment, colour
        jitter, to a uint8 tensor. Normalisation and random erasing (`erasing`) run on the device.

        mean is RandAugment's fill colour for rotated and sheared corners, as in train.py. When it is
        grey (one value on all three channels), the transform also carries the RandAugment of one-channel
        images, which grey datasets then run on their single channel (`SampleTransform`).
        """
        spatial, augment, to_tensor = self._timm_train_stages(img_size, mean)
        grey = _grey_fill(mean)
        grey_augment = self._timm_train_stages(img_size, (grey,))[1] if grey is not None else None
        return SampleTransform(spatial, augment, to_tensor, grey_augment)

    def _timm_train_stages(self, img_size: int, mean: Tuple[float, ...]) -> Tuple[Any, Any, Any]:
        """create_transform's (spatial, augmentation, to-tensor) stages of this recipe, as train.py builds them,
        with posterize kept to what Pillow accepts (`keep_posterize_bits`)."""
        spatial, augment, to_tensor = create_transform(
            img_size, is_training=True, scale=self.scale, hflip=self.hflip, color_jitter=self.color_jitter,
            auto_augment=self.aa or None, interpolation=self.train_interpolation, mean=mean, use_prefetcher=True,
            separate=True)
        return spatial, keep_posterize_bits(augment), to_tensor

    def eval_transform(self, img_size: int) -> SampleTransform:
        """timm's evaluation transform for a prefetching loader: resize by crop_pct, centre crop, to a uint8 tensor."""
        steps = create_transform(img_size, is_training=False, interpolation='bicubic', crop_pct=self.crop_pct,
                                 use_prefetcher=True).transforms
        no_augmentation = transforms.Compose([])
        return SampleTransform(transforms.Compose(steps[:-1]), no_augmentation, steps[-1], no_augmentation)

    @property
    def erasing(self) -> Dict[str, Any]:
        """Random erasing as PrefetchLoader's keyword arguments."""
        return dict(re_prob=self.reprob, re_mode=self.remode, re_count=self.recount)

    def mixup_fn(self, num_classes: int) -> Optional[Mixup]:
        """timm's Mixup/CutMix, which also applies label smoothing to the mixed targets; None without mixing."""
        if not self.mixes:
            return None
        return Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.mixup_prob,
                     switch_prob=self.mixup_switch_prob, mode=self.mixup_mode, label_smoothing=self.smoothing,
                     num_classes=num_classes)

    def train_loss(self) -> nn.Module:
        """The loss train.py picks for this recipe: soft-target CE after mixing, else label-smoothed CE."""
        if self.mixes:
            return SoftTargetCrossEntropy()
        if self.smoothing > 0:
            return LabelSmoothingCrossEntropy(self.smoothing)
        return nn.CrossEntropyLoss()

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """timm's optimiser factory (no weight decay on norms, biases, pos-embed and tokens, as in train.py)."""
        return create_optimizer_v2(model, opt=self.opt, lr=self.lr, weight_decay=self.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
        """timm's scheduler factory, stepped per epoch like train.py."""
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=self.sched, num_epochs=self.epochs, warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr, min_lr=self.min_lr, updates_per_epoch=updates_per_epoch)
        return scheduler


PAPER_RECIPE = Recipe()

# timm's increasing posterize keeps 4 - int(0.4 m) bits of magnitude m: 1 bit from 7.5 up to 10, none at 10
_POSTERIZE_ONE_BIT_MAGNITUDE = 9


def _one_bit_at_least(op: AugmentOp) -> AugmentOp:
    """An increasing-posterize op with its magnitude capped where it still keeps one bit; other ops as they are."""
    if op.name != 'PosterizeIncreasing':
        return op
    cap = min(op.magnitude_max or _POSTERIZE_ONE_BIT_MAGNITUDE, _POSTERIZE_ONE_BIT_MAGNITUDE)
    return AugmentOp(op.name, prob=op.prob, magnitude=op.magnitude, hparams={**op.hparams, 'magnitude_max': cap})


def keep_posterize_bits(augment: transforms.Compose) -> transforms.Compose:
    """timm's augmentation stage with every increasing posterize of its RandAugment, AugMix or AutoAugment
    policy keeping at least one bit.

    At magnitude 10, which DeiT's 'rand-m9-mstd0.5-inc1' reaches whenever its magnitude noise draws 10 or
    more, timm posterizes to zero bits: a black image, which Pillow 13 refuses with a ValueError. Capping
    that op's magnitude, as the policy string's 'mmax' caps every op's, makes it one bit there and changes
    nothing below 10.
    """
    for t in augment.transforms:
        if isinstance(t, (RandAugment, AugMixAugment)):
            t.ops = [_one_bit_at_least(op) for op in t.ops]
        elif isinstance(t, AutoAugment):
            t.policy = [[_one_bit_at_least(op) for op in sub_policy] for sub_policy in t.policy]
    return augment


def _grey_fill(mean: Sequence[float]) -> Optional[float]:
    """The mean's one value when timm's fill colour from it (255 × mean, rounded per channel) is grey; else None."""
    fill = {min(255, round(255 * m)) for m in mean}
    return mean[0] if len(fill) == 1 else None


def load_recipe(path: Union[str, Path], base: Recipe = PAPER_RECIPE) -> Tuple[Recipe, Dict[str, Any]]:
    """Read a train.py `--config` YAML: (recipe with its fields applied to base, the run keys such as model and data).

    Keys that are neither recipe fields nor known train.py run options are an error, so a typo
    cannot silently fall back to a default.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'recipe file not found: {path}')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{path}: not valid YAML ({e})') from e
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected a mapping of train.py options, got {type(data).__name__}')
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - fields - TRAIN_PY_RUN_KEYS)
    if unknown:
        raise ValueError(f'{path}: unknown option(s) {unknown}; recipe fields are {sorted(fields)}, '
                         f'run options {sorted(TRAIN_PY_RUN_KEYS)} (names are train.py\'s, with _ for -)')
    recipe = dataclasses.replace(base, **{k: v for k, v in data.items() if k in fields})
    return recipe, {k: v for k, v in data.items() if k in TRAIN_PY_RUN_KEYS}


def recipe_to_yaml(recipe: Recipe, run: Optional[Dict[str, Any]] = None) -> str:
    """A recipe (and run options) as a train.py `--config` YAML, tuples as lists."""
    import yaml

    data: Dict[str, Any] = dict(run or {})
    data.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(recipe).items()})
    return yaml.safe_dump(data, sort_keys=False)


def recipe_names() -> List[str]:
    """The recipes shipped in timm_supertoken/recipes, without the .yaml suffix."""
    return sorted(p.name[:-5] for p in resources.files('timm_supertoken.recipes').iterdir() if p.name.endswith('.yaml'))


def recipe_path(name: str) -> Path:
    """A shipped recipe's file, by name ('quick_digits') or as a path to any YAML file."""
    if name.endswith(('.yaml', '.yml')) or os.sep in name:
        return Path(name)
    if name not in recipe_names():
        raise ValueError(f'no shipped recipe {name!r}; shipped: {", ".join(recipe_names())} (or pass a .yaml path)')
    return Path(str(resources.files('timm_supertoken.recipes') / f'{name}.yaml'))
