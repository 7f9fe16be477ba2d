"""Weights on the Hugging Face Hub: export, push and load our models in timm's own Hub layout.

The layout is timm's (`config.json` with `architecture` + `pretrained_cfg`, `model.safetensors`, `README.md`),
written by timm's `save_for_hf` / `push_to_hf_hub` / `generate_readme`, so the weights load with plain timm:

    timm.create_model('hf-hub:ORG/NAME', pretrained=True)
    timm.create_model('local-dir:PATH', pretrained=True)

What this module adds: reading timm train.py checkpoints (EMA weights by default), plain state dicts and
safetensors files without ever unpickling arbitrary objects, strict architecture checks with errors that
name the file, a model card with the paper, recipe and measured metrics, and `load_model`, which validates a
Hub folder or repo before handing it to timm (timm itself reports a corrupt file or a config that does not
match the weights with an error from deep inside safetensors or the model constructor).

The default Hub organisation is `timm-supertoken`; set `TIMM_SUPERTOKEN_HUB_ORG` to publish elsewhere.
"""
import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import timm
from timm.models import clean_state_dict, parse_model_name, push_to_hf_hub, save_for_hf
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, download_from_hf, generate_readme

from .models import REGISTERED_MODEL_NAMES
from .checkpoint import CheckpointError, load_checkpoint
from .layers.embeds import ConvStemEmbed, PatchLayerNormEmbed, SuperTokenConvEmbed
from .references import SUPER_TOKEN_PAPER, TIMM_CITATION

__all__ = [
    'HUB_ORG_ENV', 'DEFAULT_HUB_ORG', 'CheckpointError', 'Checkpoint', 'DryRun', 'hub_org', 'default_repo_id',
    'read_checkpoint', 'model_from_checkpoint', 'model_card', 'export', 'push', 'load_model',
]

HUB_ORG_ENV = 'TIMM_SUPERTOKEN_HUB_ORG'
DEFAULT_HUB_ORG = 'timm-supertoken'
CONFIG_NAME = 'config.json'
HUB_PREFIXES = ('hf-hub:', 'local-dir:')  # timm model names that point at exported weights

# the model card's description of each embedding, by its class (the same at every model size)
EMBEDDINGS = {
    PatchLayerNormEmbed: 'LayerNorm patch embedding (16x16 patches -> LayerNorm -> Linear -> LayerNorm, paper Table 3)',
    ConvStemEmbed: 'EarlyConv convolutional stem (3x3 stride-2 convs with D/8, D/4, D/2, D channels, 1x1 conv)',
    SuperTokenConvEmbed: 'super-token convolutional embedding (Conv3x3-GELU-BatchNorm stem, super-token '
                         'clustering, Linear; paper Table 5)',
}

# train.py arguments worth reporting as the training recipe, in the order shown on the model card
RECIPE_ARGS = (
    'epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched', 'warmup_epochs', 'min_lr', 'smoothing',
    'mixup', 'cutmix', 'aa', 'reprob', 'drop_path', 'model_ema', 'model_ema_decay', 'amp', 'seed',
)
# train.py arguments that describe preprocessing, in timm's resolve_data_config vocabulary
DATA_ARGS = ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'interpolation', 'crop_mode')


@dataclass
class Checkpoint:
    """A state dict and what its file says about how it was trained."""
    state_dict: Dict[str, torch.Tensor]
    path: Path
    weights: str = 'file'  # which entry of the file was used: 'state_dict_ema', 'state_dict', 'model' or 'file'
    arch: Optional[str] = None
    args: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    metric: Optional[float] = None


def hub_org() -> str:
    """The Hub organisation our weights are published under, configurable without code changes."""
    return os.environ.get(HUB_ORG_ENV) or DEFAULT_HUB_ORG


def default_repo_id(model_name: str) -> str:
    """`ORG/MODEL`, the repo an export or push of `model_name` goes to unless told otherwise."""
    return f'{hub_org()}/{model_name}'


