"""Fine-tune Hub weights on a new label set: scikit-learn's digits (8x8, upsampled), a few steps on CPU.

    python examples/finetune_from_hub.py [hf-hub:ORG/NAME | local-dir:PATH] [--steps 10]

The head is reset to 10 classes (num_classes=10) and the position embedding resampled to 48x48 (img_size=48)
while loading. Without a source, a freshly initialised vit_small_stconv is exported to a temporary folder
first, so the example runs offline; with published weights, pass hf-hub:ORG/NAME. From random weights a few
steps only show the loop working (the stem's BatchNorm statistics are still settling), not a useful accuracy.
"""
import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits

import timm
from timm_supertoken.hub import export, load_model

IMG_SIZE = 48


def digits(mean, std):
    """Digits as normalised 3-channel IMG_SIZE images, split 80/20."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return (x[perm[:split]], y[perm[:split]]), (x[perm[split:]], y[perm[split:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('source', nargs='?', default=None, help='hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=16)
    args = parser.parse_args()

    source = args.source
    if source is None:
        work = Path(tempfile.mkdtemp(prefix='timm-supertoken-'))
        save_file(timm.create_model('vit_small_stconv').state_dict(), work / 'untrained.safetensors')
        source = f'local-dir:{export(work / "untrained.safetensors", work / "export", model_name="vit_small_stconv")}'

    torch.manual_seed(0)
    model = load_model(source, num_classes=10, img_size=IMG_SIZE)
    cfg = timm.data.resolve_model_data_config(model)
    (x_train, y_train), (x_test, y_test) = digits(cfg['mean'], cfg['std'])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)

    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(y_train), (args.batch_size,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f'step {step:3d}  loss {loss.item():.3f}')

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f'{source}: held-out digits accuracy after {args.steps} steps: {accuracy:.1%} (chance 10%)')


if __name__ == '__main__':
    main()
