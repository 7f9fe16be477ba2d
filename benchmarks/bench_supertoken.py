"""GPU benchmark of super-token clustering and of the models, against the targets, side by side in one run.

    python benchmarks/bench_supertoken.py                                   # on a CUDA GPU
    python benchmarks/bench_supertoken.py --smoke                           # tiny CPU run of every code path

Operator: fused vs eager reference vs `torch.compile(reference)`, forward and forward+backward, with L2
flushed before every timed call (CUDA events, median), and the fused forward's achieved bandwidth on the
ideal bytes (read X + write S once) against this GPU's measured device-to-device copy bandwidth, and the
host time it takes to issue a call (with the host ops it goes to at the model's map): a call no longer than
its host time is bound by its launches, not by its kernels.
Models at 224², bf16 autocast: inference and AdamW training steps of the three embeddings beside timm's
vit_small_patch16_224, eager NCHW, channels_last and `torch.compile`, interleaved round-robin over
repeats (median); `patch_embed` forward+backward of vit_small_stconv, whole and stage by stage (each
conv module, then the clustering);
training throughput against t (paper Table 8); vit_small_stconv and vit_small_patch16_224 under
`torch.compile(mode='reduce-overhead')` (CUDA graphs); and the CUDA kernels where one vit_small_stconv training
step spends more GPU time than one of vit_small_patch16_224 (torch.profiler).
Everything runs with `torch.backends.cudnn.benchmark = True`, as under timm's train.py and our commands; the
`patch_embed` stage also times the stem with it off (cuDNN's heuristic algorithms), side by side.
Writes results/gpu_supertoken.json (the tables as rows, the GPU and the versions) and renders
docs/benchmarks.md after every stage (most important first, see `STAGES`); with `--budget-minutes` no
stage starts once the budget is spent, and the section names what was not measured. `compile(reference)`
is compiled for the target shape only unless `--compile-all-shapes`. `--smoke` runs every path on CPU at
toy sizes (no fused kernels, no file written), so a script error surfaces in CI rather than on a
borrowed GPU.
"""
import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from timm_supertoken.runtime import cpu_name, use_cudnn_benchmark

from docs_page import PAGE, RESULTS_DIR, result_record, tables_from_markdown, write_result

SECTION = '## GPU: super-token clustering and models'
RESULT = 'gpu_supertoken'
ON_PAGE = ('### Operator', '### Models', '### vit_small_stconv `patch_embed` forward+backward')
BASELINE = 'vit_small_patch16_224'
MODELS = ('vit_small_patch', 'vit_small_convembed', 'vit_small_stconv', BASELINE)
TARGET_OPERATOR_SHAPE = (56, 56, 64, 256, 'bfloat16')  # H, W, C, B, dtype of the "5x compile(reference)" target
MODEL_OPERATOR_SHAPE = (28, 28, 64, 128, 'bfloat16')  # the clustering's input in vit_small_stconv at batch 128
TARGETS = ('Targets: fused fwd+bwd ≥ 5× compile(reference) at B=256 56×56×64 bf16 and ≥ 10× the eager reference '
           'at every shape; fused forward ≥ 10% of peak bandwidth on the ideal bytes at B=256 56×56×64 bf16; '
           'vit_small_stconv ≥ 0.90× vit_small_patch16_224 in eager training and inference, ≥ 0.80× compiled; '
           'patch_embed fwd+bwd ≤ 3 ms at B=128.')


def parse_args(argv: Sequence[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', nargs='+', default=['28x28x64', '56x56x64'], help='HxWxC feature maps')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[128, 256])
    parser.add_argument('--dtypes', nargs='+', choices=['float32', 'bfloat16', 'float16'], default=['bfloat16', 'float32'])
    parser.add_argument('--grid', type=int, default=2)
    parser.add_argument('--iters', type=int, default=3, help='clustering iterations t of the operator benchmark')
    parser.add_argument('--repeats', type=int, default=25)
    parser.add_argument('--model-batch-size', type=int, default=128)
    parser.add_argument('--model-repeats', type=int, default=5, help='round-robin rounds over the models')
    parser.add_argument('--model-steps', type=int, default=10, help='timed steps per model per round')
    parser.add_argument('--skip-compile', action='store_true', help='no torch.compile variants (saves minutes)')
    parser.add_argument('--compile-all-shapes', action='store_true',
                        help='time compile(reference) at every operator shape, not only the target one (B=256 '
                             '56×56×64 bf16): each shape and dtype is a separate compilation')
    parser.add_argument('--budget-minutes', type=float, default=None,
                        help='start no stage after this many minutes; what ran is written, the rest is marked '
                             'skipped (a borrowed GPU has minutes, not hours)')
    parser.add_argument('--smoke', action='store_true',
                        help='toy sizes on CPU (1-block models at 64²): checks the code paths, writes nothing')
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split('x')) for s in args.shapes]
    if any(len(s) != 3 for s in args.shapes):
        parser.error('--shapes take HxWxC, e.g. 28x28x64')
    if args.smoke:
        args.shapes, args.batch_sizes, args.dtypes = [(8, 8, 16)], [2], ['float32']
        args.repeats, args.model_batch_size, args.model_repeats, args.model_steps = 2, 2, 1, 1
    args.device = torch.device('cpu' if args.smoke else 'cuda')
    args.img_size = 64 if args.smoke else 224
    args.model_kwargs = dict(img_size=args.img_size, depth=1 if args.smoke else 12)
    return args


