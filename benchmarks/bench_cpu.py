"""CPU inference benchmark: the three embeddings vs timm's vit_small_patch16_224, written to docs/benchmarks.md.

    python benchmarks/bench_cpu.py [--repeats 15] [--batch-size 8] [--output docs/benchmarks.md]

Runs `timm_supertoken.throughput.benchmark_cpu` (fp32, eval, inference_mode, all models interleaved in
one process, median of the repeats), then breaks vit_small_stconv's embedding down by stage and by
operator with torch.profiler, and rewrites only the `## CPU inference` section of the output file so
other sections (e.g. GPU kernel benchmarks) survive.
"""
import argparse
import datetime
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import timm

from timm_supertoken.runtime import hardware_info
from timm_supertoken.throughput import BASELINE, benchmark_cpu, throughput_markdown

from docs_page import target_verdict, write_markdown_section

SECTION = '## CPU inference'
TARGET_RATIO = 0.95  # the goal: vit_small_stconv at >= 0.95x the throughput of vit_small_patch16_224
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / 'docs' / 'benchmarks.md'


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median wall time of `fn` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def stconv_breakdown(batch_size: int, img_size: int, repeats: int) -> Dict[str, object]:
    """Where vit_small_stconv's embedding spends its time: per stage (median ms) and per aten op (profiler)."""
    embed = timm.create_model('vit_small_stconv', img_size=img_size).eval().patch_embed
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    stages: Dict[str, Callable[[], torch.Tensor]] = {}
    feats = x
    for i, module in enumerate(embed.stem):
        out = module(feats)
        stages[f'stem module {i + 1}: conv {module.conv.in_channels}→{module.conv.out_channels} '
               f's{module.conv.stride[0]}, GELU, BN → {out.shape[2]}×{out.shape[3]}'] = partial(module, feats)
        feats = out
    tokens = embed.cluster(feats).permute(0, 2, 3, 1)
    stages[f'super-token clustering {feats.shape[2]}×{feats.shape[3]} → {tokens.shape[1]}×{tokens.shape[2]}'] = \
        partial(embed.cluster, feats)
    stages[f'Linear {embed.proj.in_features}→{embed.proj.out_features}'] = partial(embed.proj, tokens)
    stage_ms = {name: _median_ms(fn, repeats) for name, fn in stages.items()}
    stage_ms['whole patch_embed'] = _median_ms(partial(embed, x), repeats)

    embed(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            embed(x)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    op_rows = [(e.key, e.count // repeats, e.self_cpu_time_total / 1e3 / repeats) for e in ops[:12]]
    return {'stages': stage_ms, 'ops': op_rows}


@torch.inference_mode()
def gflops_per_image(model_names: Sequence[str], img_size: int) -> Dict[str, Tuple[float, float]]:
    """Conv/matmul GFLOPs per image of (patch_embed, whole model): the cost floor the timings are measured against."""
    x = torch.zeros(1, 3, img_size, img_size)
    flops = {}
    for name in model_names:
        model = timm.create_model(name, img_size=img_size).eval()
        with FlopCounterMode(display=False) as embed_count:
            model.patch_embed(x)
        with FlopCounterMode(display=False) as model_count:
            model(x)
        flops[name] = (embed_count.get_total_flops() / 1e9, model_count.get_total_flops() / 1e9)
    return flops


def embedding_estimate(results: Dict[str, Dict[str, float]], breakdown: Dict[str, object]) -> List[str]:
    """The run's noise, and the ratio the embeddings alone imply, with its floor if the clustering and BN cost nothing.

    vit_small_patch does the baseline's FLOPs, so its ratio shows how far apart two equal models measure in
    this run. The trunks are identical, so T_base / (T_base - E_base + E_stconv) is the ratio the two
    embeddings' times imply; counting only the stem's convolutions, GELUs and the Linear (from the
    profiler) instead of E_stconv gives the ratio no clustering or BatchNorm speed-up could exceed.
    """
    base, stconv = results[BASELINE], results['vit_small_stconv']
    trunk_ms = base['ms_per_batch'] - base['embed_ms']
    op_ms = {key: ms for key, _, ms in breakdown['ops']}
    floor_ms = sum(op_ms.get(key, 0.) for key in ('aten::mkldnn_convolution', 'aten::gelu', 'aten::gelu_', 'aten::addmm'))
    lines = []
    if 'vit_small_patch' in results:
        lines.append(f'Noise of this run: vit_small_patch does exactly the FLOPs of {BASELINE} and measured '
                     f'{results["vit_small_patch"]["ratio"]:.3f}× (median), '
                     f'{results["vit_small_patch"]["best_ratio"]:.3f}× (fastest repeat).')
    lines += [
        f'From the embedding times (shared trunk {trunk_ms:.1f} ms): vit_small_stconv at '
        f'**{base["ms_per_batch"] / (trunk_ms + stconv["embed_ms"]):.3f}×**. Its convolutions, GELUs and Linear '
        f'alone take {floor_ms:.1f} ms, so with clustering and BatchNorm free the ratio would be at most '
        f'{base["ms_per_batch"] / (trunk_ms + floor_ms):.3f}×.',
    ]
    return lines


def render_section(
        results: Dict[str, Dict[str, float]],
        breakdown: Dict[str, object],
        flops: Dict[str, Tuple[float, float]],
        args: argparse.Namespace,
        load: Tuple[float, float],
) -> str:
    """The `## CPU inference` section of docs/benchmarks.md."""
    hw = hardware_info()
    ratio, best = results['vit_small_stconv']['ratio'], results['vit_small_stconv']['best_ratio']
    verdict = target_verdict(ratio, best, TARGET_RATIO)
    lines = [
        SECTION,
        '',
        f'Generated by `python benchmarks/bench_cpu.py` on {datetime.date.today().isoformat()}.',
        '',
        f'- Hardware: {hw["cpu"]}, {hw["cores"]} cores, {hw["threads"]} torch threads ({hw["os"]}).',
        f'- Software: torch {hw["torch"]}, timm {hw["timm"]}, Python {hw["python"]}.',
        f'- Setting: fp32, `model.eval()`, `torch.inference_mode()`, batch {args.batch_size}, '
        f'{args.img_size}×{args.img_size}, randomly initialised weights (they do not change the cost of a '
        f'dense forward). All four models run in one process, interleaved round-robin; each figure is the '
        f'median of {args.repeats} repeats after {args.warmup} warm-up call(s).',
        '- Embedding share: time of `model.patch_embed(x)` alone / time of the whole `model(x)`.',
        f'- Machine load (1-min load average, {hw["cores"]} cores) at start / end of the timing: '
        f'{load[0]:.1f} / {load[1]:.1f}. This is a shared machine: a load above {hw["cores"]} means other '
        f'jobs competed for the cores, so read the ratios with a few percent of noise.',
        '',
        throughput_markdown(results),
        '',
        f'Target (issue): vit_small_stconv ≥ {TARGET_RATIO}× the throughput of {BASELINE}. '
        f'Measured: **{ratio:.3f}× (median), {best:.3f}× (fastest repeat); target {verdict}.**',
        '',
        'Conv/matmul FLOPs per image (`torch.utils.flop_counter`; elementwise ops and softmax count '
        'nothing here but cost time on a CPU, and the clustering\'s matmuls count the masked entries of '
        'their windows, 3(m+2)/9 of the logits needed):',
        '',
        '| model | embedding GFLOPs | model GFLOPs | ratio to ' + BASELINE + ' if FLOP-bound |',
        '|---|---:|---:|---:|',
    ]
    base = flops[BASELINE][1]
    lines += [f'| {name} | {e:.3f} | {m:.3f} | {base / m:.3f}× |' for name, (e, m) in flops.items()]
    lines += ['', *embedding_estimate(results, breakdown)]
    lines += [
        '',
        '### Where vit_small_stconv\'s embedding time goes',
        '',
        f'Same batch and image size, each stage timed on its own (median of {args.repeats}):',
        '',
        '| stage | ms / batch |',
        '|---|---:|',
    ]
    lines += [f'| {name} | {ms:.1f} |' for name, ms in breakdown['stages'].items()]
    lines += [
        '',
        'Top operators by self CPU time (torch.profiler, per embedding call):',
        '',
        '| operator | calls | self ms |',
        '|---|---:|---:|',
    ]
    lines += [f'| `{key}` | {calls} | {ms:.1f} |' for key, calls, ms in breakdown['ops']]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[List[str]] = None) -> None:
    """Measure, profile, and rewrite the CPU section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--output', type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]
    results = benchmark_cpu(batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
                            warmup=args.warmup)
    load = (load_start, os.getloadavg()[0])
    print(throughput_markdown(results))
    breakdown = stconv_breakdown(args.batch_size, args.img_size, args.repeats)
    section = render_section(results, breakdown, gflops_per_image(list(results), args.img_size), args, load)
    write_markdown_section(args.output, SECTION, section)
    print(f'\n{section}\nwrote {args.output}')


if __name__ == '__main__':
    main()