def read_checkpoint(path: Union[str, Path], use_ema: bool = True, trust_pickle: bool = False) -> Checkpoint:
    """Read a train.py checkpoint, a plain state dict or a safetensors file, never unpickling untrusted objects."""
    path = Path(path)
    if path.suffix == '.safetensors' and path.is_file():
        try:
            return Checkpoint(load_file(path, device='cpu'), path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e

    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a state dict or a train.py checkpoint')
    weights = 'file'
    for key in (('state_dict_ema',) if use_ema else ()) + ('state_dict', 'model'):
        if isinstance(obj.get(key), Mapping):
            weights = key
            break
    state_dict = obj[weights] if weights != 'file' else obj
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'{path}: entry {weights!r} is not a state dict (non-tensor keys: {not_tensors[:5]})')
    args = obj.get('args') if weights != 'file' else None
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    metric = obj.get('metric') if weights != 'file' else None
    return Checkpoint(
        state_dict=clean_state_dict(dict(state_dict)),
        path=path,
        weights=weights,
        # train.py writes its --model as 'arch' only when it saved args; otherwise 'arch' is the class name
        arch=(args.get('model') or obj.get('arch')) if weights != 'file' else None,
        args=args,
        epoch=obj.get('epoch') if weights != 'file' else None,
        metric=float(metric) if metric is not None else None,
    )


def _check_architecture(arch: Optional[str], source: str) -> str:
    """Only our models: anything else is not ours to export, push or vouch for."""
    ours = ', '.join(REGISTERED_MODEL_NAMES)
    if not arch:
        raise CheckpointError(f'{source}: the file does not name its architecture; pass --model (one of {ours})')
    if arch not in REGISTERED_MODEL_NAMES:
        raise CheckpointError(f'{source}: architecture {arch!r} is not a timm-supertoken model ({ours})')
    return arch