class Timer:
    """Median milliseconds of a callable: CUDA events on a GPU (L2 flushed first if asked), wall time on CPU."""

    def __init__(self, device: torch.device, flush_l2: bool = True) -> None:
        self.device = device
        self.cuda = device.type == 'cuda'
        # a buffer twice the L2 size: zeroing it evicts whatever the previous call left there
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if self.cuda else 0
        self.flush_buffer = torch.empty(2 * l2 // 4, device=device, dtype=torch.float32) if self.cuda and flush_l2 \
            else None

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], object]) -> float:
        if self.flush_buffer is not None:
            self.flush_buffer.zero_()
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def median(self, fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        self.synchronize()
        return statistics.median(self.once(fn) for _ in range(repeats))

    def host_ms(self, fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
        """Median milliseconds the host takes to issue one call, the GPU drained before each: a call whose
        event time is no longer than this is bound by its launches, and faster kernels would not shorten it."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.synchronize()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        self.synchronize()
        return statistics.median(times)

    def host_profile(self, fn: Callable[[], object], calls: int = 10, top: int = 8) -> List[Tuple[str, float]]:
        """(op, host µs per call by its self time) of the ops costliest on the host, over `calls` calls: where
        a launch-bound call spends its host time."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
            self.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return [(e.key, e.self_cpu_time_total / calls) for e in events]

    def kernel_ms(self, fn: Callable[[], object]) -> float:
        """Milliseconds the GPU spends in kernels during one call: the event time less the launch gaps.

        An event-timed call that is much longer than its kernels is bound by the host's launches, not the GPU.
        """
        return sum(ms for ms, _ in self.kernel_split(fn).values())

    def kernel_split(self, fn: Callable[[], object]) -> Dict[str, Tuple[float, int]]:
        """{kernel: (GPU ms, launches)} of one call, costliest first: which kernel a redesign must shorten (none on
        CPU, where a smoke run only checks the code path)."""
        from torch.profiler import ProfilerActivity, profile

        if not self.cuda:
            fn()
            return {}

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            self.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        return {e.key: (e.device_time_total / 1e3, e.count)
                for e in sorted(events, key=lambda e: e.device_time_total, reverse=True)}


def issue_shares(split: Dict[str, Tuple[float, int]], x: torch.Tensor, grid: int, iters: int) -> Dict[str, float]:
    """Per fused kernel, the share of the GPU's issue rate its measured time achieved.

    Issued warp instructions are counted as the kernel report counts them, for the config each autotuner
    chose last, and the rate is SMs × 4 schedulers × the boost clock of the GPU's architecture in the report.
    Near 1 a kernel is bound by the instructions it issues; far below it, by memory or latency.
    """
    from timm_supertoken.ops import aot, super_token_triton
    major, minor = torch.cuda.get_device_capability(x.device)
    arch = 10 * major + minor
    if arch not in aot.ARCHS:
        raise ValueError(f'the kernel report knows the issue rate of sm_{sorted(aot.ARCHS)}, this GPU is sm_{arch}')
    chosen = {kernel.fn.__name__: kernel.best_config for kernel in super_token_triton.AUTOTUNED_KERNELS}
    issued = aot.issued_warp_instructions(tuple(x.shape), x.dtype, chosen, grid=grid, iters=iters, arch=arch)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count  # a PCIe part has fewer than the SXM
    rate = dataclasses.replace(aot.ARCHS[arch], sms=sms).warp_instructions_per_s
    return {name: count / (ms * 1e-3 * rate) for name, count in issued.items()
            for kernel, (ms, _) in split.items() if kernel.startswith(name)}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write): the practical peak the fused op is held to."""
    if device.type != 'cuda':
        return float('nan')
    src = torch.empty(1 << 28, device=device, dtype=torch.uint8)  # 256 MiB, far beyond L2
    dst = torch.empty_like(src)
    ms = Timer(device, flush_l2=False).median(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / (ms * 1e-3)


def bench_operator(args: argparse.Namespace) -> Dict[str, object]:
    """Fused vs reference vs compile(reference) per shape, batch and dtype, fwd and fwd+bwd; and the copy bandwidth."""
    from timm_supertoken.functional import super_token_clustering

    impls: Dict[str, Callable] = {'reference': super_token_clustering}
    if not args.smoke:
        from timm_supertoken.ops import super_token_clustering_triton
        impls['fused'] = lambda x, g, t: super_token_clustering_triton(x, g, t, validate=False)
        impls['compile(reference)'] = torch.compile(super_token_clustering, dynamic=False)
    timer = Timer(args.device)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for (H, W, C) in args.shapes:
            for B in args.batch_sizes:
                x = torch.randn(B, C, H, W, device=args.device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                xg = x.detach().clone().requires_grad_(True)
                h, w = -(-H // args.grid), -(-W // args.grid)
                dy = torch.randn(B, C, h, w, device=args.device, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                row: Dict[str, object] = {'map': f'{H}×{W}×{C}', 'batch': B, 'dtype': dtype_name}
                for name, fn in impls.items():
                    if name == 'compile(reference)' and not (args.compile_all_shapes or
                                                             (H, W, C, B, dtype_name) == TARGET_OPERATOR_SHAPE):
                        continue
                    with torch.no_grad():
                        row[f'{name} fwd'] = timer.median(lambda: fn(x, args.grid, args.iters), args.repeats)
                    row[f'{name} fwd+bwd'] = timer.median(
                        lambda: torch.autograd.grad(fn(xg, args.grid, args.iters), xg, dy), args.repeats)
                # the host side of the fused op (of the reference in a smoke run, which has no fused op)
                host_side = 'fused' if 'fused' in impls else 'reference'

                def fwd_bwd():
                    return torch.autograd.grad(impls[host_side](xg, args.grid, args.iters), xg, dy)
                with torch.no_grad():
                    row[f'{host_side} fwd host'] = timer.host_ms(
                        lambda: impls[host_side](x, args.grid, args.iters), args.repeats)
                row[f'{host_side} fwd+bwd host'] = timer.host_ms(fwd_bwd, args.repeats)
                if (H, W, C, B, dtype_name) == MODEL_OPERATOR_SHAPE or (args.smoke and not rows):
                    row[f'{host_side} fwd+bwd host profile'] = timer.host_profile(fwd_bwd)
                    if 'fused' in impls:
                        row['fused fwd+bwd host, direct / JIT'] = direct_launch_ab(timer, fwd_bwd, args.repeats)
                if 'fused' in impls:
                    with torch.no_grad():
                        row['fused fwd kernels'] = timer.kernel_ms(lambda: impls['fused'](x, args.grid, args.iters))
                    if (H, W, C, B, dtype_name) == TARGET_OPERATOR_SHAPE:
                        row['fused fwd+bwd kernel split'] = timer.kernel_split(fwd_bwd)
                        try:  # a statistic on top of the timings: its failure must not lose them
                            row['fused fwd+bwd issue share'] = issue_shares(
                                row['fused fwd+bwd kernel split'], x, args.grid, args.iters)
                        except Exception as error:  # noqa: BLE001  reported in the table's notes
                            row['fused fwd+bwd issue share error'] = f'{type(error).__name__}: {error}'[:300]
                row['ideal bytes'] = (B * C * H * W + B * C * h * w) * x.element_size()
                rows.append(row)
                print(row, flush=True)
    return {'copy_bw': copy_bandwidth(args.device), 'rows': rows}


def direct_launch_ab(timer: Timer, fwd_bwd: Callable[[], object], repeats: int, rounds: int = 3
                     ) -> Dict[str, object]:
    """Host ms to issue the fused op with its seen launches run directly, and with every launch through Triton's
    JIT, in interleaved rounds: what the direct launches save, on one host in one run (`enabled`: whether this
    Triton launches directly at all)."""
    from timm_supertoken.ops import super_token_triton

    direct, jit = [], []
    for _ in range(rounds):
        direct.append(timer.host_ms(fwd_bwd, repeats))
        with _temporarily(super_token_triton, 'DIRECT_LAUNCH', False), \
                _temporarily(super_token_triton, '_KNOWN_LAUNCHES', {}):
            jit.append(timer.host_ms(fwd_bwd, repeats))
    return {'direct': direct, 'jit': jit, 'enabled': super_token_triton.DIRECT_LAUNCH}


def _models(args: argparse.Namespace, variant: str, names: Sequence[str] = MODELS) -> Dict[str, torch.nn.Module]:
    """The models for one variant: 'eager' (NCHW), 'channels_last', 'compile' or 'reduce-overhead' (compiled with
    CUDA graphs)."""
    import timm
    import timm_supertoken  # noqa: F401  registers the models

    models = {}
    for name in names:
        model = timm.create_model(name, num_classes=100, **args.model_kwargs).to(args.device)
        if variant == 'channels_last':
            model = model.to(memory_format=torch.channels_last)
        if variant in ('compile', 'reduce-overhead'):
            model = torch.compile(model, mode=None if variant == 'compile' else variant)
        models[name] = model
    return models


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_models(args: argparse.Namespace, variants: Sequence[str], names: Sequence[str] = MODELS
                 ) -> List[Dict[str, object]]:
    """Images/s of the models per variant, timed round-robin (each round visits every model) and medianed, and
    each model's ratio to the baseline per round: a machine that slows down between rounds moves both times
    of a round together, so the per-round ratios keep the comparison where the medians of images/s do not."""
    timer = Timer(args.device, flush_l2=False)
    B = args.model_batch_size
    rows = []
    for variant in variants:
        models = _models(args, variant, names)
        fmt = torch.channels_last if variant == 'channels_last' else torch.contiguous_format
        x = torch.randn(B, 3, args.img_size, args.img_size, device=args.device).contiguous(memory_format=fmt)
        y = torch.randint(0, 100, (B,), device=args.device)
        optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}

        def infer(model: torch.nn.Module) -> None:
            with torch.no_grad(), torch.autocast(args.device.type, dtype=torch.bfloat16):
                model.eval()(x)

        def train(name: str) -> None:
            _train_step(models[name].train(), optimizers[name], x, y)

        for name, model in models.items():  # warm-up, and compilation of both modes, outside the timing
            for _ in range(2):
                infer(model)
                train(name)
        times: Dict[Tuple[str, str], List[float]] = {(n, mode): [] for n in models for mode in ('infer', 'train')}
        for _ in range(args.model_repeats):
            for name, model in models.items():
                times[name, 'infer'].append(timer.once(lambda: [infer(model) for _ in range(args.model_steps)]))
                times[name, 'train'].append(timer.once(lambda: [train(name) for _ in range(args.model_steps)]))
        for name in models:
            row = {'variant': variant, 'model': name}
            for mode in ('infer', 'train'):
                row[mode] = B * args.model_steps / (statistics.median(times[name, mode]) * 1e-3)
                row[f'{mode} ratios'] = [base / own for base, own in zip(times[BASELINE, mode], times[name, mode])]
            # a step whose host time reaches its GPU time is bound by the host: its images/s then measure the
            # host's Python and launches, not the model's kernels, and the GPU time is the ratio a faster host gets
            row['train host ms'] = timer.host_ms(lambda: train(name), repeats=5, warmup=1)
            row['train gpu ms'] = timer.kernel_ms(lambda: train(name))
            rows.append(row)
            print(row, flush=True)
        models.clear()  # free this variant's models before the next variant builds its own
        optimizers.clear()
        if args.device.type == 'cuda':
            torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _temporarily(owner: object, name: str, value: object) -> Iterator[None]:
    """owner.name set to value for the block, then back to what it was (torch.backends.cudnn.benchmark,
    super_token_triton.DIRECT_LAUNCH)."""
    default = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, default)


def bench_patch_embed(args: argparse.Namespace, top: int = 10) -> Dict[str, Tuple[float, float, float, list]]:
    """Forward+backward ms of vit_small_stconv's patch_embed alone (target ≤ 3 ms at B=128): eager, eager with
    cuDNN's heuristic algorithms instead of its timed ones (side by side, so the effect is a ratio of one run),
    and compiled; each with the host's time to issue it, its GPU time in kernels and its `top` kernels."""
    import timm
    import timm_supertoken  # noqa: F401

    embed = timm.create_model('vit_small_stconv', **args.model_kwargs).patch_embed.to(args.device).train()
    x = torch.randn(args.model_batch_size, 3, args.img_size, args.img_size, device=args.device)
    timer = Timer(args.device)
    result = {}
    compiled = None if args.skip_compile or args.smoke else torch.compile(embed)
    variants = (('eager', embed, True), ('eager, cudnn.benchmark off', embed, False), ('compile', compiled, True))
    for label, fn, timed_algorithms in variants:
        if fn is None:
            continue

        def step() -> None:
            with torch.autocast(args.device.type, dtype=torch.bfloat16):
                out = fn(x)
            out.float().sum().backward()

        with _temporarily(torch.backends.cudnn, 'benchmark', timed_algorithms):
            split = timer.kernel_split(step)
            result[label] = (timer.median(step, args.repeats), timer.host_ms(step, args.repeats),
                             sum(ms for ms, _ in split.values()), list(split.items())[:top])
    print(result, flush=True)
    return result


def bench_stem(args: argparse.Namespace) -> List[Dict[str, object]]:
    """Forward+backward ms of each of vit_small_stconv's conv modules and of its clustering, each on the input it
    gets in the model: which stage the `patch_embed` target must shorten. Gradients go to the parameters and, past the image, to the input.
    Beside each time, the host's time to issue it; and the host ops of the deepest conv module as built, whose
    kernels are the shortest, so that the host's share shows there first."""
    import timm
    import timm_supertoken  # noqa: F401

    embed = timm.create_model('vit_small_stconv', **args.model_kwargs).patch_embed.to(args.device).train()
    x = torch.randn(args.model_batch_size, 3, args.img_size, args.img_size, device=args.device).contiguous(
        memory_format=torch.channels_last)
    timer = Timer(args.device)
    rows = []
    stages = [(f'conv module {i + 1}', module) for i, module in enumerate(embed.stem)]
    for name, module in stages + [('super-token clustering', embed.cluster)]:
        with torch.no_grad(), torch.autocast(args.device.type, dtype=torch.bfloat16):
            out = module(x)
        row: Dict[str, object] = {'stage': name, 'map': f'{tuple(x.shape[1:])} → {tuple(out.shape[1:])}'}
        x_in = x.detach().requires_grad_(bool(rows))  # the image needs no gradient
        inputs = list(module.parameters()) + ([x_in] if x_in.requires_grad else [])
        grad = torch.randn_like(out)

        def step() -> None:
            with torch.autocast(args.device.type, dtype=torch.bfloat16):
                y = module(x_in)
            torch.autograd.grad(y, inputs, grad)

        row['ms'] = timer.median(step, args.repeats)
        row['host ms'] = timer.host_ms(step, args.repeats)
        if module is embed.stem[-1]:
            row['host profile'] = timer.host_profile(step)
        rows.append(row)
        print(row, flush=True)
        x = out
    return rows


def bench_iterations(args: argparse.Namespace) -> List[Tuple[int, float, float]]:
    """(t, inference img/s, training img/s) of vit_small_stconv for t = 1..4: the paper's Table 8 on this GPU."""
    import timm
    import timm_supertoken  # noqa: F401

    timer = Timer(args.device, flush_l2=False)
    B = args.model_batch_size
    x = torch.randn(B, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 100, (B,), device=args.device)
    rows = []
    for t in range(1, 5):
        model = timm.create_model('vit_small_stconv', num_classes=100, cluster_iters=t, **args.model_kwargs)
        model = model.to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        with torch.no_grad(), torch.autocast(args.device.type, dtype=torch.bfloat16):
            infer_ms = timer.median(lambda: model.eval()(x), args.repeats)
        train_ms = timer.median(lambda: _train_step(model.train(), optimizer, x, y), args.repeats)
        rows.append((t, B / infer_ms * 1e3, B / train_ms * 1e3))
        print(rows[-1], flush=True)
    return rows


def bench_cuda_graphs(args: argparse.Namespace) -> Union[List[Dict[str, object]], str]:
    """vit_small_stconv beside vit_small_patch16_224 under torch.compile(mode='reduce-overhead'): a step replayed as
    CUDA graphs issues none of the host launches that bound vit_small_stconv's stem in eager mode. The rows, or
    what broke, so that a failure does not lose the other measurements."""
    if args.smoke:
        return 'not tried (CPU smoke run)'
    try:
        return bench_models(args, ['reduce-overhead'], names=('vit_small_stconv', BASELINE))
    except Exception as error:  # noqa: BLE001  reported in the section
        return f'fails: {type(error).__name__}: {str(error).splitlines()[0][:200]}'


def profile_step(args: argparse.Namespace, top: int = 15) -> Dict[str, object]:
    """GPU time by kernel of one training step of vit_small_stconv and one of vit_small_patch16_224, and the
    kernels where the first spends the most more than the second: their trunks are the same, so the
    difference is what the embedding costs the GPU, and where a faster stem must save it."""
    import timm
    import timm_supertoken  # noqa: F401
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.type == 'cuda'
    per_model = {}
    for name in ('vit_small_stconv', BASELINE):
        model = timm.create_model(name, num_classes=100, **args.model_kwargs).to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.model_batch_size, 3, args.img_size, args.img_size, device=args.device)
        y = torch.randint(0, 100, (args.model_batch_size,), device=args.device)
        for _ in range(3):
            _train_step(model, optimizer, x, y)
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            _train_step(model, optimizer, x, y)
            if cuda:
                torch.cuda.synchronize()
        # on a GPU the kernels themselves; on CPU (smoke runs) the operators
        events = [e for e in prof.key_averages() if not cuda or e.device_type == DeviceType.CUDA]
        key = 'device_time_total' if cuda else 'self_cpu_time_total'
        per_model[name] = {e.key: (getattr(e, key) / 1e3, e.count) for e in events}
    ours, base = per_model['vit_small_stconv'], per_model[BASELINE]
    rows = [(kernel, *ours.get(kernel, (0.0, 0)), *base.get(kernel, (0.0, 0))) for kernel in {**ours, **base}]
    rows.sort(key=lambda r: r[1] - r[3], reverse=True)
    return {'total': {name: sum(ms for ms, _ in kernels.values()) for name, kernels in per_model.items()},
            'rows': rows[:top]}


