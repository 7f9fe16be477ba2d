"""The recipes' augmentation policies run at every magnitude on the installed Pillow.

timm's increasing posterize ('inc1', DeiT's RandAugment) keeps 4 - int(0.4 m) bits: none at magnitude 10,
which Pillow 13 rejects with a ValueError. Each op of each policy is run at each magnitude, on a photo and
on a grey image, with its magnitude pinned so every level is reached instead of the few a seed would draw.
"""
import copy
from typing import Iterator, List, Tuple

import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment

from timm_supertoken.training.recipe import PAPER_RECIPE, Recipe, load_recipe, recipe_names, recipe_path

# every magnitude of timm's 0..10 scale, and draws of the magnitude noise beyond it, which AugmentOp clamps
MAGNITUDES = (*range(11), 9.5, 10.5, 12.0, -1.0)
GREY_MEAN = (0.5,) * 3  # a grey fill colour: the policy is also built for one-channel images


def _recipes() -> Iterator[Tuple[str, Recipe]]:
    yield 'paper', PAPER_RECIPE
    for name in recipe_names():
        yield name, load_recipe(recipe_path(name))[0]
    # the other timm policies that hold an increasing posterize, with magnitude noise
    yield 'augmix', PAPER_RECIPE.replace(aa='augmix-m10-mstd0.5')
    yield 'autoaugment', PAPER_RECIPE.replace(aa='v0r-mstd0.5')


RECIPES = dict(_recipes())


def _ops(augment) -> List[AugmentOp]:
    """The AugmentOps of a transform stage's RandAugment, AugMix or AutoAugment policy."""
    ops = []
    for t in augment.transforms:
        if isinstance(t, (RandAugment, AugMixAugment)):
            ops += t.ops
        elif isinstance(t, AutoAugment):
            ops += [op for sub_policy in t.policy for op in sub_policy]
    return ops


def _pinned(op: AugmentOp, magnitude: float) -> AugmentOp:
    """The op as the policy built it, always applied and at `magnitude` instead of a noisy draw around its own."""
    pinned = copy.copy(op)
    pinned.prob, pinned.magnitude, pinned.magnitude_std = 1.0, magnitude, 0
    return pinned


@pytest.fixture(scope='module')
def photo() -> Image.Image:
    return Image.fromarray(load_sample_image('china.jpg')).resize((64, 48), Image.BICUBIC)


@pytest.mark.parametrize('name', RECIPES)
def test_every_op_runs_at_every_magnitude(name, photo):
    recipe = RECIPES[name]
    rgb = recipe.train_transform(32, IMAGENET_DEFAULT_MEAN).augment
    grey = recipe.train_transform(32, GREY_MEAN).grey_augment
    for augment, img in ((rgb, photo), (grey, photo.convert('L'))):
        ops = _ops(augment)
        assert any(op.name == 'PosterizeIncreasing' for op in ops), name
        for op in ops:
            for magnitude in MAGNITUDES:
                out = _pinned(op, magnitude)(img)
                assert (out.mode, out.size) == (img.mode, img.size), (name, op.name, magnitude)


def test_posterize_is_timms_below_the_top_magnitude_and_keeps_one_bit_at_it(photo):
    posterize, = (op for op in _ops(PAPER_RECIPE.train_transform(32).augment) if op.name == 'PosterizeIncreasing')
    for magnitude in np.arange(0, 10, 0.25):
        timms = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=magnitude)(photo)
        assert np.array_equal(np.asarray(_pinned(posterize, magnitude)(photo)), np.asarray(timms)), magnitude
    for magnitude in (10, 10.5):
        assert np.array_equal(np.asarray(_pinned(posterize, magnitude)(photo)), np.asarray(ImageOps.posterize(photo, 1)))

