"""Weights on the Hugging Face Hub: export, push and load our models in timm's own Hub layout.

The layout is timm's (`config.json` with `architecture` + `pretrained_cfg`, `model.safetensors`, `README.md`),
written by timm's public `save_for_hf`, so the weights load with plain timm and with transformers' TimmWrapper:

    timm.create_model('hf-hub:ORG/NAME', pretrained=True)
    transformers.AutoModelForImageClassification.from_pretrained('ORG/NAME')

What this module adds: reading timm train.py checkpoints (EMA weights by default), plain state dicts and
safetensors files without ever unpickling arbitrary objects, strict architecture checks with errors that
name the file, a model card in timm's shape (stats, papers, recipe, runnable usage) generated from the model,
the run's `train_hparams.yaml`, and `load_model`, which validates a Hub folder or repo before handing it to
timm (timm itself reports a corrupt file or a config that does not match the weights from deep inside
safetensors or the model constructor). Only public timm and huggingface_hub interfaces are used.

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

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE

import timm
from timm.models import clean_state_dict, parse_model_name, save_for_hf

from . import __version__
from .models import REGISTERED_MODEL_NAMES
from .models.complexity import measure_complexity, model_input_size
from .checkpoint import CheckpointError, load_checkpoint
from .layers.embeds import ConvStemEmbed, PatchLayerNormEmbed, SuperTokenConvEmbed
from .references import ARCHITECTURE_PAPERS, SUPER_TOKEN_PAPER, TIMM_CITATION

__all__ = [
    'HUB_ORG_ENV', 'DEFAULT_HUB_ORG', 'CheckpointError', 'Checkpoint', 'DryRun', 'hub_org', 'default_repo_id',
    'read_checkpoint', 'model_from_checkpoint', 'model_card', 'render_model_card', 'export', 'push', 'load_model',
]

HUB_ORG_ENV = 'TIMM_SUPERTOKEN_HUB_ORG'
DEFAULT_HUB_ORG = 'timm-supertoken'
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = SAFETENSORS_SINGLE_FILE
README_NAME = 'README.md'
HPARAMS_NAME = 'train_hparams.yaml'  # every train.py argument of the run, beside the weights
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


# the picture timm's own cards classify in their usage snippets
CARD_IMAGE_URL = 'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
CARD_IMAGE_LINE = f"img = Image.open(urlopen('{CARD_IMAGE_URL}')).convert('RGB')"
_SNIPPET_HEAD = f'''```python
from urllib.request import urlopen

import torch
from PIL import Image
import timm  # with timm-supertoken installed, timm finds the model by itself

{CARD_IMAGE_LINE}
'''
_TRANSFORMS = '''
# the model's own preprocessing (resize, crop, normalization)
data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)
'''


def _usage(model: torch.nn.Module, repo_id: str) -> str:
    """timm's three usage sections plus transformers' pipeline, with shapes measured on the model (in eval mode)."""
    x = torch.zeros(1, *model_input_size(model))
    with torch.no_grad():
        last_n = min(3, len(model.blocks))  # timm's default for ViTs: the last three blocks
        # one forward: the maps features_only gives, and forward_features' tokens
        tokens, maps = model.forward_intermediates(x, indices=last_n)
    name = f"'hf-hub:{repo_id}'"
    top_k = min(5, model.num_classes)
    feature_shapes = '\n'.join(f'    #  {tuple(m.shape)}' for m in maps)
    return (
        '### Image Classification\n' + _SNIPPET_HEAD +
        f'\nmodel = timm.create_model({name}, pretrained=True).eval()\n' + _TRANSFORMS +
        '\nwith torch.no_grad():\n'
        '    output = model(transforms(img).unsqueeze(0))  # a batch of one image\n'
        f'top{top_k}_probabilities, top{top_k}_class_indices = torch.topk(output.softmax(dim=1) * 100, k={top_k})\n'
        f'print(tuple(output.shape))  # {(1, model.num_classes)}\n'
        '```\n\n'
        '### Feature Map Extraction\n' + _SNIPPET_HEAD +
        f'\nmodel = timm.create_model({name}, pretrained=True, features_only=True, out_indices={last_n}).eval()\n' +
        _TRANSFORMS +
        '\nwith torch.no_grad():\n'
        f'    output = model(transforms(img).unsqueeze(0))  # the tokens of the last {last_n} blocks, as maps\n'
        'for feature_map in output:\n'
        '    print(tuple(feature_map.shape))\n'
        f'    # prints, one line per map:\n{feature_shapes}\n'
        '```\n\n'
        '### Image Embeddings\n' + _SNIPPET_HEAD +
        f'\nmodel = timm.create_model({name}, pretrained=True, num_classes=0).eval()  # no classifier\n' +
        _TRANSFORMS +
        '\nwith torch.no_grad():\n'
        '    embedding = model(transforms(img).unsqueeze(0))\n'
        f'print(tuple(embedding.shape))  # {(1, model.num_features)}\n\n'
        '# or the unpooled tokens, then their pooled pre-logits features (the same with a classifier kept)\n'
        'with torch.no_grad():\n'
        '    tokens = model.forward_features(transforms(img).unsqueeze(0))\n'
        '    embedding = model.forward_head(tokens, pre_logits=True)\n'
        f'print(tuple(tokens.shape))  # {tuple(tokens.shape)}\n'
        f'print(tuple(embedding.shape))  # {(1, model.num_features)}\n'
        '```\n\n'
        '### With transformers\n'
        'transformers loads the same repo through its `TimmWrapper` classes:\n\n'
        '```python\n'
        'from urllib.request import urlopen\n\n'
        'from PIL import Image\n'
        'from transformers import pipeline\n\n'
        f'{CARD_IMAGE_LINE}\n\n'
        f"classifier = pipeline('image-classification', model='{repo_id}')\n"
        f"predictions = classifier(img, top_k={top_k})  # [{{'label': ..., 'score': ...}}, ...]\n"
        f'print(len(predictions))  # {top_k}\n'
        '```\n'
    )


def model_card(model: torch.nn.Module, repo_id: str, training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The card of one model in timm's shape: stats measured on the model, papers, data, recipe, usage."""
    arch = model.pretrained_cfg['architecture']
    training = training or {}
    was_training = model.training
    try:  # forwards in training mode would move the BatchNorm statistics being published
        complexity = measure_complexity(model.eval())
        usage = _usage(model, repo_id)
    finally:
        model.train(was_training)
    size = complexity.input_size[1:]
    weights = {'state_dict_ema': 'the EMA weights', 'state_dict': 'the (non-EMA) model weights'}
    source = weights.get(training.get('weights'), 'the weights')
    epoch = f' after epoch {training["epoch"]}' if 'epoch' in training else ''
    papers = {SUPER_TOKEN_PAPER.title: SUPER_TOKEN_PAPER.url, **ARCHITECTURE_PAPERS}
    details: Dict[str, Any] = {
        'Model Type': 'Image classification / feature backbone',
        'Architecture': f'`{arch}`: timm VisionTransformer (depth {len(model.blocks)}, width {model.embed_dim}, '
                        f'{model.blocks[0].attn.num_heads} heads) with the {EMBEDDINGS[type(model.patch_embed)]}',
        'Model Stats': {
            'Params (M)': f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}',
            'GMACs': f'{complexity.gmacs:.1f}',
            'Activations (M)': f'{complexity.activations_m:.1f}',
            'Image size': f'{size[0]} x {size[1]}',
            'Embedding params': f'{sum(p.numel() for p in model.patch_embed.parameters()):,}',
            'Classes': model.num_classes,
        },
        'Papers': papers,
        'Original': 'https://github.com/huggingface/pytorch-image-models (trunk); the embeddings are '
                    'timm-supertoken\'s, the paper publishes no code',
    }
    # the kwargs that change the architecture; size, classes, channels and pooling are shown elsewhere
    arch_args = {k: v for k, v in getattr(model, '_model_args', {}).items()
                 if k not in ('num_classes', 'img_size', 'in_chans', 'global_pool')}
    if arch_args:
        details['Model args'] = arch_args
    if 'dataset' in training:
        details['Dataset'] = training['dataset']
    if 'recipe' in training:
        details[f'Training recipe (timm train.py; every argument in {HPARAMS_NAME})'] = training['recipe']
    if 'metrics' in training:
        details['Metrics (validation, recorded by train.py)'] = {
            k: f'{v:.3f}' for k, v in training['metrics'].items()}
    return {
        'tags': ['image-classification', 'timm', 'transformers', 'timm-supertoken', 'vision-transformer',
                 'super-token'],
        'library_name': 'timm',
        'license': 'apache-2.0',
        'datasets': [training['dataset']] if 'dataset' in training else [],
        'description': f'A `{arch}` model from *{SUPER_TOKEN_PAPER.title}* ({SUPER_TOKEN_PAPER.year}), packaged with '
                       f'timm-supertoken; {source} of a timm train.py run{epoch}.',
        'details': details,
        'usage': usage,
        'citation': [SUPER_TOKEN_PAPER.bibtex('lee2024supertoken'), TIMM_CITATION],
    }