def _operator_lines(args, result: Dict[str, object]) -> List[str]:
    operator, copy_bw = result['rows'], result['copy_bw']
    impls = [i for i in ('fused', 'reference', 'compile(reference)') if any(f'{i} fwd' in r for r in operator)]
    fused = 'fused' if 'fused' in impls else impls[0]  # smoke runs have no fused op
    lines = [
        f'### Operator, grid {args.grid}, t = {args.iters}, channels_last input: median ms over {args.repeats} '
        'calls, L2 flushed before each', '',
        '| map | batch | dtype | ' + ' | '.join(f'{i} fwd' for i in impls) + ' | '
        + ' | '.join(f'{i} fwd+bwd' for i in impls) + ' | fused fwd+bwd speed-up vs ' + (' / '.join(impls[1:]) or '—')
        + f' | fused fwd: ideal bytes at % of copy bandwidth | fused fwd: GPU time in kernels '
        f'| {fused}: host time to issue fwd / fwd+bwd |',
        '|---|---:|---|' + '---:|' * (2 * len(impls) + 4),
    ]
    for r in operator:
        keys = [f'{i} fwd' for i in impls] + [f'{i} fwd+bwd' for i in impls]
        cells = [f'{r[k]:.3f}' if k in r else '—' for k in keys]
        speed = ' / '.join(f'{r[f"{i} fwd+bwd"] / r[f"{fused} fwd+bwd"]:.1f}×' if f'{i} fwd+bwd' in r else '—'
                           for i in impls[1:]) or '—'
        bandwidth = r['ideal bytes'] / (r[f'{fused} fwd'] * 1e-3) / copy_bw * 100
        kernels = f'{r["fused fwd kernels"]:.3f}' if 'fused fwd kernels' in r else '—'
        host = f'{r[f"{fused} fwd host"]:.3f} / {r[f"{fused} fwd+bwd host"]:.3f}'
        lines.append(f'| {r["map"]} | {r["batch"]} | {r["dtype"]} | ' + ' | '.join(cells)
                     + f' | {speed} | {bandwidth:.1f}% | {kernels} | {host} |')
    if 'compile(reference)' in impls and not args.compile_all_shapes:
        lines += ['', 'compile(reference) is timed at the target shape only (`--compile-all-shapes` for every one).']
    for r in operator:
        if f'{fused} fwd+bwd host profile' in r:
            lines += ['', f'{fused.capitalize()} fwd+bwd at B={r["batch"]} {r["map"]} {r["dtype"]}, host time by op '
                      '(torch.profiler, self time per call): ' + _host_ops(r[f'{fused} fwd+bwd host profile'])]
        if 'fused fwd+bwd host, direct / JIT' in r:
            ab = r['fused fwd+bwd host, direct / JIT']
            lines += ['', f'Host time to issue the fused fwd+bwd at B={r["batch"]} {r["map"]} {r["dtype"]}, ms per '
                      'round (median of its calls), rounds interleaved: launches seen before run through the '
                      f'compiled kernel\'s launcher ({", ".join(f"{v:.3f}" for v in ab["direct"])}; `DIRECT_LAUNCH` '
                      f'{ab["enabled"]}) against every launch through Triton\'s JIT '
                      f'({", ".join(f"{v:.3f}" for v in ab["jit"])}).']
        if 'fused fwd+bwd kernel split' in r:
            lines += ['', f'Fused fwd+bwd at B={r["batch"]} {r["map"]} {r["dtype"]}, GPU time by kernel (torch.profiler): '
                      + '; '.join(f'`{name[:60]}` {ms:.3f} ms in {n} launch{"es" if n > 1 else ""}'
                                  for name, (ms, n) in r['fused fwd+bwd kernel split'].items()) + '.']
            if r.get('fused fwd+bwd issue share'):
                lines += ['', 'Share of the GPU\'s issue rate (SMs × 4 × boost clock) each fused kernel achieved there: '
                          'its warp instructions (counted from its SASS as the kernel report counts them, for the '
                          'autotuned config) over its GPU time: ' + '; '.join(
                              f'`{name}` {share:.0%}' for name, share in r['fused fwd+bwd issue share'].items())
                          + '. Near 100% a kernel is bound by the instructions it issues.']
            if 'fused fwd+bwd issue share error' in r:
                lines += ['', f'The share of the issue rate could not be computed: {r["fused fwd+bwd issue share error"]}.']
    return lines + ['', f'Device-to-device copy bandwidth: {copy_bw / 1e12:.2f} TB/s.']


