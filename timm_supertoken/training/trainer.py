"""Train one timm model on an image set with a `Recipe`: one process or DDP under torchrun, checkpoint every epoch, resume.

The loop is train.py's, cut down to what the paper's experiment needs: timm's transforms with its
prefetching loader (uint8 batches from the workers, normalisation and random erasing on the device),
Mixup, loss, optimiser and scheduler from the recipe, optional EMA (timm's ModelEmaV3), bfloat16
autocast on CUDA, top-1 on the validation split after every epoch. Checkpoints use train.py's keys
(`state_dict`, `state_dict_ema`, `optimizer`, `epoch`, `args`, `metric`), so `timm-supertoken
export` turns them into Hub files. Every epoch draws its global randomness (Mixup, drop path) from
seeds derived from (seed, epoch, rank), and the data per sample (see `training.data`), so `resume=True`
after a kill at any point ends with the same weights as an uninterrupted run (`harness`).
"""
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import ModelEmaV3

from ..data.image_sets import ImageSet
from ..harness import log as log_line
from ..harness import (DistributedEnv, SeedPurpose, check_finite, check_same_run, derive_seed, load_for_resume,
                       progress, save_atomic, seeded_global_rngs)
from ..models.parameters import parameter_counts
from ..runtime import create_model_at_size
from .data import AugmentedImageSet, GlobalBatchSampler, create_device_loader, default_workers
from .recipe import Recipe

__all__ = ['TrainConfig', 'create_training_model', 'autocast', 'precision_name', 'train_one_epoch', 'evaluate', 'fit',
           'CHECKPOINT_NAME']

CHECKPOINT_NAME = 'last.pth.tar'  # train.py's name for its latest checkpoint
EVAL_BATCH_MULTIPLIER = 2  # no activations kept for backward, so twice the batch fits
LOSS_READ_INTERVAL = 50  # training steps between host reads of the loss (train.py's default --log-interval)
CHECKPOINT_KEYS = ('epoch', 'state_dict', 'optimizer', 'args', 'history')  # what a resume reads
_REMEDY = 'lower the learning rate'


@dataclass
class TrainConfig:
    """One model's training run: the model, its input, the recipe and the hardware options."""
    model: str
    recipe: Recipe
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    num_classes: int = 10
    seed: int = 0
    device: str = 'auto'
    workers: Optional[int] = None  # data-loader processes per rank; None: default_workers(device)
    sync_bn: bool = True  # SyncBatchNorm across GPUs under torchrun (gloo on CPU has none: BN stays per rank)
    mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, ...] = IMAGENET_DEFAULT_STD

    def train_py_args(self, dataset: str) -> Dict[str, Any]:
        """The run as train.py's `args`, which `timm-supertoken export` and the model card read."""
        return dict(dataclasses.asdict(self.recipe), model=self.model, model_kwargs=dict(self.model_kwargs),
                    img_size=self.img_size, num_classes=self.num_classes, seed=self.seed, dataset=dataset,
                    mean=list(self.mean), std=list(self.std))


