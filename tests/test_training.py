"""The training recipe, the seeded data pipeline, the trainer and `compare` (paper Table 6 / Fig. 3)."""
import csv
import dataclasses
import json
import multiprocessing
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import timm

from timm_supertoken.data import ImageSet, load_digits_set, stratified_split
from timm_supertoken.training import PAPER_RECIPE, CompareConfig, Recipe, load_recipe, parse_model_spec, run_compare
from timm_supertoken.training.compare import (
    FIGURE_NAME, QUICK_RECIPE, RESULTS_CSV, RESULTS_JSON, build_compare_config, results_markdown)
from timm_supertoken.training.data import AugmentedImageSet, GlobalBatchSampler, create_device_loader
from timm_supertoken.training.recipe import recipe_names, recipe_path, recipe_to_yaml
from timm_supertoken.training.trainer import LOSS_READ_INTERVAL, train_one_epoch

sys.path.insert(0, str(Path(__file__).parent))
from host_sync import HostSyncRecorder  # noqa: E402

TINY_KWARGS = dict(depth=1, embed_dim=32, num_heads=2)
TINY_RECIPE = Recipe(epochs=2, warmup_epochs=1, batch_size=32, aa='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0,
                     drop_path=0.1, model_ema=True, model_ema_decay=0.9)


def small_digits(per_class=12):
    """A balanced 120-image digits subset, split 80/20, to keep trainer tests to seconds."""
    data = load_digits_set()
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in range(10)])
    return stratified_split(ImageSet(data.images[idx], data.labels[idx], 'digits-small'), 0.2, seed=0)


# ---- recipes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('model', ['vit_small_patch', 'vit_small_convembed', 'vit_small_stconv'])
def test_imagenet100_recipes_are_table_2(model):
    recipe, run = load_recipe(recipe_path(f'imagenet100_{model}'))
    assert recipe == PAPER_RECIPE  # one recipe for all three embeddings, exactly the paper's
    assert (recipe.opt, recipe.lr, recipe.weight_decay, recipe.batch_size) == ('adamw', 1e-3, 0.05, 128)
    assert (recipe.mixup, recipe.cutmix, recipe.epochs) == (1.0, 0.8, 300)
    # hardware flags (--amp, --workers, --pin-mem) belong on the command line, so the same file runs on CPU
    assert run == {'model': model, 'model_kwargs': {'mlp_ratio': 3}, 'num_classes': 100, 'img_size': 224}
    with torch.device('meta'):
        total = sum(p.numel() for p in timm.create_model(model, num_classes=100, **run['model_kwargs']).parameters())
    assert 17.5e6 < total < 19e6  # the paper's 17-20M regime (Tables 6-7), not timm's 22M mlp_ratio=4 trunk


def test_fashion_mnist_and_quick_recipes():
    fashion, run = load_recipe(recipe_path('fashion_mnist'))
    assert fashion == PAPER_RECIPE.replace(epochs=100) and run['num_classes'] == 10 and 'model' not in run
    # Fashion-MNIST's own statistics, grey like its images: train.py's --mean/--std, and compare's
    assert run['mean'] == [0.2860] * 3 and run['std'] == [0.3530] * 3
    cfg = build_compare_config('fashion_mnist')
    assert (cfg.mean, cfg.std) == ((0.2860,) * 3, (0.3530,) * 3)
    quick, run = load_recipe(recipe_path(QUICK_RECIPE))
    assert (quick.opt, quick.lr, quick.weight_decay) == ('adamw', 1e-3, 0.05)
    assert quick.mixes and quick.aa.startswith('rand-') and quick.reprob > 0  # same pipeline, milder
    assert run['model_kwargs'] == {'depth': 4, 'embed_dim': 192, 'num_heads': 3} and run['img_size'] == 48
    assert set(recipe_names()) >= {'quick_digits', 'fashion_mnist', 'imagenet100_vit_small_stconv'}


