"""The fused kernels as an A100 and an H100 will run them, held to their design in CI with no GPU.

The kernels of every map the models hand the fused op (the registered models and their stem depths at
224², B=128: `timm_supertoken.ops.report.cluster_maps`) are compiled for sm_80 and sm_90, in
fp32/bf16/fp16, from NCHW and channels_last input, every autotune config, in a subprocess without
TRITON_INTERPRET (Triton's interpreter breaks its code generator, and tests/conftest.py sets it).
Each check names the kernel, the map, the architecture and the number that broke it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip('triton')
from timm_supertoken import ops  # noqa: E402
from timm_supertoken.ops.aot import _config_label, _issued  # noqa: E402
from timm_supertoken.ops.report import cluster_maps, warp_instructions  # noqa: E402
from timm_supertoken.ops.super_token_triton import traffic_model  # noqa: E402

KERNEL_REPORT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'kernel_report.py'
MIN_RESIDENT_WARPS = 16  # of 64 per SM: enough loads in flight to keep HBM busy (docs/kernels.md)
# Warp instructions per pixel that each stencil may issue at the model's map (bf16, sm_90, its fewest-instruction
# config). The kernels are bound by issue (docs/benchmarks.md); with a [rows, 16] slot tile and masked token
# loads they issued 231 (affinity), 146 (aggregation) and 153 (backward).
MAX_WARP_INSTRUCTIONS_PER_PIXEL = {'_affinity_kernel': 130, '_aggregate_kernel': 120, '_backward_kernel': 115}


@pytest.fixture(scope='module')
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp('kernel_report') / 'facts.json'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    subprocess.run([sys.executable, str(KERNEL_REPORT), '--maps', 'models', '--json', str(out)],
                   env=env, check=True, timeout=1800)
    return json.loads(out.read_text())


@pytest.fixture(scope='module')
def maps():
    return cluster_maps()


def _where(row):
    B, C, H, W = row['shape']
    return (f"{row['kernel']} at {H}×{W}×{C} grid {row['grid']} ({row['map']}) on sm_{row['arch']} "
            f"({row['dtype']}, {row['layout']} input)")


def _model_map(facts):
    """The rows of the default model's map, vit_small_stconv at 224²."""
    return [r for r in facts if r['map'] == 'vit_small_stconv']


def test_maps_are_read_off_the_models(maps):
    """The default model's map first, then its stem depths (Table 7): those past the fused grid take the reference."""
    assert (maps[0].shape, maps[0].grid, maps[0].iters) == ((128, 64, 28, 28), 2, 3)
    assert {'vit_tiny_stconv', 'vit_small_stconv', 'vit_base_stconv'} <= set(maps[0].sources)
    by_source = {source: m for m in maps for source in m.sources}
    depth = {n: by_source[f'vit_small_stconv(conv_modules={n})'] for n in (0, 1, 2, 3, 4, 7)}
    assert [(depth[n].shape[1:], depth[n].grid) for n in depth] == [
        ((3, 224, 224), 16), ((16, 112, 112), 8), ((32, 112, 112), 8), ((32, 56, 56), 4), ((64, 56, 56), 4),
        ((64, 14, 14), 1)]
    assert [depth[n].fused for n in depth] == [False, False, False, True, True, True]
    assert not any('patch' in source or 'convembed' in source for m in maps for source in m.sources)


def test_every_kernel_of_the_matrix_is_compiled(facts, maps):
    combos = {(r['map'], r['arch'], r['dtype'], r['layout']) for r in facts}
    assert combos == {(m.name, a, d, l) for m in maps if m.fused for a in (80, 90) for d in ('fp32', 'bf16', 'fp16')
                      for l in ('NCHW', 'channels_last')}
    for m in maps:
        names = {r['kernel'].split('[')[0] for r in facts if r['map'] == m.name}
        assert names == ({'_cell_mean_kernel', '_affinity_kernel', '_aggregate_kernel', '_aggregate_kernel(output)',
                          '_backward_kernel'} if m.fused else set()), m
    autotuned = [r['kernel'] for r in _model_map(facts) if r['kernel'].startswith('_affinity_kernel[')]
    assert len(set(autotuned)) == len(ops.super_token_triton._affinity_kernel.configs)


def test_no_kernel_uses_local_memory(facts):
    failures = [f"{_where(r)}: {r['spill_store_bytes']} B spill stores, {r['stack_bytes']} B stack, "
                f"{r['local_instructions']} LDL/STL" for r in facts if
                r['stack_bytes'] or r['spill_store_bytes'] or r['spill_load_bytes'] or r['local_instructions']]
    assert not failures, '\n'.join(failures)


def test_every_kernel_keeps_enough_warps_resident(facts):
    failures = [f"{_where(r)}: {r['resident_warps']} resident warps per SM (limited by {r['occupancy_limiter']}, "
                f"{r['registers']} registers, {r['shared_bytes']} B shared) < {MIN_RESIDENT_WARPS}"
                for r in facts if r['resident_warps'] < MIN_RESIDENT_WARPS]
    assert not failures, '\n'.join(failures)