def render_model_card(card: Dict[str, Any], model_name: str) -> str:
    """README.md from a card dict, laid out as timm's Hub cards are (front matter, details, usage, citation)."""
    lines = ['---', 'tags:', *[f'- {tag}' for tag in card['tags']], 'pipeline_tag: image-classification',
             f'library_name: {card["library_name"]}', f'license: {card["license"]}']
    if card.get('datasets'):
        lines += ['datasets:', *[f'- {dataset.lower()}' for dataset in card['datasets']]]
    lines += ['---', f'# Model card for {model_name}', '', card['description'], '', '## Model Details']
    for key, value in card['details'].items():
        if isinstance(value, dict):
            lines += [f'- **{key}:**', *[f'  - {k}: {v}' for k, v in value.items()]]
        else:
            lines.append(f'- **{key}:** {value}')
    lines += ['', '## Model Usage', card['usage'], '## Citation']
    lines += [f'```bibtex\n{citation}\n```' for citation in card['citation']]
    return '\n'.join(lines) + '\n'


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
    """Everything the Hub folder of one model is written from."""
    model: torch.nn.Module
    repo_id: str
    model_config: Dict[str, Any]
    data_config: Optional[Dict[str, Any]]
    card: Dict[str, Any]
    hparams: Optional[str] = None  # train_hparams.yaml's text