def create_training_model(cfg: TrainConfig) -> nn.Module:
    """timm.create_model with the run's classes, size and the recipe's drop path."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.recipe.drop_path is not None:
        kwargs.setdefault('drop_path_rate', cfg.recipe.drop_path)
    return create_model_at_size(cfg.model, cfg.img_size, num_classes=cfg.num_classes, **kwargs)


def autocast(device: torch.device) -> Any:
    """bfloat16 autocast on CUDA (no loss scaler needed); full precision on CPU, where bf16 matmuls are slower."""
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=device.type == 'cuda')


def precision_name(device: torch.device) -> str:
    """What `autocast` computes in on device, for tables of timings."""
    return 'bf16 autocast' if device.type == 'cuda' else 'fp32'


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    device: torch.device, mixup_fn: Optional[Callable] = None, ema: Optional[ModelEmaV3] = None,
                    clip_grad: Optional[float] = None, world: int = 1, desc: str = 'train',
                    show_progress: bool = True) -> float:
    """One pass over a loader of batches already on device; returns the mean training loss over all ranks.

    The host reads the loss (to check it is finite and to show it) only every LOSS_READ_INTERVAL steps, the
    first included: a read waits for the GPU to finish the step, and the host could not then prepare the
    next batch (random erasing, mixup) while the GPU still trains on this one.
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    # off a terminal no bar: fit logs one line per epoch
    bar = progress(loader, desc, enabled=show_progress, summary=False)
    for step, (x, y) in enumerate(bar):
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        with autocast(device):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        if ema is not None:
            ema.update(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
        loss_sum += loss.detach().double() * x.shape[0]
        count += x.shape[0]
        if step % LOSS_READ_INTERVAL == 0:
            value = loss.item()
            check_finite(value, f'training loss ({desc}, step {step + 1})', _REMEDY)
            bar.set_postfix(loss=f'{value:.3f}', refresh=False)
    totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(totals)
    mean = (totals[0] / totals[1]).item()
    check_finite(mean, f'mean training loss ({desc})', _REMEDY)
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, world: int = 1) -> Dict[str, float]:
    """Top-1 accuracy (%) and cross-entropy over the whole validation set (batches on device), summed across ranks."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, loss sum
    count = 0  # on the host: a device scalar per batch would be one more host-to-device copy
    for x, y in loader:
        with autocast(device):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction='sum')
        sums += torch.stack([(logits.argmax(1) == y).sum().double(), loss.double()])
        count += y.numel()
    sums = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(sums)
    return {'top1': (100 * sums[0] / sums[2]).item(), 'val_loss': (sums[1] / sums[2]).item()}


def fit(cfg: TrainConfig, train_set: ImageSet, val_set: ImageSet, out_dir: str, resume: bool = False,
        dataset_name: str = '', log: Callable[[str], None] = log_line,
        on_epoch_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
        env: Optional[DistributedEnv] = None) -> Dict[str, Any]:
    """Train cfg.model for cfg.recipe.epochs and evaluate after each; returns {'history', 'model', 'params', ...}.

    Writes `out_dir/last.pth.tar` after every epoch (atomically, rank 0). With resume=True an existing
    checkpoint is continued from the epoch after the saved one; a finished run is returned as is.
    env: the processes to train on (default: the process group already joined, else this process on
    cfg.device). on_epoch_end(epoch, record) runs after each checkpoint (tests use it to interrupt a run).
    """
    env = env or DistributedEnv.current(cfg.device)
    rank, world, device = env.rank, env.world, env.device
    recipe = cfg.recipe
    if val_set.labels is None or train_set.labels is None:
        raise ValueError('training needs labelled train and val sets')
    if int(train_set.labels.max()) >= cfg.num_classes:
        raise ValueError(f'labels go up to {int(train_set.labels.max())} but num_classes={cfg.num_classes}')
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_NAME
    if env.is_primary:
        out.mkdir(parents=True, exist_ok=True)
    args = cfg.train_py_args(dataset_name or train_set.name)

    # identical initial weights in every process and every run with this seed
    with seeded_global_rngs(derive_seed(cfg.seed, SeedPurpose.WEIGHTS), device):
        model = create_training_model(cfg).to(device)
    if world > 1 and device.type == 'cuda' and cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = env.data_parallel(model)
    ema = ModelEmaV3(model, decay=recipe.model_ema_decay) if recipe.model_ema else None

    train_data = AugmentedImageSet(train_set, recipe.train_transform(cfg.img_size, cfg.mean), cfg.seed)
    val_data = AugmentedImageSet(val_set, recipe.eval_transform(cfg.img_size), cfg.seed)
    train_sampler = GlobalBatchSampler(len(train_data), recipe.batch_size, rank, world, cfg.seed)
    val_sampler = GlobalBatchSampler(len(val_data), recipe.batch_size * EVAL_BATCH_MULTIPLIER, rank, world,
                                     shuffle=False, drop_last=False)
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    train_loader = create_device_loader(train_data, train_sampler, device, cfg.mean, cfg.std, workers,
                                        **recipe.erasing)
    val_loader = create_device_loader(val_data, val_sampler, device, cfg.mean, cfg.std, workers)

    optimizer = recipe.optimizer(model)
    scheduler = recipe.scheduler(optimizer, len(train_sampler))
    mixup_fn = recipe.mixup_fn(cfg.num_classes)
    loss_fn = recipe.train_loss()

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume and ckpt_path.is_file():
        ckpt = load_for_resume(ckpt_path, device, CHECKPOINT_KEYS, written_by='compare')
        check_same_run(ckpt['args'] or {}, args, ckpt_path)
        model.load_state_dict(ckpt['state_dict'])
        optimizer.load_state_dict(ckpt['optimizer'])
        if ema is not None:
            ema.module.load_state_dict(ckpt['state_dict_ema'])
        history = list(ckpt['history'])
        start_epoch = ckpt['epoch'] + 1
        if env.is_primary:
            log(f'{cfg.model}: resumed from {ckpt_path} after epoch {ckpt["epoch"] + 1}/{recipe.epochs}')
    elif resume and env.is_primary:
        log(f'{cfg.model}: no checkpoint at {ckpt_path}, starting from scratch')

    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        train_sampler.set_epoch(epoch)
        scheduler.step(epoch)
        lr = optimizer.param_groups[0]['lr']
        # Mixup and drop path draw per rank, as in train.py, from streams that a resumed epoch repeats
        with seeded_global_rngs(derive_seed(cfg.seed, SeedPurpose.STEPS, epoch, rank), device):
            loss = train_one_epoch(train_model, train_loader, optimizer, loss_fn, device, mixup_fn, ema,
                                   recipe.clip_grad, world, desc=f'{cfg.model} {epoch + 1}/{recipe.epochs}',
                                   show_progress=env.is_primary)
        # the training pass alone (its loss read waits for the GPU): what the input pipeline has to keep fed
        train_s = time.perf_counter() - t0
        record: Dict[str, Any] = {'epoch': epoch + 1, 'lr': lr, 'train_loss': loss, 'train_s': train_s,
                                  'train_images_per_s': len(train_sampler) * recipe.batch_size / train_s,
                                  **evaluate(model, val_loader, device, world)}
        if ema is not None:
            record.update({f'ema_{k}': v for k, v in evaluate(ema.module, val_loader, device, world).items()})
        record['time_s'] = time.perf_counter() - t0
        history.append(record)
        if env.is_primary:
            log(f'{cfg.model} epoch {epoch + 1}/{recipe.epochs}: loss {loss:.4f}, top-1 {record["top1"]:.2f}%'
                + (f' (EMA {record["ema_top1"]:.2f}%)' if ema is not None else '') + f', lr {lr:.2e}, '
                f'{record["time_s"]:.1f} s')
            ckpt = {'epoch': epoch, 'arch': cfg.model, 'state_dict': model.state_dict(),
                    'optimizer': optimizer.state_dict(), 'args': args, 'metric': record['top1'],
                    'history': history}
            if ema is not None:
                ckpt['state_dict_ema'] = ema.module.state_dict()
            save_atomic(ckpt, ckpt_path)
        env.barrier()  # no rank moves on (or exits, to be resumed) before the checkpoint exists
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    embed_params, params = parameter_counts(model)
    return {'model': model, 'ema': None if ema is None else ema.module, 'history': history, 'args': args,
            'params': params, 'embed_params': embed_params}