def _check_shapes(
        expected: Mapping[str, Sequence[int]],
        found: Mapping[str, Sequence[int]],
        source: str,
        described: str,
) -> None:
    """Compare names and shapes up front, so a mismatch is reported as a whole and names the file."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k} {tuple(found[k])} vs {tuple(v)}' for k, v in expected.items()
              if k in found and tuple(found[k]) != tuple(v)]
    if missing or unexpected or shapes:
        problems = []
        for what, items in (('missing', missing), ('unexpected', unexpected), ('shape file vs model', shapes)):
            if items:
                more = f' (+{len(items) - 5} more)' if len(items) > 5 else ''
                problems.append(f'{what}: {", ".join(items[:5])}{more}')
        raise CheckpointError(f'{source}: weights do not match {described}: ' + '; '.join(problems))


def _num_classes(checkpoint: Checkpoint) -> int:
    """Class count of the weights themselves: train.py's --num-classes, else the head's rows (0: no head)."""
    if checkpoint.args.get('num_classes'):
        return int(checkpoint.args['num_classes'])
    head = checkpoint.state_dict.get('head.weight')
    return int(head.shape[0]) if head is not None else 0


def _exported_architecture(name: str, checkpoint_path: Path) -> Tuple[str, Dict[str, Any]]:
    """Architecture and model kwargs of the `local-dir:`/`hf-hub:` export a checkpoint was fine-tuned from.

    train.py records only the name it was given (`--model local-dir:EXPORT`); the architecture and kwargs such
    as mlp_ratio=3 are in that export's config.json, so reading them spares the user from repeating them. The
    class count is left out: a fine-tuned head is sized by the checkpoint itself.
    """
    source, model_id = parse_model_name(name)
    try:
        config = _read_config(source, model_id)
    except CheckpointError as e:
        raise CheckpointError(f'{checkpoint_path}: trained from {name}, whose {CONFIG_NAME} cannot be read ({e}); '
                              f'pass --model and --model-kwargs instead') from e
    model_args = {k: v for k, v in (config.get('model_args') or {}).items() if k != 'num_classes'}
    return config.get('architecture'), model_args


def model_from_checkpoint(
        checkpoint: Checkpoint,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        model_args: Optional[Dict[str, Any]] = None,
) -> torch.nn.Module:
    """Build the architecture the checkpoint was trained as and load its weights strictly."""
    arch = model_name or checkpoint.arch
    args: Dict[str, Any] = {}
    if arch and arch.startswith(HUB_PREFIXES):
        arch, args = _exported_architecture(arch, checkpoint.path)
    arch = _check_architecture(arch, str(checkpoint.path))
    num_classes = _num_classes(checkpoint) if num_classes is None else num_classes
    args.update(checkpoint.args.get('model_kwargs') or {})
    # train.py passes its --input-size / --img-size to fixed-size models as img_size
    if checkpoint.args.get('input_size'):
        args['img_size'] = tuple(checkpoint.args['input_size'][1:])
    elif checkpoint.args.get('img_size'):
        args['img_size'] = checkpoint.args['img_size']
    args.update(model_args or {})
    try:
        model = timm.create_model(arch, num_classes=num_classes, **args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{checkpoint.path}: cannot build {arch} with {args}: {e}') from e
    described = f'{arch}(num_classes={num_classes}' + ''.join(f', {k}={v!r}' for k, v in args.items()) + ')'
    _check_shapes({k: v.shape for k, v in model.state_dict().items()},
                  {k: v.shape for k, v in checkpoint.state_dict.items()}, str(checkpoint.path), described)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()


def _training_record(checkpoint: Checkpoint, dataset: Optional[str]) -> Dict[str, Any]:
    """Provenance kept in config.json (timm ignores unknown keys), so `push DIR` rebuilds the same card."""
    args = checkpoint.args
    record: Dict[str, Any] = {'weights': checkpoint.weights, 'source_file': checkpoint.path.name}
    dataset = dataset or args.get('dataset')
    if dataset:
        record['dataset'] = dataset
    if checkpoint.epoch is not None:
        record['epoch'] = checkpoint.epoch
    if checkpoint.metric is not None:
        record['metrics'] = {args.get('eval_metric', 'top1'): checkpoint.metric}
    recipe = {k: args[k] for k in RECIPE_ARGS if args.get(k) is not None and args.get(k) != ''}
    if recipe:
        record['recipe'] = recipe
    return record


def model_card(model: torch.nn.Module, repo_id: str, training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The card dict timm's generate_readme turns into README.md: model, sizes, data, recipe, metrics, citations."""
    arch = model.pretrained_cfg['architecture']
    training = training or {}
    size = tuple(model.patch_embed.img_size)
    weights = {'state_dict_ema': 'the EMA weights', 'state_dict': 'the (non-EMA) model weights'}
    source = weights.get(training.get('weights'), 'the weights')
    epoch = f' after epoch {training["epoch"]}' if 'epoch' in training else ''
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': f'`{arch}`: timm VisionTransformer ({len(model.blocks)} blocks, width {model.embed_dim}, '
                        f'{model.blocks[0].attn.num_heads} heads) with the {EMBEDDINGS[type(model.patch_embed)]}',
        'Model Stats': {
            'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}',
            'Embedding params': f'{sum(p.numel() for p in model.patch_embed.parameters()):,}',
            'Image size': f'{size[0]} x {size[1]}',
            'Classes': model.num_classes,
        },
        'Papers': {SUPER_TOKEN_PAPER.title: SUPER_TOKEN_PAPER.url},
    }
    # the kwargs that change the architecture; size, classes, channels and pooling are shown elsewhere
    arch_args = {k: v for k, v in getattr(model, '_model_args', {}).items()
                 if k not in ('num_classes', 'img_size', 'in_chans', 'global_pool')}
    if arch_args:
        details['Model args'] = arch_args
    if 'dataset' in training:
        details['Dataset'] = training['dataset']
    if 'recipe' in training:
        details['Training recipe (timm train.py)'] = training['recipe']
    if 'metrics' in training:
        details['Metrics (validation, recorded by train.py)'] = {
            k: f'{v:.3f}' for k, v in training['metrics'].items()}
    usage = (
        '```python\n'
        'import timm  # with `pip install timm-supertoken`, timm finds the model by itself\n\n'
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transforms = timm.data.create_transform(**data_config, is_training=False)\n'
        "# fine-tune on another label set: timm.create_model(..., pretrained=True, num_classes=10)\n"
        '```'
    )
    return {
        'tags': ['image-classification', 'timm', 'timm-supertoken', 'vision-transformer', 'super-token'],
        'library_name': 'timm',
        'license': 'apache-2.0',
        'description': f'A `{arch}` model from *{SUPER_TOKEN_PAPER.title}* ({SUPER_TOKEN_PAPER.year}), packaged with timm-supertoken; '
                       f'{source} of a timm train.py run{epoch}.',
        'details': details,
        'usage': usage,
        'citation': [SUPER_TOKEN_PAPER.bibtex('lee2024supertoken'), TIMM_CITATION],
    }


