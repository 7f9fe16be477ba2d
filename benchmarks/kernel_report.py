"""Kernel report: the fused super-token kernels as an A100 and an H100 will run them, with no GPU.

    python benchmarks/kernel_report.py [--maps models operator] [--json facts.json]

Compiles every kernel of the fused forward and backward (every autotune config) for sm_80 and sm_90,
fp32/bf16/fp16, NCHW and channels_last input, at every map that a registered model or a stem depth of one
hands the fused op (`timm_supertoken.ops.report.cluster_maps`, 224², B=128) and at the operator
benchmark's largest map (B=256, 56×56×64), with the specialisation Triton's JIT applies at run time;
reads registers, local memory, shared memory, resident warps per SM and the SASS instruction mix with
the ptxas/cuobjdump of the Triton wheel; and sets the traffic/FLOP model of
`timm_supertoken.ops.super_token_triton` beside it. Prints the tables, writes them to
results/kernel_report.json and renders docs/benchmarks.md, or with --json writes the facts themselves (what
tests/test_kernel_report.py holds the kernels to). A few minutes on 2 cores; no CUDA toolkit, no GPU.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import triton

from timm_supertoken.ops._triton_compat import ptxas_path
from timm_supertoken.ops.aot import ARCHS
from timm_supertoken.ops.report import ClusterMap, cluster_maps, collect, operator_map, warp_instructions
from timm_supertoken.ops.super_token_triton import LaunchCost, traffic_model

from docs_page import PAGE, RESULTS_DIR, Table, result_record, tables_from_markdown, write_result

SECTION = '## Kernel report (compiled for sm_80 and sm_90, no GPU)'
KERNELS = ('_cell_mean_kernel', '_affinity_kernel', '_aggregate_kernel', '_aggregate_kernel(output)', '_backward_kernel')
MAPS = {'models': cluster_maps, 'operator': lambda: [operator_map()]}
ELEM = {'fp32': 4, 'bf16': 2, 'fp16': 2}


def _shape(row_or_shape) -> str:
    B, C, H, W = row_or_shape
    return f'B={B}, {H}×{W}×{C}'


def _local_memory(row: Dict) -> int:
    """Bytes of stack and spill stores plus LDL/STL instructions: any of it means the kernel touches local memory."""
    return row['stack_bytes'] + row['spill_store_bytes'] + row['local_instructions']


def fit_table(rows: List[Dict]) -> str:
    """Worst config of each kernel (most registers, fewest resident warps, any local memory) per combination."""
    worst = defaultdict(dict)
    for r in rows:
        combo = (f"{_shape(r['shape'])}, grid {r['grid']}", r['arch'], r['dtype'], r['layout'])
        name = r['kernel'].split('[')[0]
        regs, warps, local = worst[combo].get(name, (0, 64, 0))
        worst[combo][name] = (max(regs, r['registers']), min(warps, r['resident_warps']),
                              local + _local_memory(r))
    lines = ['| map | arch | dtype | input | ' + ' | '.join(f'`{k}`' for k in KERNELS) + ' |',
             '|---|---|---|---|' + '---:|' * len(KERNELS)]
    for combo, kernels in worst.items():
        cells = []
        for name in KERNELS:
            regs, warps, local = kernels[name]
            cells.append(f'{regs} / {warps}' + (f' / **{local} B local**' if local else ''))
        lines.append(f'| {combo[0]} | sm_{combo[1]} | {combo[2]} | {combo[3]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _widths(counts: Dict) -> str:
    return ', '.join(f'{n}×{bits}b' for bits, n in sorted(counts.items(), key=lambda kv: int(kv[0]))) or '—'


def _super_token_rows(rows: List[Dict], map_name: str, arch: int, dtype: str, layout: str) -> List[Dict]:
    """The fused op's kernels (one row per kernel and config) compiled for one map, arch, dtype and layout."""
    return [r for r in rows if (r['map'], r['arch'], r['dtype'], r['layout']) == (map_name, arch, dtype, layout)]


def _short_config(label: str) -> str:
    """A kernel's config label without the settings every config shares."""
    return label.replace(',num_ctas=1', '').replace(',num_stages=1', '')


