"""CPU inference benchmark: the three embeddings vs timm's vit_small_patch16_224, as results/cpu_inference.json.

    python benchmarks/bench_cpu.py [--repeats 15] [--batch-size 8]

Runs `timm_supertoken.throughput.benchmark_cpu` (fp32, eval, inference_mode, all models interleaved in
one process, median of the repeats), then breaks vit_small_stconv's embedding down by stage, and by
operator with torch.profiler for the floor the convolutions set. The result file replaces the last run's,
and docs/benchmarks.md is rendered again.
"""
import argparse
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

from timm_supertoken.throughput import BASELINE, benchmark_cpu, throughput_markdown

from docs_page import PAGE, RESULTS_DIR, Table, result_record, target_verdict, write_result

TARGET_RATIO = 0.95  # the goal: vit_small_stconv at >= 0.95x the throughput of vit_small_patch16_224


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
        lines.append(f'Noise: vit_small_patch does exactly the FLOPs of {BASELINE} and measured '
                     f'{results["vit_small_patch"]["ratio"]:.3f}× (median), '
                     f'{results["vit_small_patch"]["best_ratio"]:.3f}× (fastest).')
    lines.append(
        f'From the embedding times (shared trunk {trunk_ms:.1f} ms): vit_small_stconv at '
        f'{base["ms_per_batch"] / (trunk_ms + stconv["embed_ms"]):.3f}×; its convolutions, GELUs and Linear '
        f'alone take {floor_ms:.1f} ms, so with clustering and BatchNorm free the ratio would be at most '
        f'{base["ms_per_batch"] / (trunk_ms + floor_ms):.3f}×.')
    return lines


def result_tables(
        results: Dict[str, Dict[str, float]],
        breakdown: Dict[str, object],
        flops: Dict[str, Tuple[float, float]],
        args: argparse.Namespace,
) -> List[Table]:
    """One row per model (throughput beside FLOPs), and vit_small_stconv's embedding by stage."""
    base = flops[BASELINE][1]
    models = Table(
        ['model', 'img/s (median)', 'ms / batch', f'ratio to {BASELINE}', 'embedding ms', 'embedding share',
         'fastest repeat: ms / batch', 'fastest repeat: ratio', 'embedding GFLOPs', 'model GFLOPs',
         'ratio if FLOP-bound'],
        [[name, s['img_per_s'], s['ms_per_batch'], s['ratio'], s['embed_ms'], 100 * s['embed_share'],
          s['best_ms_per_batch'], s['best_ratio'], *flops[name], base / flops[name][1]] for name, s in results.items()],
        [None, '{:.2f}', '{:.1f}', '{:.3f}×', '{:.1f}', '{:.1f}%', '{:.1f}', '{:.3f}×', '{:.3f}', '{:.3f}',
         '{:.3f}×'])
    stages = Table(['stage', 'ms / batch'], [[name, ms] for name, ms in breakdown['stages'].items()], [None, '{:.1f}'],
                   title=f"Where vit_small_stconv's embedding time goes (each stage on its own, median of "
                         f'{args.repeats}):', on_page=False)  # detail for the result file
    return [models, stages]


def write_cpu_result(
        results: Dict[str, Dict[str, float]],
        breakdown: Dict[str, object],
        flops: Dict[str, Tuple[float, float]],
        args: argparse.Namespace,
        load: Tuple[float, float],
) -> Path:
    """Write results/cpu_inference.json and render the page."""
    cores = os.cpu_count()
    ratio, best = results['vit_small_stconv']['ratio'], results['vit_small_stconv']['best_ratio']
    setting = [
        f'fp32, `model.eval()`, `torch.inference_mode()`, batch {args.batch_size}, {args.img_size}×{args.img_size}, '
        f'{torch.get_num_threads()} torch threads, random weights; the four models interleaved round-robin in one '
        f'process, median of {args.repeats} repeats after {args.warmup} warm-up calls. Embedding share: '
        '`model.patch_embed(x)` alone over the whole `model(x)`. GFLOPs: conv/matmul only '
        '(`torch.utils.flop_counter`).',
        f'1-min load average at start / end: {load[0]:.1f} / {load[1]:.1f} on {cores} cores (a shared machine: read '
        'the ratios with a few percent of noise).',
    ]
    findings = [
        f'Target: vit_small_stconv ≥ {TARGET_RATIO}× the throughput of {BASELINE}. Measured: **{ratio:.3f}× '
        f'(median), {best:.3f}× (fastest repeat); {target_verdict(ratio, best, TARGET_RATIO)}.**',
        *embedding_estimate(results, breakdown),
    ]
    record = result_record('cpu_inference', 'CPU inference', result_tables(results, breakdown, flops, args), setting,
                           findings)
    return write_result(record, args.results_dir, args.page)


def main(argv: Optional[List[str]] = None) -> None:
    """Measure, profile, write the result and render the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]
    results = benchmark_cpu(batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
                            warmup=args.warmup)
    load = (load_start, os.getloadavg()[0])
    print(throughput_markdown(results))
    breakdown = stconv_breakdown(args.batch_size, args.img_size, args.repeats)
    path = write_cpu_result(results, breakdown, gflops_per_image(list(results), args.img_size), args, load)
    print(f'wrote {path} and {args.page}')


if __name__ == '__main__':
    main()
