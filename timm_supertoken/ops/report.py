"""Facts of every fused kernel at every map the models hand it, for a matrix of dtypes, layouts and GPUs.

The data behind `benchmarks/kernel_report.py`, which renders it into docs/benchmarks.md or writes it as
JSON for tests/test_kernel_report.py (which holds the kernels to it in CI). The maps are read off the
models (`cluster_maps`), not listed by hand. Each (map, arch, dtype) is compiled in a worker process,
both layouts in one, since they run the same kernels.
"""
import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ['DTYPES', 'LAYOUTS', 'ClusterMap', 'cluster_maps', 'collect', 'operator_map', 'warp_instructions']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
LAYOUTS = {'NCHW': torch.contiguous_format, 'channels_last': torch.channels_last}


@dataclasses.dataclass(frozen=True)
class ClusterMap:
    """An input of super-token clustering: its (B, C, H, W), grid and iterations, and the models that produce it."""
    shape: Tuple[int, int, int, int]
    grid: int
    iters: int
    sources: Tuple[str, ...]

    @property
    def fused(self) -> bool:
        """Whether the fused op takes this map (its grid is within the kernels' unrolling), or the reference path."""
        from ..functional.super_token import MAX_FUSED_GRID
        return self.grid <= MAX_FUSED_GRID

    @property
    def name(self) -> str:
        return self.sources[0]


def _ablations(embed: torch.nn.Module) -> List[Dict[str, int]]:
    """The kwargs of the paper's ablations of a super-token embedding: every stem depth of Table 7."""
    from ..layers import SuperTokenConvEmbed
    if not isinstance(embed, SuperTokenConvEmbed):
        return []
    return [{'conv_modules': depth} for depth in range(len(SuperTokenConvEmbed.STEM_CHS) + 1)
            if depth != len(embed.stem)]


def cluster_maps(batch: int = 128, img_size: int = 224) -> List[ClusterMap]:
    """Every clustering input that a registered model, or a stem depth (`conv_modules`) of one, produces.

    Built on the meta device, at the model benchmark's batch. Maps that several models share (the stem is
    the same at every width) are listed once, with each source named; the default model's map comes first.
    The iteration count does not change which kernels compile (Table 8's `cluster_iters` only repeats them).
    """
    import timm
    from ..layers import SuperTokenClustering
    from ..models import REGISTERED_MODEL_NAMES

    found: Dict[Tuple, List[str]] = {}

    def add(name: str, kwargs: Dict[str, int]) -> None:
        with torch.device('meta'):
            embed = timm.create_model(name, img_size=img_size, **kwargs).patch_embed
            clusters = [m for m in embed.modules() if isinstance(m, SuperTokenClustering)]
            if clusters:
                stem_out = embed.stem(torch.empty(batch, embed.in_chans, img_size, img_size))
                label = name + ''.join(f'({k}={v})' for k, v in kwargs.items())
                found.setdefault((tuple(stem_out.shape), clusters[0].grid, clusters[0].iters), []).append(label)
        return embed

    for name in sorted(REGISTERED_MODEL_NAMES, key=lambda n: n != 'vit_small_stconv'):
        for kwargs in _ablations(add(name, {})):
            add(name, kwargs)
    return [ClusterMap(shape, grid, iters, tuple(sources)) for (shape, grid, iters), sources in found.items()]


def operator_map() -> ClusterMap:
    """The operator benchmark's largest map (benchmarks/bench_supertoken.py)."""
    return ClusterMap((256, 64, 56, 56), 2, 3, ('operator benchmark',))


def warp_instructions(row: Dict) -> int:
    """Warp instructions one launch of a row's kernel issues: per program per warp × warps × programs."""
    return row['issued'] * row['warps'] * row['programs']


def _facts_of(job: Tuple[ClusterMap, int, str, Tuple[str, ...]]) -> List[Dict]:
    """Compile one map for one arch and dtype, in each layout, and return one row of facts per kernel."""
    from ..layers.config import use_autotune
    from .aot import compile_kernels, kernel_facts, launch_geometry
    cluster_map, arch, dtype, layouts = job
    rows = []
    with use_autotune(True):  # every config an autotuner may pick, whatever the environment says
        for layout in layouts:
            plan = dict(shape=cluster_map.shape, dtype=DTYPES[dtype], grid=cluster_map.grid,
                        iters=cluster_map.iters, memory_format=LAYOUTS[layout])
            kernels = compile_kernels(arch=arch, **plan)
            for key, geometry in launch_geometry(**plan).items():
                facts = dataclasses.asdict(kernel_facts(kernels[key], arch, geometry.loop_trips))
                rows.append(dict(op='super_token', map=cluster_map.name, shape=list(cluster_map.shape),
                                 arch=arch, dtype=dtype, layout=layout, grid=cluster_map.grid,
                                 iters=cluster_map.iters, kernel=key, launches=geometry.launches,
                                 programs=geometry.programs, **facts))
    return rows


def collect(
        maps: Sequence[ClusterMap],
        archs: Sequence[int] = (80, 90),
        dtypes: Sequence[str] = tuple(DTYPES),
        layouts: Sequence[str] = tuple(LAYOUTS),
        workers: int = 0,
) -> List[Dict]:
    """Kernel facts for every fused map, arch, dtype and layout, one row per compiled kernel, in parallel."""
    jobs = [(m, arch, dtype, tuple(layouts)) for m in maps if m.fused for arch in archs for dtype in dtypes]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return [row for rows in pool.map(_facts_of, jobs) for row in rows]