def _hparams_yaml(args: Mapping[str, Any]) -> Optional[str]:
    """The run's train.py arguments as YAML (what train.py writes as args.yaml), or None without any."""
    if not args:
        return None
    import yaml  # timm's own dependency

    plain = json.loads(json.dumps(dict(args), default=str))  # tuples to lists, anything exotic to its str
    return yaml.safe_dump(plain, sort_keys=False)


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
    """A checkpoint file turned into a strictly loaded model plus its Hub config, card and hparams."""
    ckpt = read_checkpoint(checkpoint, use_ema=use_ema, trust_pickle=trust_pickle)
    model = model_from_checkpoint(ckpt, model_name, num_classes, model_args)
    repo_id = repo_id or default_repo_id(model.pretrained_cfg['architecture'])
    training = _training_record(ckpt, dataset)
    model_config: Dict[str, Any] = {'training': training}
    if label_names:
        model_config['label_names'] = _read_label_names(label_names, model.num_classes)
    data_config = {k: ckpt.args[k] for k in DATA_ARGS if ckpt.args.get(k) is not None} or None
    return _Staged(model, repo_id, model_config, data_config, model_card(model, repo_id, training),
                   _hparams_yaml(ckpt.args))


def _stage_folder(folder: Path, repo_id: Optional[str] = None) -> _Staged:
    """An exported folder, validated and reloaded, with the config extras, card and hparams it was exported with."""
    model = load_model(f'local-dir:{folder}').eval()
    config = json.loads((folder / CONFIG_NAME).read_text(encoding='utf-8'))
    repo_id = repo_id or default_repo_id(config['architecture'])
    model_config = {k: config[k] for k in ('training', 'label_names', 'label_descriptions') if k in config}
    # timm's loader moved the labels into pretrained_cfg; they go back to the top level, where export put them
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in model_config}
    hparams = folder / HPARAMS_NAME
    return _Staged(model, repo_id, model_config, None, model_card(model, repo_id, config.get('training')),
                   hparams.read_text(encoding='utf-8') if hparams.is_file() else None)