def test_instruction_mix_is_the_documented_one(facts):
    """The module docstring: FFMA stencils, no tensor cores, vectorised tile loads (no 8/16-bit element loads)."""
    failures = []
    for r in facts:
        if r['mma']:
            failures.append(f"{_where(r)}: {r['mma']} tensor-core instructions, the docstring says none")
        if not r['kernel'].startswith('_cell_mean_kernel') and not r['ffma']:
            failures.append(f'{_where(r)}: no FFMA, the docstring says the stencils are FFMA')
        narrow = {bits: n for bits, n in r['global_loads'].items() if int(bits) < 32}
        if narrow or '128' not in r['global_loads']:
            failures.append(f"{_where(r)}: global loads by width {r['global_loads']}, the docstring says "
                            'tiles are read with 128-bit loads')
    assert not failures, '\n'.join(failures)


def test_compile_kernels_in_process():
    """Where Triton runs interpreted (CI) compile_kernels says why it cannot; elsewhere it compiles in-process."""
    if ops.INTERPRET:
        with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
            ops.compile_kernels((1, 8, 4, 4), torch.float32)
    else:
        kernels = ops.compile_kernels((1, 8, 4, 4), torch.float32, arch=90)
        assert '_cell_mean_kernel' in kernels
        assert ops.kernel_facts(kernels['_cell_mean_kernel'], 90).registers > 0


def test_stencils_issue_within_their_instruction_budget(facts):
    failures = []
    for name, budget in MAX_WARP_INSTRUCTIONS_PER_PIXEL.items():
        rows = [r for r in _model_map(facts) if r['kernel'].split('[')[0] == name
                and (r['arch'], r['dtype'], r['layout']) == (90, 'bf16', 'channels_last')]
        B, _, H, W = rows[0]['shape']
        fewest = min(warp_instructions(r) for r in rows) / (B * H * W)
        if fewest > budget:
            failures.append(f'{name} on sm_90 (bf16): {fewest:.1f} warp instructions per pixel > {budget}')
    assert not failures, '\n'.join(failures)


def test_issued_warp_instructions_sum_the_report_over_the_launches(facts):
    """What the GPU benchmark divides each kernel's measured time by: the report's counts, over one fwd+bwd."""
    code = ('import json, torch\n'
            'from timm_supertoken.ops import super_token_triton as st\n'
            'from timm_supertoken.ops.aot import issued_warp_instructions\n'
            'chosen = {k.fn.__name__: k.configs[0] for k in st.AUTOTUNED_KERNELS}\n'
            'print(json.dumps(issued_warp_instructions((128, 64, 28, 28), torch.bfloat16, chosen, arch=90)))\n')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    issued = json.loads(subprocess.run([sys.executable, '-c', code], env=env, check=True, capture_output=True,
                                       text=True, timeout=600).stdout)
    rows = {r['kernel']: r for r in _model_map(facts)
            if (r['arch'], r['dtype'], r['layout']) == (90, 'bf16', 'channels_last')}

    def launch(key):
        return warp_instructions(rows[key])

    first = {k.fn.__name__: _config_label(k.configs[0]) for k in ops.super_token_triton.AUTOTUNED_KERNELS}
    assert issued == {
        '_cell_mean_kernel': launch('_cell_mean_kernel'),
        '_affinity_kernel': 3 * launch(f"_affinity_kernel[{first['_affinity_kernel']}]"),
        '_aggregate_kernel': 2 * launch(f"_aggregate_kernel[{first['_aggregate_kernel']}]")
        + launch(f"_aggregate_kernel(output)[{first['_aggregate_kernel']}]"),
        '_backward_kernel': launch(f"_backward_kernel[{first['_backward_kernel']}]"),
    }


def test_issued_instructions_run_each_loop_at_its_trip_count():
    # as `_sass` gives it: predicates stripped
    sass = [(0x00, 'MOV R1, R2'), (0x10, 'FADD R1, R1, R3'), (0x20, 'FFMA R1, R1, R3, R4'),
            (0x30, 'BRA 0x20'), (0x40, 'BRA 0x10'), (0x50, 'EXIT'), (0x60, 'BRA 0x60'), (0x70, 'NOP')]
    # MOV and EXIT once; FADD and the outer branch 3 times; FFMA and the inner branch 3 × 5 times
    assert _issued(sass, (3, 5)) == (1 + 3 + 15 + 15 + 3 + 1, 2)
    # an inner loop of constant trip count that the compiler unrolled: the outer loop alone is left
    assert _issued(sass[1:2] + [(0x20, 'BRA 0x10')], (3, 9)) == (6, 1)
    with pytest.raises(ValueError, match='2 nested loops, the launch declares 1'):
        _issued(sass, (3,))


def test_traffic_model_counts_every_launch():
    costs = traffic_model(B=2, C=8, H=6, W=6, grid=2, iters=3, elem=2)
    assert [c.kernel for c in costs] == ['_cell_mean_kernel', '_affinity_kernel', '_aggregate_kernel',
                                         '_backward_kernel']
    assert [c.launches for c in costs] == [1, 3, 3, 1]
    pixels_x_channels = 2 * 6 * 6 * 8
    assert costs[0].bytes == pixels_x_channels * 2 + 2 * 3 * 3 * 8 * 4  # read X (bf16), write S⁰ (fp32)
    assert costs[1].flops == 2 * 9 * pixels_x_channels + 9 * 5 * 2 * 6 * 6