def _read_label_names(path: Union[str, Path], num_classes: int) -> List[str]:
    """Class names from a JSON list or a text file with one name per line, as many as the head has rows."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read label names ({e})') from e
    names = json.loads(text) if path.suffix == '.json' else [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise CheckpointError(f'{path}: {len(names)} label names for a {num_classes}-class head')
    return names


@dataclass
class DryRun:
    """What `push(..., dry_run=True)` would upload: the repo it resolved and each file's (name, size in bytes)."""
    repo_id: str
    files: List[Tuple[str, int]]


@dataclass
class _Staged:
    """Everything timm's save_for_hf / push_to_hf_hub need for one model."""
    model: torch.nn.Module
    repo_id: str
    model_config: Dict[str, Any]
    data_config: Optional[Dict[str, Any]]
    card: Dict[str, Any]


def _stage_checkpoint(
        checkpoint: Union[str, Path],
        repo_id: Optional[str] = None,
        model_name: Optional[str] = None,
        use_ema: bool = True,
        trust_pickle: bool = False,
        num_classes: Optional[int] = None,
        model_args: Optional[Dict[str, Any]] = None,
        dataset: Optional[str] = None,
        label_names: Optional[Union[str, Path]] = None,
) -> _Staged:
    """A checkpoint file turned into a strictly loaded model plus its Hub config and card."""
    ckpt = read_checkpoint(checkpoint, use_ema=use_ema, trust_pickle=trust_pickle)
    model = model_from_checkpoint(ckpt, model_name, num_classes, model_args)
    repo_id = repo_id or default_repo_id(model.pretrained_cfg['architecture'])
    training = _training_record(ckpt, dataset)
    model_config: Dict[str, Any] = {'training': training}
    if label_names:
        model_config['label_names'] = _read_label_names(label_names, model.num_classes)
    data_config = {k: ckpt.args[k] for k in DATA_ARGS if ckpt.args.get(k) is not None} or None
    return _Staged(model, repo_id, model_config, data_config, model_card(model, repo_id, training))


def _stage_folder(folder: Path, repo_id: Optional[str] = None) -> _Staged:
    """An exported folder, validated and reloaded, with the config extras and card it was exported with."""
    model = load_model(f'local-dir:{folder}')
    config = json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8'))
    repo_id = repo_id or default_repo_id(config['architecture'])
    model_config = {k: config[k] for k in ('training', 'label_names', 'label_descriptions') if k in config}
    # timm's loader moved the labels into pretrained_cfg; they go back to the top level, where export put them
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in model_config}
    return _Staged(model, repo_id, model_config, None, model_card(model, repo_id, config.get('training')))


def _save(staged: _Staged, out_dir: Path) -> Path:
    """Write the three files exactly as timm's push_to_hf_hub stages them (safetensors only)."""
    save_for_hf(staged.model, str(out_dir), model_config=staged.model_config, data_config=staged.data_config,
                safe_serialization=True)
    readme = generate_readme(staged.card, staged.repo_id.split('/')[-1])
    (out_dir / 'README.md').write_text(readme, encoding='utf-8')
    # safetensors writes through a private (0600) temporary file: give the weights the umask-derived mode
    # that config.json and README.md got, so an export folder is as readable as any other
    (out_dir / HF_SAFE_WEIGHTS_NAME).chmod((out_dir / CONFIG_NAME).stat().st_mode & 0o777)
    return out_dir


