"""float16 autocast, the default of many inference stacks and timm's `--amp-dtype float16`, on whole models.

Each embedding runs forward and backward under fp16 autocast and is held to the same model in fp32: on the
CPU through the reference operator, on CUDA through the fused kernels (a GPU is required for that path).

Tolerances, as relative errors ‖fp16 − fp32‖ / ‖fp32‖: fp16 rounds to 2⁻¹¹ ≈ 4.9e-4, so logits after an
embedding and two blocks may drift by a few units of that (observed ≤ 1.8e-3; allowed 5e-3). Gradients
that flow back through a training-mode BatchNorm lose more: its backward subtracts batch means of the
upstream gradient, a cancellation over B·H·W values per channel, compounded over EarlyConv's four Conv-BN
stages (observed ≤ 3.4e-2 for a whole embedding and ≤ 5.1e-2 for one tensor, where bf16 loses 1.5e-1;
allowed 6e-2 and 0.1). A wrong cast, an overflow or a missing op shows as inf, NaN or an error of order 1.
"""
from typing import Dict, Tuple

import pytest
import torch

import timm

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason='the fused kernels need a CUDA GPU'))]
EMBEDDINGS = ('patch', 'convembed', 'stconv')
LOGITS_RTOL, EMBED_GRAD_RTOL, TENSOR_GRAD_RTOL = 5e-3, 6e-2, 0.1


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _step(embedding: str, device: str, autocast: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Logits and embedding gradients of one training step from a fixed initialisation and batch."""
    torch.manual_seed(0)
    model = timm.create_model(f'vit_small_{embedding}', num_classes=10, depth=2, img_size=64).to(device).train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=generator).to(device)
    y = torch.randint(0, 10, (4,), generator=generator).to(device)
    with torch.autocast(device, dtype=torch.float16, enabled=autocast):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = {name: p.grad for name, p in model.patch_embed.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('embedding', EMBEDDINGS)
def test_fp16_autocast_forward_backward_matches_fp32(embedding: str, device: str) -> None:
    reference_logits, reference_grads = _step(embedding, device, autocast=False)
    logits, grads = _step(embedding, device, autocast=True)
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    assert _relative(logits, reference_logits) <= LOGITS_RTOL
    assert all(torch.isfinite(g).all() for g in grads.values())
    flat = torch.cat([g.float().flatten() for g in grads.values()])
    reference_flat = torch.cat([g.flatten() for g in reference_grads.values()])
    assert _relative(flat, reference_flat) <= EMBED_GRAD_RTOL
    worst = max((_relative(grads[n], reference_grads[n]), n) for n in grads)
    assert worst[0] <= TENSOR_GRAD_RTOL, worst