def test_recipe_yaml_round_trip(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text(recipe_to_yaml(TINY_RECIPE, {'model': 'vit_small_stconv'}))
    recipe, run = load_recipe(path)
    assert recipe == TINY_RECIPE and run == {'model': 'vit_small_stconv'}


@pytest.mark.parametrize('text, match', [
    ('lr: 1e-3\nmixupp: 0.8\n', r"unknown option\(s\) \['mixupp'\]"),
    ('- lr\n', 'expected a mapping'),
    ('lr: [1, 2\n', 'not valid YAML'),
    ('epochs: 0\n', 'epochs must be positive'),
    ('mixup: -1\n', 'mixup must be >= 0'),
])
def test_recipe_errors_name_the_problem(tmp_path, text, match):
    path = tmp_path / 'bad.yaml'
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(FileNotFoundError, match='recipe file not found'):
        load_recipe('/nonexistent/recipe.yaml')
    with pytest.raises(ValueError, match='no shipped recipe'):
        recipe_path('imagenet1000')


def test_recipe_builds_timm_pieces():
    model = timm.create_model('vit_small_stconv', num_classes=10, img_size=32, **TINY_KWARGS)
    assert type(PAPER_RECIPE.train_loss()).__name__ == 'SoftTargetCrossEntropy'
    assert type(PAPER_RECIPE.replace(mixup=0., cutmix=0.).train_loss()).__name__ == 'LabelSmoothingCrossEntropy'
    mix = PAPER_RECIPE.mixup_fn(10)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing) == (1.0, 0.8, 0.1)
    opt = PAPER_RECIPE.optimizer(model)
    assert type(opt).__name__ == 'AdamW' and opt.defaults['lr'] == 1e-3
    # timm puts norms, biases, tokens and pos-embed in a no-weight-decay group, as in train.py
    assert sorted(g['weight_decay'] for g in opt.param_groups) == [0.0, 0.05]
    sched = PAPER_RECIPE.scheduler(opt, updates_per_epoch=10)
    sched.step(0)
    assert opt.param_groups[0]['lr'] == pytest.approx(PAPER_RECIPE.warmup_lr)
    sched.step(PAPER_RECIPE.warmup_epochs)
    assert opt.param_groups[0]['lr'] == pytest.approx(1e-3, rel=1e-3)
    transform = PAPER_RECIPE.train_transform(32)
    names = [type(t).__name__ for stage in (transform.spatial, transform.augment, transform.to_tensor)
             for t in stage.transforms]
    # the worker half of timm's prefetching pipeline: normalisation and erasing run on the device
    assert names == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'MaybePILToTensor']
    assert PAPER_RECIPE.erasing == dict(re_prob=0.25, re_mode='pixel', re_count=1)


# ---- data ----------------------------------------------------------------------------------------------------