def export(checkpoint: Union[str, Path], out_dir: Union[str, Path], **options: Any) -> Path:
    """Turn a checkpoint into timm's Hub layout in `out_dir`; options as for `push` (model_name, use_ema, ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(_stage_checkpoint(checkpoint, **options), out_dir)


def push(
        source: Union[str, Path],
        repo_id: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Add model',
        dry_run: bool = False,
        **options: Any,
) -> Union[str, DryRun]:
    """Publish a checkpoint or an exported folder through timm's push_to_hf_hub, safetensors only.

    The token is huggingface_hub's (HF_TOKEN or a cached login), the endpoint HF_ENDPOINT's. `dry_run`
    stages the files and returns a `DryRun` (the repo id and each file's size) without contacting the Hub;
    otherwise returns the commit URL. timm adds README.md only when the repo does not have one yet.
    """
    source = Path(source)
    staged = _stage_folder(source, repo_id) if source.is_dir() else _stage_checkpoint(source, repo_id, **options)
    if dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            _save(staged, Path(tmp))
            return DryRun(staged.repo_id, [(p.name, p.stat().st_size) for p in sorted(Path(tmp).iterdir())])
    commit = push_to_hf_hub(
        staged.model,
        staged.repo_id,
        commit_message=commit_message,
        revision=revision,
        private=private,
        model_config=staged.model_config,
        model_card=staged.card,
        data_config=staged.data_config,
        safe_serialization=True,
    )
    return str(commit.commit_url)


def _fetch(source: str, model_id: str, filename: str) -> Path:
    """Local path of one file of a local-dir: folder or an hf-hub: repo, or an error naming it."""
    if source == 'local-dir':
        path = Path(model_id) / filename
        if not path.is_file():
            raise CheckpointError(f'{path}: missing')
        return path
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    try:
        return Path(download_from_hf(model_id, filename))
    except (HfHubHTTPError, EntryNotFoundError) as e:
        raise CheckpointError(f'hf-hub:{model_id}/{filename}: cannot download it ({str(e).splitlines()[0]})') from e


def _read_config(source: str, model_id: str) -> Dict[str, Any]:
    """config.json of a local-dir: folder or an hf-hub: repo, parsed, or an error naming it."""
    config_file = _fetch(source, model_id, CONFIG_NAME)
    try:
        return json.loads(config_file.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{source}:{model_id}/{CONFIG_NAME}: not valid JSON ({e})') from e


def load_model(name: Union[str, Path], pretrained: bool = True, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model for `hf-hub:`/`local-dir:` weights, after checking config and weights agree.

    A bare path means `local-dir:`. kwargs go to timm.create_model (num_classes resets the head, img_size
    resamples the position embedding).
    """
    name = str(name)
    source, model_id = parse_model_name(name) if ':' in name.split('/')[0] else ('local-dir', name)
    if source not in ('hf-hub', 'local-dir'):
        raise CheckpointError(f'{name}: expected hf-hub:ORG/NAME, local-dir:PATH or a folder')
    where = f'{source}:{model_id}'
    config = _read_config(source, model_id)
    arch = _check_architecture(config.get('architecture'), f'{where}/{CONFIG_NAME}')
    model_args = dict(config.get('model_args') or {}, num_classes=config.get('num_classes', 1000))
    try:
        with torch.device('meta'):
            described = timm.create_model(arch, **model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{where}/{CONFIG_NAME}: cannot build {arch} with model_args {model_args}: {e}') from e

    weights_file = _fetch(source, model_id, HF_SAFE_WEIGHTS_NAME)
    try:
        with safe_open(str(weights_file), framework='pt') as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'{where}/{HF_SAFE_WEIGHTS_NAME}: not a readable safetensors file ({e})') from e
    _check_shapes({k: v.shape for k, v in described.state_dict().items()}, shapes,
                  f'{where}/{HF_SAFE_WEIGHTS_NAME}', f'{CONFIG_NAME} ({arch}, model_args {model_args})')
    return timm.create_model(f'{source}:{model_id}', pretrained=pretrained, **kwargs)