def _bytes_floor_us(cost: LaunchCost, arch: int) -> float:
    """A launch's floor from its bytes and FLOPs on the arch's flagship GPU, in µs."""
    return max(cost.bytes / ARCHS[arch].hbm_bytes_per_s, cost.flops / ARCHS[arch].fp32_flops_per_s) * 1e6


def detail_table(rows: List[Dict], cluster_map: ClusterMap, arch: int, dtype: str, layout: str) -> str:
    shape = cluster_map.shape
    pixels = shape[0] * shape[2] * shape[3]
    lines = ['| kernel [config] | registers | spill stores B | stack B | shared B | warps | resident warps/SM '
             '(limit) | MMA | FFMA | LDG | STG | warp instructions per pixel |',
             '|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---:|']
    for r in _super_token_rows(rows, cluster_map.name, arch, dtype, layout):
        lines.append(f"| `{_short_config(r['kernel'])}` | {r['registers']} | {r['spill_store_bytes']} | "
                     f"{r['stack_bytes']} | {r['shared_bytes']} | {r['warps']} | "
                     f"{r['resident_warps']} ({r['occupancy_limiter']}) | {r['mma']} | {r['ffma']} | "
                     f"{_widths(r['global_loads'])} | {_widths(r['global_stores'])} | "
                     f"{warp_instructions(r) / pixels:.1f} |")
    return '\n'.join(lines)


