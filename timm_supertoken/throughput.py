"""CPU inference throughput of the three embeddings against timm's ViT-S/16, measured side by side.

Shared by `timm-supertoken info` and `benchmarks/bench_cpu.py`, so the quick check and the published
table (docs/benchmarks.md) come from the same code. Models are timed round-robin in one process,
each repeat visiting every model once, and the median over repeats is reported: on a shared, noisy
machine this keeps drift (other jobs, thermal state) from favouring whichever model ran first or last.
"""
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import timm

from .models import MODEL_NAMES

__all__ = ['BASELINE', 'BENCH_MODELS', 'benchmark_cpu', 'time_models', 'throughput_markdown']

BASELINE = 'vit_small_patch16_224'
BENCH_MODELS = (BASELINE,) + MODEL_NAMES


def _create(name: str, img_size: int) -> nn.Module:
    """An eval-mode, randomly initialised model (weights do not change the cost of a dense forward)."""
    return timm.create_model(name, img_size=img_size).eval()


def _seconds(fn: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one call, waiting for queued GPU work on both ends."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


@torch.inference_mode()
def benchmark_cpu(
        model_names: Sequence[str] = BENCH_MODELS,
        batch_size: int = 8,
        img_size: int = 224,
        repeats: int = 5,
        warmup: int = 1,
        threads: Optional[int] = None,
        baseline: str = BASELINE,
) -> Dict[str, Dict[str, float]]:
    """Median fp32 CPU inference throughput of several timm models, timed in one interleaved run.

    Each repeat times, for every model in turn (the starting model rotates between repeats), one
    whole forward and one call of `model.patch_embed` alone on the same batch.

    Returns, per model name: `img_per_s` (batch / median forward time), `ms_per_batch`, `embed_ms`
    (median patch_embed time), `embed_share` (embed_ms / ms_per_batch), `ratio` (img_per_s over that
    of `baseline`, NaN when the baseline is not among `model_names`), and `best_ms_per_batch` /
    `best_ratio`, the same from the fastest repeat: other jobs on a shared machine only ever add time,
    so the minimum is the steadier estimate of a model's own cost when the median is disturbed.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    models = {name: _create(name, img_size) for name in model_names}
    x = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    return time_models(models, x, repeats=repeats, warmup=warmup, baseline=baseline)


@torch.inference_mode()
def time_models(models: Dict[str, nn.Module], x: torch.Tensor, repeats: int = 5, warmup: int = 1,
                baseline: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Interleaved timing of built models on one batch x (any device); the statistics of `benchmark_cpu`.

    baseline defaults to the first model.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')
    batch_size = x.shape[0]
    # models without a token embedding (CNNs) get NaN embedding times
    embeds = {name: getattr(model, 'patch_embed', None) for name, model in models.items()}
    for name, model in models.items():  # first calls pay for allocator growth and kernel selection
        for _ in range(warmup):
            model(x)
            if embeds[name] is not None:
                embeds[name](x)

    names = list(models)
    forward_s: Dict[str, List[float]] = {name: [] for name in names}
    embed_s: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            forward_s[name].append(_seconds(models[name], x))
            embed_s[name].append(_seconds(embeds[name], x) if embeds[name] is not None else float('nan'))

    results: Dict[str, Dict[str, float]] = {}
    for name in names:
        fwd, emb = statistics.median(forward_s[name]), statistics.median(embed_s[name])
        results[name] = {
            'img_per_s': batch_size / fwd,
            'ms_per_batch': fwd * 1e3,
            'embed_ms': emb * 1e3,
            'embed_share': emb / fwd,
            'best_ms_per_batch': min(forward_s[name]) * 1e3,
        }
    base = results.get(baseline if baseline is not None else names[0],
                       {'ms_per_batch': float('nan'), 'best_ms_per_batch': float('nan')})
    for stats in results.values():
        stats['ratio'] = base['ms_per_batch'] / stats['ms_per_batch']
        stats['best_ratio'] = base['best_ms_per_batch'] / stats['best_ms_per_batch']
    return results


def throughput_markdown(results: Dict[str, Dict[str, float]], baseline: str = BASELINE) -> str:
    """The benchmark result as a Markdown table, the one format both the CLI and docs print."""
    lines = [
        f'| model | img/s (median) | ms / batch | ratio to {baseline} | embedding ms | embedding share '
        '| fastest repeat: ms / batch | fastest repeat: ratio |',
        '|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['img_per_s']:.2f} | {s['ms_per_batch']:.1f} | {s['ratio']:.3f}× "
            f"| {s['embed_ms']:.1f} | {s['embed_share']:.1%} | {s['best_ms_per_batch']:.1f} | {s['best_ratio']:.3f}× |")
    return '\n'.join(lines)