def _model_lines(args, models) -> List[str]:
    lines = [f'### Models, 224×224, batch {args.model_batch_size}, bf16 autocast: images/s, median of '
             f'{args.model_repeats} round-robin rounds of {args.model_steps} steps', '',
             f'A ratio is the median over the rounds of {BASELINE}\'s time over the model\'s in the same round '
             '(lowest–highest round in brackets).', '',
             'A training step\'s host time is the host\'s time to issue it with the GPU idle (median of 5); its GPU '
             'time, the time in its kernels (torch.profiler, one step). Where the host time reaches the GPU time the '
             'step is bound by the host, and the images/s measure the host\'s Python and launches: the ratio of GPU '
             'times is then the one a faster host would see.', '',
             '| variant | model | inference | training (AdamW step) | inference ratio | training ratio | '
             'training step: host ms / GPU ms | training ratio by GPU time |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    base_gpu = {r['variant']: r['train gpu ms'] for r in models if r['model'] == BASELINE}
    for r in models:
        gpu, base = r['train gpu ms'], base_gpu.get(r['variant'], 0.0)
        by_gpu = f'{base / gpu:.3f}×' if gpu and base else '—'
        lines.append(f'| {r["variant"]} | {r["model"]} | {r["infer"]:.0f} | {r["train"]:.0f} | '
                     f'{_ratio(r["infer ratios"])} | {_ratio(r["train ratios"])} | '
                     f'{r["train host ms"]:.1f} / {_ms_or_dash(gpu)} | {by_gpu} |')
    return lines


def _ms_or_dash(ms: float, digits: int = 1) -> str:
    """A profiled GPU time, or a dash where there is none to profile (a CPU smoke run)."""
    return f'{ms:.{digits}f}' if ms else '—'


def _host_ops(profile: Sequence[Tuple[str, float]]) -> str:
    """`Timer.host_profile`'s (op, µs) pairs as a sentence's list."""
    return '; '.join(f'`{name[:60]}` {us:.0f} µs' for name, us in profile) + '.'


def _ratio(per_round: Sequence[float]) -> str:
    return f'{statistics.median(per_round):.3f}× ({min(per_round):.2f}–{max(per_round):.2f})'


def _patch_embed_lines(args, patch_embed) -> List[str]:
    return [f'### vit_small_stconv `patch_embed` forward+backward, batch {args.model_batch_size}, bf16', '',
            'Event time, the host\'s time to issue it with the GPU idle, and the GPU time in its kernels '
            '(torch.profiler, one call): the target is about the event time, which is at least the larger of the '
            'other two.',
            '', '| variant | ms | host\'s time to issue it, ms | GPU time in kernels, ms |', '|---|---:|---:|---:|'] + \
        [f'| {k} | {ms:.2f} | {host:.2f} | {_ms_or_dash(gpu, 2)} |'
         for k, (ms, host, gpu, _) in patch_embed.items()] + \
        [line for k, (*_, kernels) in patch_embed.items() if kernels and k.startswith('eager') for line in (
            '', f'{k.capitalize()}, GPU ms by kernel (launches): ' + '; '.join(
                f'`{name[:70]}` {ms:.3f} ({n})' for name, (ms, n) in kernels) + '.')]


def _stem_lines(args, stem) -> List[str]:
    return [f'### vit_small_stconv `patch_embed` by stage: forward+backward ms, batch {args.model_batch_size}, '
            'bf16 autocast, each stage on its input in the model (in brackets: the host\'s time to issue it)', '',
            '| stage | (C, H, W) in → out | ms |', '|---|---|---:|'] + \
        [f"| {r['stage']} | {r['map']} | {r['ms']:.3f} ({r['host ms']:.3f}) |" for r in stem] + \
        [line for r in stem if 'host profile' in r for line in (
            '', f"{r['stage'].capitalize()} as built, host time by op (torch.profiler, self time per "
            "forward+backward): " + _host_ops(r['host profile']))]


def _iteration_lines(args, iterations) -> List[str]:
    return [f'### Throughput against t (paper Table 8: 766 → 718 img/s for t = 1 → 4), batch '
            f'{args.model_batch_size}, bf16', '',
            '| t | inference img/s | training img/s |', '|---:|---:|---:|'] + \
        [f'| {t} | {i:.0f} | {tr:.0f} |' for t, i, tr in iterations]


def _cuda_graph_lines(args, cuda_graphs: Union[List[Dict[str, object]], str]) -> List[str]:
    if isinstance(cuda_graphs, list):  # its rows are in the models table
        return ['`reduce-overhead` in the models table: `torch.compile(mode="reduce-overhead")`, the steps replayed '
                'as CUDA graphs.']
    return [f'vit_small_stconv under `torch.compile(mode="reduce-overhead")` (CUDA graphs): {cuda_graphs}.']


def _kernel_lines(args, kernels: Dict[str, object]) -> List[str]:
    total = kernels['total']
    return ['### GPU kernels where a vit_small_stconv training step spends more than a vit_small_patch16_224 one '
            '(eager, torch.profiler, one step each)', '',
            f"GPU time in kernels per step: vit_small_stconv {total['vit_small_stconv']:.2f} ms, "
            f"{BASELINE} {total[BASELINE]:.2f} ms. The trunks are the same, so the difference is the embedding's.", '',
            f'| kernel | vit_small_stconv ms (calls) | {BASELINE} ms (calls) | difference, ms |',
            '|---|---:|---:|---:|'] + \
        [f'| `{name[:90]}` | {ms:.3f} ({calls}) | {base_ms:.3f} ({base_calls}) | {ms - base_ms:+.3f} |'
         for name, ms, calls, base_ms, base_calls in kernels['rows']]


# (key, what it measures, how to run it, how to render it), most important first: a stage starts only while
# the time budget lasts, and the section is rewritten after every stage, so a run cut short keeps what it
# measured. The targets' stages come first, the GPU-bound ones (CUDA graphs, the kernel profile) before
# compiling four models, which took over 3 minutes on a slow host; the stem by stage and Table 8 (reproduce.py
# measures it too) last
STAGES: Tuple[Tuple[str, str, Callable, Callable], ...] = (
    ('operator', 'operator', bench_operator, _operator_lines),
    ('models', 'models, eager and channels_last', lambda a: bench_models(a, ['eager', 'channels_last']), None),
    ('patch_embed', 'vit_small_stconv `patch_embed` forward+backward', bench_patch_embed, _patch_embed_lines),
    ('cuda_graphs', 'vit_small_stconv and vit_small_patch16_224 under torch.compile(mode="reduce-overhead")',
     bench_cuda_graphs, _cuda_graph_lines),
    ('kernels', "GPU kernels of a training step against the baseline's", profile_step, _kernel_lines),
    ('models_compiled', 'models under torch.compile',
     lambda a: [] if a.skip_compile or a.smoke else bench_models(a, ['compile']), None),
    ('stem', 'vit_small_stconv `patch_embed` by stage', bench_stem, _stem_lines),
    ('iterations', 'throughput against t (Table 8)', bench_iterations, _iteration_lines),
)


def render(args, results: Dict[str, object], skipped: Sequence[str]) -> str:
    """The docs section from whichever stages ran; a stage that did not is named as skipped."""
    import timm
    import triton

    device = torch.cuda.get_device_name() if args.device.type == 'cuda' else cpu_name()
    lines = [
        SECTION, '',
        f'GPU: **{device}**; PyTorch {torch.__version__}, Triton {triton.__version__}, '
        f'timm {timm.__version__}, CUDA {torch.version.cuda}. Produced by `benchmarks/gpu_check.sh` '
        f'(`benchmarks/bench_supertoken.py`), with `torch.backends.cudnn.benchmark = True` as under timm\'s train.py.',
        '', TARGETS,
    ]
    graphed = results.get('cuda_graphs')
    models = results.get('models', []) + results.get('models_compiled', []) + \
        (graphed if isinstance(graphed, list) else [])
    for key, title, _, lines_of in STAGES:
        if key == 'models' and models:
            lines += [''] + _model_lines(args, models)
        elif key in results and lines_of is not None:
            lines += [''] + lines_of(args, results[key])
    if skipped:
        lines += ['', f'Not measured in this run (time budget of {args.budget_minutes:g} min spent): '
                  + '; '.join(skipped) + '.']
    return '\n'.join(lines) + '\n'


def write_section(args, section: str) -> None:
    """The rendered section as results/gpu_supertoken.json, its tables as rows, and the page rendered again."""
    setting, tables = tables_from_markdown(section)
    for table in tables:  # the targets' tables on the benchmarks page; every table stays in the result file
        table.on_page = (table.title or '').startswith(ON_PAGE)
    write_result(result_record(RESULT, SECTION.removeprefix('## '), tables, setting, device=args.device),
                 args.results_dir, args.page)


def main(argv: Sequence[str] = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print('bench_supertoken.py needs a CUDA GPU (the fused kernels are GPU-only); none found, no numbers written. '
              '--smoke runs the code paths on CPU', file=sys.stderr)
        return 2
    use_cudnn_benchmark()  # as timm's train.py: the targets are about training under it
    start = time.monotonic()
    results: Dict[str, object] = {}
    skipped: List[str] = []
    for key, title, run, _ in STAGES:
        minutes = (time.monotonic() - start) / 60
        if args.budget_minutes is not None and minutes >= args.budget_minutes:
            skipped.append(title)
            print(f'skipped: {title} ({minutes:.1f} of {args.budget_minutes:g} min spent)', flush=True)
            continue
        results[key] = run(args)
        if not args.smoke:
            write_section(args, render(args, results, skipped))
    section = render(args, results, skipped)
    if skipped and not args.smoke:  # stages skipped after the last one that ran are named only by this write
        write_section(args, section)
    if args.smoke:
        ran = 'every path ran' if not skipped else f'{len(skipped)} stage(s) skipped by the time budget'
        print(f'{section}\nsmoke run: {ran}; nothing written')
        return 0
    print(f'\n{section}\nwrote {args.results_dir / RESULT}.json and {args.page}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