def traffic_table(cluster_map: ClusterMap, dtype: str) -> str:
    """Bytes and FLOPs per launch from the module's model, and the time floor they imply on each GPU."""
    B, C, H, W = cluster_map.shape
    grid, iters = cluster_map.grid, cluster_map.iters
    costs = traffic_model(B, C, H, W, grid, iters, ELEM[dtype])
    head = ' | '.join(f'floor on {ARCHS[a].name.split(" ", 1)[1].strip("()")} µs' for a in sorted(ARCHS))
    lines = [f'| kernel | launches | MB per launch | MFLOP per launch | FLOP/B | {head} |',
             '|---|---:|---:|---:|---:|' + '---:|' * len(ARCHS)]
    totals = defaultdict(float)
    for c in costs:
        floors = []
        for a in sorted(ARCHS):
            floor = _bytes_floor_us(c, a)
            floors.append(f'{floor:.1f}')
            totals[(a, c.kernel == '_backward_kernel')] += floor * c.launches
        lines.append(f'| `{c.kernel}` | {c.launches} | {c.bytes / 1e6:.1f} | {c.flops / 1e6:.0f} | '
                     f'{c.flops / c.bytes:.1f} | ' + ' | '.join(floors) + ' |')
    h, w = -(-H // grid), -(-W // grid)
    ideal = B * C * H * W * ELEM[dtype] + B * C * h * w * ELEM[dtype]
    for label, bwd in (('forward, all launches', False), ('backward', True)):
        lines.append(f'| **{label}** | | | | | ' + ' | '.join(f'**{totals[(a, bwd)]:.1f}**' for a in sorted(ARCHS)) + ' |')
    lines.append(f'| ideal forward: read X + write S once, {ideal / 1e6:.1f} MB | | | | | ' +
                 ' | '.join(f'{ideal / ARCHS[a].hbm_bytes_per_s * 1e6:.1f}' for a in sorted(ARCHS)) + ' |')
    return '\n'.join(lines)


def fewest_instructions(rows: List[Dict], map_name: str, arch: int, dtype: str) -> Dict[str, Dict]:
    """Per kernel, the autotune config that issues the fewest instructions (channels_last input)."""
    best = {}
    for r in _super_token_rows(rows, map_name, arch, dtype, 'channels_last'):
        name = r['kernel'].split('[')[0]
        if name not in best or warp_instructions(r) < warp_instructions(best[name]):
            best[name] = r
    return best


def issue_table(rows: List[Dict], cluster_map: ClusterMap, dtype: str) -> str:
    """Instructions each kernel issues, the floor the GPU's issue rate puts under it, and its bytes' floor beside it."""
    B, C, H, W = cluster_map.shape
    pixels = B * H * W
    costs = {c.kernel: c for c in traffic_model(B, C, H, W, cluster_map.grid, cluster_map.iters, ELEM[dtype])}
    best = {a: fewest_instructions(rows, cluster_map.name, a, dtype) for a in sorted(ARCHS)}
    gpus = [ARCHS[a].name.split(' ', 1)[1].strip('()').replace(' 80GB', '') for a in sorted(ARCHS)]
    lines = ['| kernel (fewest-instruction config on sm_90) | launches | warp instructions per pixel | '
             + ' | '.join(f'issue floor {g} µs | bytes floor {g} µs' for g in gpus) + ' |',
             '|---|---:|---:|' + '---:|' * 2 * len(ARCHS)]
    totals = defaultdict(float)
    for name in KERNELS:
        r90 = best[90][name]
        launches = r90['launches']
        cost = costs[name.replace('(output)', '')]
        config = _short_config(r90['kernel'][len(name):])
        cells = []
        for a in sorted(ARCHS):
            issue = warp_instructions(best[a][name]) / ARCHS[a].warp_instructions_per_s * 1e6
            traffic = _bytes_floor_us(cost, a)
            cells += [f'{issue:.1f}', f'{traffic:.1f}']
            totals[(a, name == '_backward_kernel', 'issue')] += issue * launches
            totals[(a, name == '_backward_kernel', 'bytes')] += traffic * launches
        label = f'`{name}` {config}'.rstrip()
        lines.append(f'| {label} | {launches} | {warp_instructions(r90) / pixels:.1f} | '
                     + ' | '.join(cells) + ' |')
    for label, bwd in (('forward, all launches', False), ('backward', True)):
        lines.append(f'| **{label}** | | | ' + ' | '.join(
            f'**{totals[(a, bwd, kind)]:.1f}**' for a in sorted(ARCHS) for kind in ('issue', 'bytes')) + ' |')
    return '\n'.join(lines)


def _ptxas_version() -> str:
    out = subprocess.run([ptxas_path(), '--version'], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def _per_map(maps: Sequence[ClusterMap], table: Callable[[ClusterMap, str], str]) -> List[str]:
    """One titled table per map and dtype (bf16, fp32)."""
    return [line for cluster_map in maps for dtype in ('bf16', 'fp32')
            for line in (f'{cluster_map.name} map, {_shape(cluster_map.shape)}, grid {cluster_map.grid}, {dtype}:', '',
                         table(cluster_map, dtype), '')]


def _map_list(maps: Sequence[ClusterMap]) -> List[str]:
    """The maps the report covers, each with the models that produce it, and those the fused op does not take."""
    lines = []
    for m in maps:
        path = 'fused' if m.fused else 'reference path (grid beyond the fused kernels), not compiled'
        lines.append(f"- {_shape(m.shape)}, grid {m.grid}, t = {m.iters}: {path}; from {', '.join(m.sources)}")
    return lines


def render(rows: List[Dict], maps: Sequence[ClusterMap]) -> str:
    fused = [m for m in maps if m.fused]
    model = next((m for m in fused if m.name == 'vit_small_stconv'), None)
    # per-map traffic and issue tables for the default model's map and the operator benchmark's: the fit table
    # covers every map
    headline = [m for m in fused if m is model or m.name == 'operator benchmark']
    parts = [
        SECTION, '',
        f'Generated by `python benchmarks/kernel_report.py` on {datetime.date.today().isoformat()}, with no GPU: '
        f'Triton {triton.__version__} compiles each kernel for the target and its bundled ptxas '
        f'({_ptxas_version()}) and cuobjdump read the result. Every launch of the fused op is compiled as the '
        'launcher makes it (`forward_plan` / `backward_plan`), every autotune config, with the argument '
        'specialisation of Triton\'s JIT (16-byte aligned pointers, integers divisible by 16). '
        'tests/test_kernel_report.py holds the same facts in CI at every map the models produce: no local memory, '
        '≥ 16 resident warps per SM, no tensor-core instructions, no sub-32-bit loads. The maps, read off the '
        'registered models and their stem depths (`conv_modules`) at 224², B=128:', '',
        *_map_list(maps), '',
        'Resident warps per SM come from the SM\'s 64K registers (allocated per warp in units of 256), '
        '64 warps, 32 blocks and shared memory (164 KB on sm_80, 228 KB on sm_90, 1 KB reserved per block). '
        'NCHW input is converted to channels_last by the op before the kernels run, so both layouts run '
        'the same kernels.', '',
        '### Fit of every kernel, worst autotune config: registers per thread / resident warps per SM', '',
        fit_table(rows), '',
    ]
    if model:
        parts += [f'### Detail: the model\'s map ({_shape(model.shape)}), bf16, channels_last, sm_90', '',
                  detail_table(rows, model, 90, 'bf16', 'channels_last'), '',
                  'MMA, FFMA, LDG and STG are static counts of those instructions in the SASS (a loop body counts '
                  'once); LDG/STG are given by access width (count × bits): the 128-bit ones move the pixel and '
                  'token tiles, the 32-bit ones A and 1/Z, one value per row. Warp instructions per pixel count '
                  'what the launch issues (below).', '']
    parts += ['### Traffic model and time floors', '',
              'From `traffic_model`: each launch reads its inputs and writes '
              'its outputs once; the floor of a launch is max(bytes / HBM bandwidth, FLOPs / FP32 peak) at the '
              'datasheet figures of an A100 SXM4 (2.04 TB/s, 19.5 TFLOP/s) and an H100 SXM5 (3.35 TB/s, 66.9 '
              'TFLOP/s). Where X fits in L2 (12.8 MB at the model\'s map in bf16; an H100 has 50 MB), the '
              'repeated reads of X after the first come from L2, so the measured forward can beat the sum of '
              'the per-launch floors.', '']
    parts += _per_map(headline, traffic_table)
    parts += ['### Instructions issued and the issue floor', '',
              'Bytes are one floor; instructions are the other. An SM issues at most one warp instruction per '
              'clock from each of its 4 schedulers, so a launch cannot take less than its warp instructions / '
              '(SMs × 4 × boost clock): 108 SMs at 1.41 GHz on an A100 SXM4, 132 at 1.98 GHz on an H100 SXM5. '
              'The count is read off the SASS: the instructions of one program, each loop run at the trip '
              'counts its launch declares (`Launch.loops`: the channel blocks, and the aggregation\'s nine '
              'neighbour cells), × warps × programs, for the autotune config that issues fewest. Where the '
              'issue floor is above the bytes floor (the traffic model\'s, repeated here), the kernel is bound '
              'by the instructions it issues: fewer instructions per pixel is what makes it faster.', '']
    parts += _per_map(headline, lambda cluster_map, dtype: issue_table(rows, cluster_map, dtype))
    return '\n'.join(parts).rstrip() + '\n'


def _on_page(table: Table) -> bool:
    """The benchmarks page shows the default model's bf16 issue floors; every table stays in the result file."""
    caption = (table.title or '').splitlines()[-1] if table.title else ''
    return (table.columns[0].startswith('kernel (fewest') and caption.startswith('vit_small_stconv map')
            and caption.endswith('bf16:'))


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--maps', nargs='+', choices=sorted(MAPS), default=['models', 'operator'],
                        help="'models': every map the registered models and their stem depths produce")
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    parser.add_argument('--json', type=Path, default=None,
                        help='write the rows of kernel facts here instead of the docs section')
    parser.add_argument('--workers', type=int, default=0, help='compiler processes (default: one per core)')
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        parser.error('unset TRITON_INTERPRET: the kernels must be compiled, not interpreted')
    maps = [m for name in args.maps for m in MAPS[name]()]
    rows = collect(maps, sorted(ARCHS), workers=args.workers)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        return 0
    section = render(rows, maps)
    print(section)
    setting, tables = tables_from_markdown(section)
    for table in tables:  # the page shows the default model's map; every map's tables stay in the result file
        table.on_page = _on_page(table)
    path = write_result(result_record('kernel_report', SECTION.removeprefix('## '), tables, setting),
                        args.results_dir, args.page)
    print(f'wrote {path} and {args.page}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    torch.set_num_threads(1)
    sys.exit(main())
