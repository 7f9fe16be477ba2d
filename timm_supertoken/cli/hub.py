"""`timm-supertoken export` and `timm-supertoken push`: the command-line face of `timm_supertoken.hub`."""
import argparse
from typing import Any, Dict

from ..hub import HUB_ORG_ENV, export, hub_org, push
from .options import add_command, add_model_kwargs

__all__ = ['add_commands', 'cmd_export', 'cmd_push']


def _add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by export and push: how to read a checkpoint and describe its weights."""
    parser.add_argument('--model', default=None,
                        help='architecture (default: the checkpoint\'s train.py --model); needed for plain state dicts')
    parser.add_argument('--no-ema', dest='use_ema', action='store_false',
                        help='use a train.py checkpoint\'s state_dict rather than its state_dict_ema')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow unpickling arbitrary Python objects (only for files you trust)')
    parser.add_argument('--num-classes', type=int, default=None,
                        help='classes of the checkpoint\'s head (default: train.py --num-classes, '
                             'else the head\'s rows)')
    add_model_kwargs(parser, default={},
                     help='architecture kwargs the checkpoint was trained with, e.g. mlp_ratio=3 conv_modules=4')
    parser.add_argument('--dataset', default=None, help='training dataset named on the model card, e.g. imagenet-100')
    parser.add_argument('--label-names', default=None,
                        help='class names: a JSON list or a text file with one name per line')


def _checkpoint_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The keyword arguments of hub.export and hub.push that _add_checkpoint_options declares."""
    return dict(model_name=args.model, use_ema=args.use_ema, trust_pickle=args.trust_pickle,
                num_classes=args.num_classes, model_args=args.model_kwargs, dataset=args.dataset,
                label_names=args.label_names)


def cmd_export(args: argparse.Namespace) -> int:
    """Checkpoint -> timm Hub layout (config.json, model.safetensors, README.md).

    Reads a timm train.py checkpoint (.pth.tar), a state dict (.pth) or a .safetensors file and writes the
    folder that timm.create_model("local-dir:OUT_DIR", pretrained=True) loads and push uploads.
    """
    out = export(args.checkpoint, args.out_dir, repo_id=args.repo_id, **_checkpoint_options(args))
    for path in sorted(out.iterdir()):
        print(f'{path}  {path.stat().st_size:,} bytes')
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a checkpoint or exported folder to the Hugging Face Hub (safetensors only).

    Uploads through timm's push_to_hf_hub. The token is huggingface_hub's (HF_TOKEN or `hf auth login`);
    HF_ENDPOINT selects another Hub endpoint.
    """
    result = push(args.source, args.repo_id, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, dry_run=args.dry_run, **_checkpoint_options(args))
    if args.dry_run:
        print(f'dry run: nothing uploaded; would upload to {result.repo_id} '
              f'(revision {args.revision or "main"}; README.md only if the repo has none):')
        for name, size in result.files:
            print(f'  {name}  {size:,} bytes')
    else:
        print(f'pushed: {result}')
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `export` and `push`."""
    p = add_command(subparsers, cmd_export)
    p.add_argument('checkpoint', help='train.py checkpoint, state dict .pth or .safetensors')
    p.add_argument('out_dir', help='folder to write')
    p.add_argument('--repo-id', default=None,
                   help=f'repo named on the model card (default: ${HUB_ORG_ENV} or {hub_org()}, /architecture)')
    _add_checkpoint_options(p)

    p = add_command(subparsers, cmd_push)
    p.add_argument('source', metavar='CHECKPOINT_OR_DIR', help='a checkpoint file, or a folder written by export')
    p.add_argument('repo_id', nargs='?', default=None,
                   help=f'ORG/NAME (default: ${HUB_ORG_ENV} or {hub_org()}, /architecture)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    p.add_argument('--dry-run', action='store_true', help='print the files and sizes, upload nothing')
    p.add_argument('--commit-message', default='Add model', help='commit message (default: "Add model")')
    _add_checkpoint_options(p)