def _save(staged: _Staged, out_dir: Path) -> Path:
    """Write the Hub folder: timm's config.json and safetensors weights, the card, and the run's hparams."""
    save_for_hf(staged.model, str(out_dir), model_config=staged.model_config, data_config=staged.data_config,
                safe_serialization=True)
    config_file = out_dir / CONFIG_NAME
    config = json.loads(config_file.read_text(encoding='utf-8'))
    # timm (1.0.31) also records num_classes in model_args; transformers' TimmWrapper passes its own
    # num_classes beside model_args and fails on the duplicate. timm reads the head size from num_classes.
    config.get('model_args', {}).pop('num_classes', None)
    config_file.write_text(json.dumps(config, indent=2), encoding='utf-8')
    card = render_model_card(staged.card, staged.repo_id.split('/')[-1])
    (out_dir / README_NAME).write_text(card, encoding='utf-8')
    if staged.hparams:
        (out_dir / HPARAMS_NAME).write_text(staged.hparams, encoding='utf-8')
    # safetensors writes through a private (0600) temporary file: give the weights the umask-derived mode
    # that config.json and README.md got, so an export folder is as readable as any other
    (out_dir / WEIGHTS_NAME).chmod(config_file.stat().st_mode & 0o777)
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
    """Publish a checkpoint or an exported folder: the files `export` writes, in one commit.

    The token is huggingface_hub's (HF_TOKEN or a cached login), the endpoint HF_ENDPOINT's. `dry_run`
    stages the files and returns a `DryRun` (the repo id and each file's size) without contacting the Hub;
    otherwise returns the commit URL. As timm's push_to_hf_hub does, README.md goes up only when the repo
    has none yet, so a curated card is never overwritten.
    """
    source = Path(source)
    staged = _stage_folder(source, repo_id) if source.is_dir() else _stage_checkpoint(source, repo_id, **options)
    with tempfile.TemporaryDirectory() as tmp:
        folder = _save(staged, Path(tmp))
        if dry_run:
            return DryRun(staged.repo_id, [(p.name, p.stat().st_size) for p in sorted(folder.iterdir())])
        api = HfApi(library_name='timm-supertoken', library_version=__version__)
        repo_id = api.create_repo(staged.repo_id, private=private, exist_ok=True).repo_id
        if api.file_exists(repo_id, README_NAME, revision=revision):
            (folder / README_NAME).unlink()
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=commit_message)
    return str(commit.commit_url)


def _fetch(source: str, model_id: str, filename: str) -> Path:
    """Local path of one file of a local-dir: folder or an hf-hub: repo (`ORG/NAME[@revision]`), or an error."""
    if source == 'local-dir':
        path = Path(model_id) / filename
        if not path.is_file():
            raise CheckpointError(f'{path}: missing')
        return path
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
    repo_id, _, revision = model_id.partition('@')
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
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

    weights_file = _fetch(source, model_id, WEIGHTS_NAME)
    try:
        with safe_open(str(weights_file), framework='pt') as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'{where}/{WEIGHTS_NAME}: not a readable safetensors file ({e})') from e
    _check_shapes({k: v.shape for k, v in described.state_dict().items()}, shapes,
                  f'{where}/{WEIGHTS_NAME}', f'{CONFIG_NAME} ({arch}, model_args {model_args})')
    return timm.create_model(f'{source}:{model_id}', pretrained=pretrained, **kwargs)
