"""GPU benchmark of super-token clustering: reference vs fused Triton vs torch.compile(reference), and models.

    python benchmarks/bench_supertoken.py [--batch-sizes 32 128 256] [--iters 1 2 3 4] [--output docs/benchmarks.md]

Kernel level: forward and forward+backward of the operator on 28×28×64 and 56×56×64 maps (grid 2),
timed with CUDA events after warm-up (median of `--repeats`), plus the achieved memory bandwidth of the
fused forward: the bytes it must move between DRAM and the chip (X read by the init launch and by each
iteration, super tokens read and written per iteration, A and Z saved by the last one) over its time.
Model level: training (AdamW step) and inference throughput with bf16 autocast at batch 128 of
vit_small_patch, vit_small_convembed and vit_small_stconv (reference and fused clustering) against
timm's vit_small_patch16_224. Rewrites only the `## GPU: super-token clustering kernel` section of the
output file. Needs a CUDA GPU: without one it exits with status 2 and produces no numbers.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from timm_supertoken.benchmark import write_markdown_section

SECTION = '## GPU: super-token clustering kernel'
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / 'docs' / 'benchmarks.md'
MODELS = ('vit_small_patch', 'vit_small_convembed', 'vit_small_stconv', 'vit_small_patch16_224')


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 128, 256])
    parser.add_argument('--shapes', nargs='+', default=['28x28x64', '56x56x64'], help='HxWxC feature maps')
    parser.add_argument('--iters', type=int, nargs='+', default=[1, 2, 3, 4], help='clustering iterations t')
    parser.add_argument('--grid', type=int, default=2)
    parser.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default='float32')
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=50)
    parser.add_argument('--model-batch-size', type=int, default=128)
    parser.add_argument('--model-repeats', type=int, default=20)
    parser.add_argument('--skip-models', action='store_true', help='kernel benchmark only')
    parser.add_argument('--output', type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split('x')) for s in args.shapes]
    if any(len(s) != 3 for s in args.shapes):
        parser.error('--shapes take HxWxC, e.g. 28x28x64')
    return args


def cuda_time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms, each call bracketed by CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fused_forward_bytes(B: int, C: int, H: int, W: int, grid: int, iters: int, elem: int) -> int:
    """DRAM bytes the fused forward must move at best (every re-read of a neighbour's data hits L2).

    init: read X, write S⁰ (fp32). Each iteration: read X and S (fp32), write S (fp32; the last one
    writes the output in the input dtype), and the last also writes A (B, H, W, 9) and Z (B, h, w) fp32.
    """
    h, w = -(-H // grid), -(-W // grid)
    x, s = B * C * H * W * elem, B * C * h * w * 4
    return x + s + iters * (x + s) + (iters - 1) * s + B * C * h * w * elem + B * H * W * 9 * 4 + B * h * w * 4


def bench_kernels(args: argparse.Namespace) -> List[Dict[str, object]]:
    from timm_supertoken.layers.super_token import super_token_clustering
    from timm_supertoken.ops import super_token_clustering_triton

    dtype = getattr(torch, args.dtype)
    impls = {
        'reference': super_token_clustering,
        'fused': lambda x, g, t: super_token_clustering_triton(x, g, t, validate=False),
        'compile(reference)': torch.compile(super_token_clustering, dynamic=False),
    }
    rows = []
    for (H, W, C) in args.shapes:
        for B in args.batch_sizes:
            for t in args.iters:
                x = torch.randn(B, C, H, W, device='cuda', dtype=dtype)
                xg = x.clone().requires_grad_(True)
                dy = torch.randn(B, C, -(-H // args.grid), -(-W // args.grid), device='cuda', dtype=dtype)
                row: Dict[str, object] = {'shape': f'{H}×{W}×{C}', 'batch': B, 't': t}
                for name, fn in impls.items():
                    with torch.no_grad():
                        row[f'{name} fwd'] = cuda_time_ms(lambda: fn(x, args.grid, t), args.warmup, args.repeats)
                    row[f'{name} fwd+bwd'] = cuda_time_ms(
                        lambda: fn(xg, args.grid, t).backward(dy), args.warmup, args.repeats)
                moved = fused_forward_bytes(B, C, H, W, args.grid, t, x.element_size())
                row['fused fwd GB/s'] = moved / (row['fused fwd'] * 1e-3) / 1e9
                rows.append(row)
                print(row, flush=True)
    return rows


def _time_model(name: str, batch: int, args: argparse.Namespace) -> Tuple[float, float]:
    """(inference img/s, training img/s) of one freshly built model; its memory is freed when this returns."""
    import timm

    model = timm.create_model(name, num_classes=100).cuda()
    x = torch.randn(batch, 3, 224, 224, device='cuda')
    target = torch.randint(0, 100, (batch,), device='cuda')
    model.eval()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        infer_ms = cuda_time_ms(lambda: model(x), args.warmup, args.model_repeats)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_ms = cuda_time_ms(step, args.warmup, args.model_repeats)
    return batch / infer_ms * 1e3, batch / train_ms * 1e3


def bench_models(args: argparse.Namespace) -> List[Tuple[str, float, float]]:
    """(label, inference img/s, training img/s) with bf16 autocast at --model-batch-size, 224×224."""
    import timm_supertoken  # noqa: F401  registers the models

    results = []
    variants = [(m, None) for m in MODELS if m != 'vit_small_stconv']
    variants[2:2] = [('vit_small_stconv', 'reference'), ('vit_small_stconv', 'triton')]
    for name, backend in variants:
        if backend is not None:
            os.environ['TIMM_SUPERTOKEN_BACKEND'] = backend  # read by SuperTokenClustering(backend='auto')
        infer, train = _time_model(name, args.model_batch_size, args)
        label = name if backend is None else f'{name} ({backend} clustering)'
        results.append((label, infer, train))
        print(results[-1], flush=True)
        os.environ.pop('TIMM_SUPERTOKEN_BACKEND', None)
        torch.cuda.empty_cache()
    return results


def render_section(args: argparse.Namespace, kernels: List[Dict[str, object]], models) -> str:
    import triton

    impls = ('reference', 'fused', 'compile(reference)')
    lines = [
        SECTION, '',
        f'GPU: {torch.cuda.get_device_name()}; PyTorch {torch.__version__}, Triton {triton.__version__}, '
        f'CUDA {torch.version.cuda}. Produced by `benchmarks/bench_supertoken.py`.', '',
        f'### Operator, grid {args.grid}, {args.dtype}: median ms over {args.repeats} runs (CUDA events)', '',
        '| map | batch | t | ' + ' | '.join(f'{i} fwd' for i in impls) + ' | '
        + ' | '.join(f'{i} fwd+bwd' for i in impls) + ' | fused fwd GB/s |',
        '|---|---:|---:|' + '---:|' * (2 * len(impls) + 1),
    ]
    for r in kernels:
        cells = [f'{r[f"{i} fwd"]:.3f}' for i in impls] + [f'{r[f"{i} fwd+bwd"]:.3f}' for i in impls]
        lines.append(f'| {r["shape"]} | {r["batch"]} | {r["t"]} | ' + ' | '.join(cells)
                     + f' | {r["fused fwd GB/s"]:.0f} |')
    lines += ['', 'GB/s: the bytes the fused forward must move at best (`fused_forward_bytes`) over its time.', '']
    if models:
        lines += [
            f'### Models, 224×224, batch {args.model_batch_size}, bf16 autocast: images/s', '',
            '| model | inference | training (AdamW step) |', '|---|---:|---:|',
        ]
        lines += [f'| {label} | {infer:.0f} | {train:.0f} |' for label, infer, train in models]
        lines.append('')
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print('bench_supertoken.py needs a CUDA GPU (the fused kernels are GPU-only); none found, no numbers written',
              file=sys.stderr)
        return 2
    kernels = bench_kernels(args)
    models = [] if args.skip_models else bench_models(args)
    section = render_section(args, kernels, models)
    write_markdown_section(args.output, SECTION, section)
    print(f'\n{section}\nwrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
