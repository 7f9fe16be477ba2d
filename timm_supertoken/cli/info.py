"""`timm-supertoken info`, also the bare command: what the package adds to timm, measured on this machine."""
import argparse
import time
from pathlib import Path

from ..figures import plot_super_tokens
from ..models.parameters import count_parameters, paper_parameter_markdown, parameter_rows
from ..throughput import BENCH_MODELS, benchmark_cpu, throughput_markdown
from .options import add_command, add_img_size, add_out, add_threads, print_preamble

__all__ = ['add_commands', 'cmd_info']


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter table, CPU throughput, clustering figure (the default command)."""
    start = time.perf_counter()
    print_preamble()
    five_modules, _ = count_parameters('vit_small_stconv', conv_modules=5)
    print(f'\nParameters (embedding = model.patch_embed). Paper Table 1\'s 0.09M for the proposed embedding '
          f'matches five conv modules (conv_modules=5: {five_modules:,});\n'
          f'its Table 5 lists six, our default. Paper totals are for ImageNet-100 (100 classes) with mlp_ratio=3.')
    print(paper_parameter_markdown(parameter_rows(BENCH_MODELS)))

    if not args.no_bench:
        print(f'\nCPU inference, fp32, batch {args.batch_size}, {args.img_size}×{args.img_size}, '
              f'median of {args.repeats} interleaved repeats')
        results = benchmark_cpu(batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats)
        print(throughput_markdown(results))

    if not args.no_plot:
        path = plot_super_tokens(Path(args.out), img_size=args.img_size)
        print(f'\nwrote {path}')
    print(f'\ndone in {time.perf_counter() - start:.1f} s')
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `info`."""
    p = add_command(subparsers, cmd_info)
    p.add_argument('--batch-size', type=int, default=8, help='benchmark batch size (default 8)')
    p.add_argument('--repeats', type=int, default=5, help='interleaved timing repeats, median taken (default 5)')
    add_threads(p)
    add_img_size(p, 224, help='image side for benchmark and figure (default 224)')
    add_out(p, './timm-supertoken-out', help='folder for the figure')
    p.add_argument('--no-bench', action='store_true', help='skip the throughput measurement')
    p.add_argument('--no-plot', action='store_true', help='skip the figure')
