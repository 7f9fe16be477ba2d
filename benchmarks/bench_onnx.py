"""onnxruntime CPU throughput of vit_small_stconv against timm's vit_small_patch16_224, as results/onnx_cpu.json.

    python benchmarks/bench_onnx.py [--repeats 10] [--batch-sizes 8 1] [--threads N]

Both models are exported by `timm_supertoken.deploy.export_onnx` (dynamic batch, checked against eager), then
timed on onnxruntime's CPU provider (fp32, all graph optimisations, `intra_op_num_threads` = the core count)
round-robin in one process: each repeat visits every (batch size, model) pair once, starting from a rotating
model, so drift on a shared machine does not favour either. A measurement is the mean over enough calls to
feed `--images` images; the table gives the median and the fastest of the repeats (other jobs only ever add
time, so the fastest is the steadier estimate when the median is disturbed). The result file replaces the
last run's, and docs/benchmarks.md is rendered again.
"""
import argparse
import os
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort
import torch

import timm

from timm_supertoken.deploy import export_onnx

from docs_page import PAGE, RESULTS_DIR, Table, render_section, result_record, write_result

MODEL = 'vit_small_stconv'
BASELINE = 'vit_small_patch16_224'


def export_models(names: Sequence[str], folder: Path, img_size: int) -> Dict[str, Path]:
    """One dynamic-batch ONNX file per model (random weights: they do not change the cost of a dense forward)."""
    torch.manual_seed(0)
    return {name: export_onnx(timm.create_model(name, img_size=img_size), folder / f'{name}.onnx')
            for name in names}


def cpu_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def time_sessions(sessions: Dict[str, ort.InferenceSession], batch_sizes: Sequence[int], img_size: int,
                  repeats: int, images: int, warmup: int = 2) -> Dict[Tuple[str, int], List[float]]:
    """Images/s of every (model, batch size), one measurement per repeat, visited round-robin."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, img_size, img_size), dtype=np.float32) for b in batch_sizes}
    feeds = {(name, b): {s.get_inputs()[0].name: inputs[b]} for name, s in sessions.items() for b in batch_sizes}
    for (name, b), feed in feeds.items():
        for _ in range(warmup):
            sessions[name].run(None, feed)
    names = list(sessions)
    rates: Dict[Tuple[str, int], List[float]] = {key: [] for key in feeds}
    for r in range(repeats):
        for b in batch_sizes:
            calls = max(1, images // b)
            for name in names[r % len(names):] + names[:r % len(names)]:
                session, feed = sessions[name], feeds[name, b]
                start = time.perf_counter()
                for _ in range(calls):
                    session.run(None, feed)
                rates[name, b].append(calls * b / (time.perf_counter() - start))
    return rates


def throughput_table(rates: Dict[Tuple[str, int], List[float]], batch_sizes: Sequence[int]) -> Table:
    """One row per batch size: both models' images/s (median, fastest repeat) and their ratio."""
    rows = []
    for b in batch_sizes:
        base, model = rates[BASELINE, b], rates[MODEL, b]
        rows.append([b, statistics.median(base), max(base), statistics.median(model), max(model),
                     statistics.median(model) / statistics.median(base), max(model) / max(base)])
    return Table(
        columns=['batch', f'{BASELINE} img/s (median)', '(best)', f'{MODEL} img/s (median)', '(best)',
                 'ratio (median)', 'ratio (best)'],
        rows=rows,
        formats=[None, '{:.1f}', '{:.1f}', '{:.1f}', '{:.1f}', '{:.3f}×', '{:.3f}×'],
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=10, help='measurements per (model, batch size)')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[8, 1])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--images', type=int, default=8, help='images per measurement (batch 1: 8 calls)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='onnxruntime intra-op threads')
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.images < 1 or min(args.batch_sizes) < 1:
        parser.error('--repeats, --images and every --batch-sizes value must be >= 1')

    with tempfile.TemporaryDirectory() as folder:
        paths = export_models((BASELINE, MODEL), Path(folder), args.img_size)
        sessions = {name: cpu_session(path, args.threads) for name, path in paths.items()}
        load_before = os.getloadavg()
        rates = time_sessions(sessions, args.batch_sizes, args.img_size, args.repeats, args.images)
        load_after = os.getloadavg()
    table = throughput_table(rates, args.batch_sizes)
    load = f'{load_before[0]:.2f} before and {load_after[0]:.2f} after the timing'
    setting = [
        f'onnxruntime {metadata.version("onnxruntime")} CPU provider, fp32, {args.img_size}², '
        f'intra_op_num_threads={args.threads}; files from `timm_supertoken.deploy.export_onnx` (dynamic batch)',
        f'{args.repeats} round-robin repeats of both models at each batch, {args.images} images per measurement; '
        f'ratio = {MODEL} / {BASELINE}; 1-minute load average {load}',
    ]
    record = result_record('onnx_cpu', f'onnxruntime CPU throughput: {MODEL} vs {BASELINE}', [table],
                           setting=setting)
    write_result(record, args.results_dir, args.page)
    print(render_section(record))


if __name__ == '__main__':
    main()