def test_augmentation_is_seeded_per_sample_and_leaves_global_rngs_alone():
    train, _ = small_digits()
    data = AugmentedImageSet(train, PAPER_RECIPE.train_transform(32), seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    a, label, erase_seed = data[(0, 5)]
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    _ = data[(0, 7)]
    assert torch.equal(data.__getitems__([(0, 7), (0, 5)])[1][0], a)  # independent of what was drawn before
    assert not torch.equal(data[(1, 5)][0], a)  # a new epoch draws new augmentations
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and label == int(train.labels[5])
    assert erase_seed != data[(1, 5)][2] and erase_seed == data[(0, 5)][2]


def test_seeded_blocks_repeat_their_draws_and_give_the_caller_its_streams_back():
    from timm_supertoken.harness import SeedPurpose, derive_seed, seeded_global_rngs

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    def seed_caller():
        torch.manual_seed(7), random.seed(7), np.random.seed(7)

    seed = derive_seed(0, SeedPurpose.STEPS, epoch=3, index=1)
    seed_caller()
    with seeded_global_rngs(seed):
        inside = draws()
    after = draws()
    with seeded_global_rngs(seed):
        assert draws() == inside  # a resumed epoch draws what the interrupted one drew
    seed_caller()
    assert draws() == after  # the block left the caller's streams where they were
    keys = [(p, e, i) for p in SeedPurpose for e in range(3) for i in range(3)]
    assert len({derive_seed(0, *key) for key in keys}) == len(keys)  # every purpose, epoch and rank its own stream


@pytest.mark.parametrize('mean', [(0.286,) * 3, (0.485, 0.456, 0.406)], ids=['grey-fill', 'imagenet-fill'])
@pytest.mark.parametrize('aa', ['rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2', ''], ids=['randaugment', 'augmix', 'jitter'])
def test_grey_images_match_timms_rgb_pipeline_bit_for_bit(mean, aa):
    train, _ = small_digits()
    transform = PAPER_RECIPE.replace(aa=aa).train_transform(48, mean)
    # a grey fill colour lets the augmentation run on the one channel; a coloured one keeps it on RGB
    assert (transform.grey_augment is not None) == (len(set(mean)) == 1)
    whole = transforms.Compose([transform.spatial, transform.augment, transform.to_tensor])  # timm's, on RGB
    for i in range(40):
        random.seed(i), np.random.seed(i), torch.manual_seed(i)
        ours = transform(train.pil(i))
        random.seed(i), np.random.seed(i), torch.manual_seed(i)
        assert torch.equal(ours, whole(train.pil(i).convert('RGB')))


def test_grey_evaluation_images_match_timms_rgb_pipeline():
    train, _ = small_digits()
    transform = PAPER_RECIPE.replace(crop_pct=0.875).eval_transform(48)
    whole = transforms.Compose([transform.spatial, transform.to_tensor])
    for i in range(5):
        ours = transform(train.pil(i))
        assert ours.shape == (3, 48, 48) and torch.equal(ours, whole(train.pil(i).convert('RGB')))


def test_device_erasing_is_seeded_per_image_not_per_batch():
    train, _ = small_digits()
    data = AugmentedImageSet(train, PAPER_RECIPE.replace(reprob=1.0).train_transform(32), seed=0)
    sampler = GlobalBatchSampler(len(data), 16, seed=0)
    mean, std = (0.5,) * 3, (0.25,) * 3
    torch.manual_seed(0), random.seed(0)
    whole = [x for x, _ in create_device_loader(data, sampler, torch.device('cpu'), mean, std, workers=0, re_prob=1.0)]
    drawn_after = torch.rand(3).tolist(), random.random()
    torch.manual_seed(0), random.seed(0)
    assert drawn_after == (torch.rand(3).tolist(), random.random())  # training's own random streams are untouched
    halves = [[x for x, _ in create_device_loader(data, GlobalBatchSampler(len(data), 16, rank=r, world=2, seed=0),
                                                  torch.device('cpu'), mean, std, workers=0, re_prob=1.0)]
              for r in range(2)]
    plain = [x for x, _ in create_device_loader(data, sampler, torch.device('cpu'), mean, std, workers=0)]
    for batch, a, b, clean in zip(whole, *halves, plain):
        assert torch.equal(batch, torch.cat([a, b]))  # each rank erases its images as one process does
        assert not torch.equal(batch, clean) and batch.dtype == torch.float32
        kept = batch == clean  # erasing leaves pixels untouched or replaces them with N(0, 1) noise
        assert kept.float().mean() > 0.5 and batch[~kept].std() == pytest.approx(1.0, abs=0.1)


def test_persistent_workers_give_the_batches_of_the_main_process_every_epoch():
    train, _ = small_digits()
    data = AugmentedImageSet(train, PAPER_RECIPE.train_transform(32), seed=1)

    def epochs(workers):
        sampler = GlobalBatchSampler(len(data), 32, seed=1)
        loader = create_device_loader(data, sampler, torch.device('cpu'), (0.5,) * 3, (0.5,) * 3, workers,
                                      **PAPER_RECIPE.erasing)
        for epoch in range(2):
            sampler.set_epoch(epoch)  # in the main process only: persistent workers never see this call
            yield [torch.cat([x.flatten(), y.float()]) for x, y in loader]

    (first, second), (first_w, second_w) = list(epochs(0)), list(epochs(1))
    assert all(map(torch.equal, first + second, first_w + second_w))
    assert not torch.equal(first_w[0], second_w[0])  # the workers drew new augmentations in the new epoch


def _forget_worker_temp_dir(monkeypatch):
    """As in a fresh process: multiprocessing has not made its temp folder yet (it caches it in this dict)."""
    monkeypatch.delitem(multiprocessing.current_process()._config, 'tempdir', raising=False)


def _break_temp_folders(monkeypatch):
    """Every new temporary folder fails from here on, as on a full disk."""
    monkeypatch.setattr(tempfile, 'tempdir', '/dev/null/no-such-folder')


def test_workers_that_cannot_hand_over_batches_are_an_error_not_a_hang(monkeypatch):
    train, _ = small_digits()
    data = AugmentedImageSet(train, PAPER_RECIPE.train_transform(32), seed=1)
    _forget_worker_temp_dir(monkeypatch)
    _break_temp_folders(monkeypatch)
    with pytest.raises(RuntimeError, match='temporary folder to pass batches through.*run with 0 workers'):
        create_device_loader(data, GlobalBatchSampler(len(data), 32, seed=1), torch.device('cpu'),
                             (0.5,) * 3, (0.5,) * 3, workers=1)


def test_workers_use_the_temp_folder_made_before_they_start(monkeypatch):
    train, _ = small_digits()
    data = AugmentedImageSet(train, PAPER_RECIPE.train_transform(32), seed=1)
    _forget_worker_temp_dir(monkeypatch)
    loader = create_device_loader(data, GlobalBatchSampler(len(data), 32, seed=1), torch.device('cpu'),
                                  (0.5,) * 3, (0.5,) * 3, workers=1)
    _break_temp_folders(monkeypatch)  # the disk fills after the loader was made: the workers need nothing new
    assert sum(len(y) for _, y in loader) == len(data) // 32 * 32


def test_global_batches_split_across_ranks():
    one = list(GlobalBatchSampler(100, 16, seed=1))
    halves = [list(GlobalBatchSampler(100, 16, rank=r, world=2, seed=1)) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 16 for b in one)  # the ragged last batch is dropped
    assert [a + b for a, b in zip(*halves)] == one  # each global batch is the same, cut in two
    sampler = GlobalBatchSampler(100, 16, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != one
    shards = [list(GlobalBatchSampler(101, 15, rank=r, world=3, shuffle=False, drop_last=False)) for r in range(3)]
    seen = sorted(i for shard in shards for batch in shard for _, i in batch)
    assert seen == list(range(101))  # evaluation covers every image exactly once
    with pytest.raises(ValueError, match='multiple of the 3 processes'):
        GlobalBatchSampler(100, 16, world=3)
    with pytest.raises(ValueError, match='larger than the 10 training images'):
        GlobalBatchSampler(10, 16)


# ---- compare ---------------------------------------------------------------------------------------------------

def _linear_batches(steps, batch=4):
    """(x, y) batches for a 2-class linear model: the training loop without a data pipeline."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, generator=gen), torch.randint(0, 2, (batch,), generator=gen)) for _ in range(steps)]


def test_training_reads_the_loss_on_the_host_only_every_interval():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 2 * LOSS_READ_INTERVAL + 3
    with HostSyncRecorder() as syncs:
        mean = train_one_epoch(model, _linear_batches(steps), optimizer, torch.nn.CrossEntropyLoss(),
                               torch.device('cpu'), show_progress=False)
    # steps 1, 1 + interval, 1 + 2 intervals, and the epoch's mean: a GPU may run ahead of the host in between
    assert len(syncs.calls) == 4 and np.isfinite(mean)


def test_a_nan_training_loss_stops_with_a_remedy():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nan_loss = lambda logits, y: logits.sum() * float('nan')  # noqa: E731
    with pytest.raises(FloatingPointError, match=r'training loss \(train, step 1\) became nan; lower the learning'):
        train_one_epoch(model, _linear_batches(3), optimizer, nan_loss, torch.device('cpu'), show_progress=False)


def test_parse_model_spec():
    assert parse_model_spec('vit_small_stconv') == ('vit_small_stconv', {})
    assert parse_model_spec('vit_small_stconv:conv_modules=4,cluster_iters=2,act=gelu') == (
        'vit_small_stconv', {'conv_modules': 4, 'cluster_iters': 2, 'act': 'gelu'})
    with pytest.raises(ValueError, match='expected key=value'):
        parse_model_spec('vit_small_stconv:4')


def test_compare_trains_and_writes_table_6(tmp_path):
    train, val = small_digits()
    specs = ['vit_small_patch', 'vit_small_stconv:cluster_iters=1']
    cfg = CompareConfig(models=specs, model_kwargs=TINY_KWARGS, img_size=32, recipe=TINY_RECIPE, out=str(tmp_path),
                        device='cpu')
    results = run_compare(cfg, splits=(train, val), log=lambda s: None)
    assert list(results['models']) == specs
    for spec, r in results['models'].items():
        name, kwargs = parse_model_spec(spec)
        model = timm.create_model(name, num_classes=10, img_size=32, **TINY_KWARGS, **kwargs)
        assert r['params'] == sum(p.numel() for p in model.parameters())
        assert r['embed_params'] == sum(p.numel() for p in model.patch_embed.parameters())
        assert [h['epoch'] for h in r['history']] == [1, 2] and r['epochs'] == 2
        assert all(0 <= h['top1'] <= 100 and np.isfinite(h['train_loss']) and 'ema_top1' in h for h in r['history'])
        assert r['top1'] == r['history'][-1]['top1'] and r['img_per_s'] > 0
        assert (tmp_path / spec.replace(':', '_') / 'last.pth.tar').is_file()
    assert results['models'][specs[0]]['throughput_ratio'] == 1.0
    # the stconv model really was built with its spec's kwargs
    assert results['models'][specs[1]]['model_kwargs'] == dict(TINY_KWARGS, cluster_iters=1)
    saved = json.loads((tmp_path / RESULTS_JSON).read_text())
    assert saved['models'][specs[1]]['top1'] == results['models'][specs[1]]['top1']
    with open(tmp_path / RESULTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r['model_spec'] for r in rows] == specs and float(rows[0]['params']) > 0
    assert Image.open(tmp_path / FIGURE_NAME).size[0] > 500
    table = results_markdown(results)
    assert table.count('\n| vit_small_') == 2 and 'top-1 (last)' in table and 'Throughput: ' in table
    assert '| img/s (inference, fp32, batch 64) |' in table  # timed in the precision training used on this device


def test_compare_takes_any_timm_model(tmp_path):
    train, val = small_digits()
    cfg = CompareConfig(models=['resnet10t', 'vit_tiny_patch16_224:patch_size=8,depth=1'], img_size=32,
                        recipe=TINY_RECIPE.replace(epochs=1), out=str(tmp_path), device='cpu')
    results = run_compare(cfg, splits=(train, val), log=lambda s: None)
    cnn, vit = results['models'].values()
    assert cnn['embed_params'] == 0 and cnn['img_per_s'] > 0 and cnn['throughput_ratio'] == 1.0
    assert vit['params'] == sum(p.numel() for p in timm.create_model(
        'vit_tiny_patch16_224', patch_size=8, depth=1, img_size=32, num_classes=10).parameters())


def test_compare_validates_before_training(tmp_path):
    base = dict(model_kwargs=TINY_KWARGS, img_size=32, recipe=TINY_RECIPE, out=str(tmp_path), device='cpu')
    with pytest.raises(ValueError, match="unknown timm model 'vit_small_nope'"):
        run_compare(CompareConfig(models=['vit_small_nope'], **base), log=lambda s: None)
    with pytest.raises(ValueError, match='must be distinct'):
        run_compare(CompareConfig(models=['vit_small_patch', 'vit_small_patch'], **base), log=lambda s: None)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        run_compare(CompareConfig(dataset='cifar', **base), log=lambda s: None)
    with pytest.raises(FileNotFoundError, match='train/ and val/'):
        run_compare(CompareConfig(dataset='folder', data_dir=str(tmp_path), **base), log=lambda s: None)


def test_resume_refuses_a_different_run(tmp_path):
    train, val = small_digits()
    cfg = CompareConfig(models=['vit_small_patch'], model_kwargs=TINY_KWARGS, img_size=32,
                        recipe=dataclasses.replace(TINY_RECIPE, epochs=2, model_ema=False), out=str(tmp_path), device='cpu')
    run_compare(cfg, splits=(train, val), log=lambda s: None)
    finished = run_compare(dataclasses.replace(cfg, resume=True), splits=(train, val), log=lambda s: None)
    assert finished['models']['vit_small_patch']['epochs'] == 2  # a finished run is returned, not retrained
    with pytest.raises(ValueError, match=r'written by a different run \(lr: 0.001 -> 0.002\)'):
        run_compare(dataclasses.replace(cfg, resume=True, recipe=cfg.recipe.replace(lr=2e-3)), splits=(train, val),
                    log=lambda s: None)


# ---- command line --------------------------------------------------------------------------------------------

def test_compare_command_prints_settings_and_table(tmp_path, capsys):
    from timm_supertoken.cli import main
    argv = ['compare', '--models', 'vit_small_stconv', '--model-kwargs', 'depth=1', 'embed_dim=32', 'num_heads=2',
            '--img-size', '32', '--epochs', '1', '--batch-size', '64', '--aa', 'none', '--mixup', '0', '--cutmix', '0',
            '--device', 'cpu', '--out', str(tmp_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "aa: ''" in out and 'mixup: 0.0' in out and 'lr: 0.001' in out  # the recipe as run, overrides applied
    assert 'scaled down from the paper' in out  # the default recipe says what it changed
    assert 'digits at 32×32' in out and '48×48' not in out  # ... naming the data and size actually used
    assert 'warm-up scaled from 1 to 0 epoch(s)' in out  # --epochs 1 with the recipe's 1 warm-up epoch
    assert '\r' not in err  # not a terminal: no progress bar redrawn into the log
    assert '| vit_small_stconv | ' in out and 'results.csv' in out
    saved = json.loads((tmp_path / RESULTS_JSON).read_text())
    assert saved['config']['recipe']['epochs'] == 1 and saved['config']['model_kwargs']['depth'] == 1


def test_build_compare_config_applies_only_given_overrides():
    recipe, run = load_recipe(recipe_path(QUICK_RECIPE))
    default = build_compare_config()
    assert default.recipe == recipe and default.img_size == run['img_size'] and default.model_kwargs == run['model_kwargs']
    assert list(default.models) == ['vit_small_patch', 'vit_small_convembed', 'vit_small_stconv']
    changed = build_compare_config(epochs=3, aa='None', lr=None)
    assert changed.recipe == recipe.replace(epochs=3, aa='')  # 'none' turns RandAugment off; None changes nothing


def test_short_runs_scale_the_warm_up_and_say_so():
    notes = []
    cfg = build_compare_config('fashion_mnist', epochs=3, log=notes.append)
    assert (cfg.recipe.epochs, cfg.recipe.warmup_epochs) == (3, 0)  # 5 of 100 epochs: 5% of 3, rounded down
    assert notes == ["warm-up scaled from 5 to 0 epoch(s): 3 epoch(s) are no longer than the recipe's warm-up "
                     "(5 of 100 epochs), which would never end; --warmup-epochs sets it explicitly"]
    assert build_compare_config('fashion_mnist', epochs=40, log=notes.append).recipe.warmup_epochs == 5
    explicit = build_compare_config('fashion_mnist', epochs=3, warmup_epochs=2, log=notes.append).recipe
    assert (explicit.epochs, explicit.warmup_epochs) == (3, 2) and len(notes) == 1
    assert PAPER_RECIPE.with_epochs(250) == (PAPER_RECIPE.replace(epochs=250), None)


def test_unknown_model_kwarg_is_a_one_line_error(tmp_path):
    from timm_supertoken.cli import main
    with pytest.raises(SystemExit, match=r"^timm-supertoken compare: error: unknown keyword argument 'nonsense_kw' "
                                         r"for model vit_small_stconv$"):
        main(['compare', '--models', 'vit_small_patch', 'vit_small_stconv:nonsense_kw=3', '--device', 'cpu',
              '--out', str(tmp_path)])
    assert not (tmp_path / 'vit_small_patch').exists()  # checked before the first model trains


def test_a_bad_model_spec_is_the_first_and_only_output(tmp_path, capsys):
    from timm_supertoken.cli import main
    with pytest.raises(SystemExit, match=r"^timm-supertoken compare: error: unknown keyword argument 'nonsense_kw' "
                                         r"for model vit_small_stconv$"):
        main(['compare', '--models', 'vit_small_stconv:nonsense_kw=3', '--device', 'cpu', '--out', str(tmp_path)])
    assert capsys.readouterr() == ('', '')  # no recipe, no machine description: the error alone
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_progress_off_a_terminal_is_one_line_per_loop(capsys):
    from timm_supertoken.harness import progress
    bar = progress(range(4), 'round 0 ep 1/2')
    for step in bar:
        bar.set_postfix(loss=f'{step:.3f}')
    err = capsys.readouterr().err
    assert err.startswith('round 0 ep 1/2: 4 steps in ') and err.endswith(', loss 3.000\n')
    assert err.count('\n') == 1 and '\r' not in err  # one line per loop, no redrawn bar
    assert list(progress(range(3), 'epoch', summary=False)) == [0, 1, 2]  # the caller logs its own line
    assert capsys.readouterr().err == ''


def test_recipe_command(capsys):
    from timm_supertoken.cli import main
    assert main(['recipe']) == 0
    listing = capsys.readouterr().out
    assert 'imagenet100_vit_small_stconv' in listing and 'quick_digits' in listing
    assert main(['recipe', 'fashion_mnist']) == 0
    assert capsys.readouterr().out.strip().endswith('fashion_mnist.yaml')
    assert main(['recipe', 'fashion_mnist', '--show']) == 0
    assert 'cutmix: 0.8' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='timm-supertoken compare: error: no shipped recipe'):
        main(['compare', '--config', 'imagenet1000'])


def test_commands_let_cudnn_time_its_algorithms_as_train_py_does(monkeypatch):
    from timm_supertoken.cli import main
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)  # restored after the test
    assert main(['recipe']) == 0
    assert torch.backends.cudnn.benchmark


def test_resume_names_a_damaged_checkpoint(tmp_path):
    train, val = small_digits()
    cfg = CompareConfig(models=['vit_small_patch'], model_kwargs=TINY_KWARGS, img_size=32, recipe=TINY_RECIPE,
                        out=str(tmp_path), device='cpu', resume=True)
    ckpt = tmp_path / 'vit_small_patch' / 'last.pth.tar'
    ckpt.parent.mkdir()
    ckpt.write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(ValueError, match=r'last.pth.tar: not a readable PyTorch checkpoint .*; cannot resume from it'):
        run_compare(cfg, splits=(train, val), log=lambda s: None)
    torch.save({'model': {}}, ckpt)
    with pytest.raises(ValueError, match=r"not a checkpoint written by compare \(missing \['args', 'epoch'"):
        run_compare(cfg, splits=(train, val), log=lambda s: None)


def test_compare_checkpoint_exports_to_hub_files(tmp_path):
    from timm_supertoken.hub import export
    train, val = small_digits()
    cfg = CompareConfig(models=['vit_small_stconv:cluster_iters=2'], model_kwargs=TINY_KWARGS, img_size=32,
                        recipe=TINY_RECIPE.replace(epochs=1), out=str(tmp_path / 'run'), device='cpu')
    trained = run_compare(cfg, splits=(train, val), log=lambda s: None)
    ckpt = tmp_path / 'run' / 'vit_small_stconv_cluster_iters=2' / 'last.pth.tar'
    export(ckpt, tmp_path / 'hub', use_ema=False)
    loaded = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True).eval()
    assert loaded.patch_embed.cluster.iters == 2 and loaded.num_classes == 10 and len(loaded.blocks) == 1
    saved = torch.load(ckpt, weights_only=True)['state_dict']
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())  # the trained weights, unchanged
    assert trained['models']['vit_small_stconv:cluster_iters=2']['params'] == sum(p.numel() for p in loaded.parameters())
    # the recipe as run travels with the weights, and the card names it
    import yaml
    hparams = yaml.safe_load((tmp_path / 'hub' / 'train_hparams.yaml').read_text())
    assert hparams['epochs'] == 1 and hparams['model'] == 'vit_small_stconv'
    assert 'train_hparams.yaml' in (tmp_path / 'hub' / 'README.md').read_text()
