"""Export a checkpoint to timm's Hub layout, load it back, and dry-run its push.

    python examples/export_and_push.py [CHECKPOINT] [--model NAME] [--out DIR] [--repo-id ORG/NAME]

CHECKPOINT is a timm train.py checkpoint (.pth.tar), a state dict (.pth) or a .safetensors file. Without one,
a freshly initialised model's weights are saved first so that the example runs anywhere, offline. Publishing
for real is the same `push` without `dry_run=True` (README, "Weights on the Hub").
"""
import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import timm
from timm_supertoken.hub import export, load_model, push


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', nargs='?', default=None)
    parser.add_argument('--model', default='vit_small_stconv', help='architecture, for checkpoints that do not name it')
    parser.add_argument('--out', default=None, help='export folder (default: a temporary one)')
    parser.add_argument('--repo-id', default=None, help='ORG/NAME (default: $TIMM_SUPERTOKEN_HUB_ORG/architecture)')
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix='timm-supertoken-'))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / f'{args.model}-untrained.safetensors'
        save_file(timm.create_model(args.model).state_dict(), checkpoint)
    out = export(checkpoint, args.out or work / 'export', model_name=args.model, repo_id=args.repo_id)
    print(f'exported to {out}: ' + ', '.join(p.name for p in sorted(out.iterdir())))

    model = load_model(f'local-dir:{out}')  # what timm.create_model('hf-hub:ORG/NAME', pretrained=True) will give
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    print(f'reloaded {model.pretrained_cfg["architecture"]}: logits {tuple(logits.shape)}')

    print('dry run of the push, nothing is uploaded:')
    for name, size in push(out, args.repo_id, dry_run=True).files:
        print(f'  {name}  {size:,} bytes')


if __name__ == '__main__':
    main()
