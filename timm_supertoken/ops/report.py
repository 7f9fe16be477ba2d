"""Facts of every fused kernel for a matrix of shapes, dtypes, layouts and GPUs, compiled with no GPU.

The data behind `benchmarks/kernel_report.py`, which renders it into docs/benchmarks.md or writes it as
JSON for tests/test_kernel_report.py (which holds the kernels to it in CI). Each (shape, arch, dtype)
is compiled in its own worker process (both layouts in one, as they share kernels), so the matrix
takes a few minutes on 2 cores.
"""
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ['DTYPES', 'LAYOUTS', 'SHAPES', 'model_map_shape', 'stem_map_shapes', 'collect', 'warp_instructions']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
LAYOUTS = {'NCHW': torch.contiguous_format, 'channels_last': torch.channels_last}


def model_map_shape(batch: int = 128, model: str = 'vit_small_stconv', img_size: int = 224) -> Tuple[int, ...]:
    """(B, C, H, W) of the map that the model's stem hands to super-token clustering, read off the model."""
    import timm
    with torch.device('meta'):
        embed = timm.create_model(model, img_size=img_size).patch_embed
        return tuple(embed.stem(torch.empty(batch, 3, img_size, img_size)).shape)


def stem_map_shapes(batch: int = 128, model: str = 'vit_small_stconv', img_size: int = 224) -> List[Tuple[int, ...]]:
    """(B, C, H, W) of the first map of each channel count that the stem's conv modules hand to their GELU-BN.

    The epilogue's kernels specialise on the channel count (their tile), so one map per count covers them.
    """
    import timm
    with torch.device('meta'):
        x = torch.empty(batch, 3, img_size, img_size)
        shapes = {}
        for module in timm.create_model(model, img_size=img_size).patch_embed.stem:
            x = module(x)
            shapes.setdefault(x.shape[1], tuple(x.shape))
        return list(shapes.values())


SHAPES = {
    'model': model_map_shape,  # vit_small_stconv at 224², B=128: the model benchmark's batch
    'operator': lambda: (256, 64, 56, 56),  # the operator benchmark's largest map
}


def warp_instructions(row: Dict) -> int:
    """Warp instructions one launch of a row's kernel issues: per program per warp × warps × programs."""
    return row['issued'] * row['warps'] * row['programs']


def _facts_of(job: Tuple[str, Tuple[int, ...], int, str, Tuple[str, ...], int, int]) -> List[Dict]:
    """Compile one (shape, arch, dtype) in each layout and return one row of facts per kernel and layout."""
    from .aot import compile_gelu_bn_kernels, compile_kernels, kernel_facts, launch_geometry
    shape_name, shape, arch, dtype, layouts, grid, iters = job
    rows = []
    for layout in layouts:  # one worker per layout group: kernels that two layouts share compile once
        plan = dict(shape=shape, dtype=DTYPES[dtype], grid=grid, iters=iters, memory_format=LAYOUTS[layout])
        kernels = compile_kernels(arch=arch, **plan)
        for key, geometry in launch_geometry(**plan).items():
            facts = dataclasses.asdict(kernel_facts(kernels[key], arch, geometry.loop_trips))
            rows.append(dict(op='super_token', shape_name=shape_name, shape=list(shape), arch=arch, dtype=dtype,
                             layout=layout, grid=grid, iters=iters, kernel=key, launches=geometry.launches,
                             programs=geometry.programs,
                             **facts))
    if shape_name == 'model':  # the stem's conv epilogue runs in the same model: its maps, channels_last
        for stem_shape in stem_map_shapes(shape[0]):
            for key, kernel in compile_gelu_bn_kernels(stem_shape, DTYPES[dtype], arch=arch).items():
                facts = dataclasses.asdict(kernel_facts(kernel, arch))
                rows.append(dict(op='gelu_bn', shape_name='stem', shape=list(stem_shape), arch=arch, dtype=dtype,
                                 layout='channels_last', kernel=key, **facts))
    return rows


def collect(
        shapes: Sequence[str] = ('model',),
        archs: Sequence[int] = (80, 90),
        dtypes: Sequence[str] = tuple(DTYPES),
        layouts: Sequence[str] = tuple(LAYOUTS),
        grid: int = 2,
        iters: int = 3,
        workers: int = 0,
) -> List[Dict]:
    """Kernel facts for every combination, one row per compiled kernel; compiled in parallel processes."""
    jobs = [(name, SHAPES[name](), arch, dtype, tuple(layouts), grid, iters)
            for name in shapes for arch in archs for dtype in dtypes]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return [row for rows in pool.map(_facts_of, jobs) for row in rows]

