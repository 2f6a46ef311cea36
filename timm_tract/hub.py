""" Publish a TrAct training run to the Hugging Face Hub: a timm-loadable repository with a model card.

A run directory is timm's train.py layout (also written by `timm-tract train`): `args.yaml`, `summary.csv`,
`model_best.pth.tar`, `last.pth.tar`, `checkpoint-*.pth.tar`; `timm-tract compare` adds `report.json` and an
accuracy plot in a parent directory. The repository folder holds:

  model.safetensors   the chosen checkpoint's weights (EMA when present), no optimizer state, no pickle
  config.json         timm's schema for the *base* architecture (`timm.create_model('hf-hub:ORG/NAME')` needs only
                      timm), label names, data config and a `tract` block (λ, layer, the `*_tract` twin)
  README.md           model card (`timm_tract.cards`)
  train_hparams.yaml  the run's args.yaml; results.csv: its summary.csv; the accuracy plot PNG when there is one
"""
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import torch

from .cards import TRACT_PAPER, CardInputs, model_stats, render_model_card, training_command
from .version import __version__

__all__ = ['PublishError', 'PublishResult', 'RunInfo', 'read_run', 'build_repo_folder', 'publish']

PathLike = Union[str, Path]
T = TypeVar('T')

# timm dataset names -> (display name, Hub dataset id)
_KNOWN_DATASETS = {
    'torch/cifar10': ('CIFAR-10', 'uoft-cs/cifar10'),
    'torch/cifar100': ('CIFAR-100', 'uoft-cs/cifar100'),
    'torch/mnist': ('MNIST', 'ylecun/mnist'),
    'torch/fashion_mnist': ('Fashion-MNIST', 'zalando-datasets/fashion_mnist'),
    'torch/imagenet': ('ImageNet-1k', 'ILSVRC/imagenet-1k'),
    'imagenet': ('ImageNet-1k', 'ILSVRC/imagenet-1k'),
}
_CIFAR10_LABELS = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
_TRAIN_SPLITS = ('train', 'training')
_CHECKPOINT_FILES = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class PublishError(RuntimeError):
    """A run could not be turned into a repository or uploaded; the message says why and what to do."""


@dataclasses.dataclass
class RunInfo:
    """What a run directory holds: its args, per-epoch results, the chosen checkpoint and comparison report."""
    run_dir: Path
    args: Dict[str, Any]
    args_text: str
    summary: List[Dict[str, str]]
    checkpoint_path: Path
    checkpoint_kind: str
    report: Optional[Dict[str, Any]] = None
    plot: Optional[Path] = None


@dataclasses.dataclass
class PublishResult:
    """Where the repository folder was written (dry run) and what was uploaded."""
    repo_id: str
    folder: Optional[Path] = None
    repo_url: Optional[str] = None
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    manifest_entry: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _log(msg: str) -> None:
    print(f'[timm-tract publish] {msg}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- reading a run
def read_run(run_dir: PathLike, checkpoint: str = 'best') -> RunInfo:
    """Read a train.py-layout run; `checkpoint` is 'best', 'last' or a path to a `.pth.tar`/state-dict file."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PublishError(f'run directory {run_dir} does not exist')
    args_path = run_dir / 'args.yaml'
    if not args_path.is_file():
        raise PublishError(
            f'{run_dir} has no args.yaml: pass the output directory of timm-tract train or timm\'s train.py '
            f'(the folder holding args.yaml, summary.csv and model_best.pth.tar)')
    args_text = args_path.read_text()
    args = yaml.safe_load(args_text) or {}
    if not isinstance(args, dict) or not args.get('model'):
        raise PublishError(f'{args_path} does not name a model (no `model:` entry)')

    if checkpoint in _CHECKPOINT_FILES:
        ckpt_path = run_dir / _CHECKPOINT_FILES[checkpoint]
        if not ckpt_path.is_file():
            others = sorted(p.name for p in run_dir.glob('*.pth.tar'))
            raise PublishError(
                f'{run_dir} has no {ckpt_path.name}; available checkpoints: {others or "none"}; '
                f'use --checkpoint last|best|PATH')
        kind = checkpoint
    else:
        ckpt_path = Path(checkpoint)
        if not ckpt_path.is_absolute() and not ckpt_path.exists():
            ckpt_path = run_dir / checkpoint
        if not ckpt_path.is_file():
            raise PublishError(f'checkpoint {checkpoint} not found (also looked in {run_dir})')
        kind = ckpt_path.name

    summary: List[Dict[str, str]] = []
    if (run_dir / 'summary.csv').is_file():
        with open(run_dir / 'summary.csv', newline='') as f:
            summary = [row for row in csv.DictReader(f) if row.get('epoch') not in (None, '', 'epoch')]
    report, plot = _find_comparison(run_dir)
    return RunInfo(run_dir, args, args_text, summary, ckpt_path, kind, report, plot)


def _find_comparison(run_dir: Path) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """`report.json` of `timm-tract compare` in the run dir or up to two parents, and an accuracy plot PNG."""
    for d in (run_dir, run_dir.parent, run_dir.parent.parent):
        report_path = d / 'report.json'
        if report_path.is_file():
            try:
                report = json.loads(report_path.read_text())
            except json.JSONDecodeError as e:
                raise PublishError(f'{report_path} is not valid JSON ({e}); fix or remove it') from e
            return report, _find_plot(run_dir, d, report)
    return None, _find_plot(run_dir, None, None)


def _find_plot(run_dir: Path, report_dir: Optional[Path], report: Optional[dict]) -> Optional[Path]:
    if report:
        for key in ('plot', 'plot_png', 'plot_path', 'figure'):
            name = report.get(key)
            if isinstance(name, str) and (report_dir / name).is_file():
                return report_dir / name
    for d in (run_dir, report_dir):
        if d is not None:
            pngs = sorted(d.glob('*.png'))
            if pngs:
                return pngs[0]
    return None


def _load_weights(path: Path, use_ema: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], bool]:
    """(state_dict, checkpoint metadata, whether EMA weights were taken); optimizer state is never kept."""
    from timm.models import clean_state_dict
    from timm.utils import load_checkpoint_metadata

    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(str(path)), {}, False
    try:
        ckpt = load_checkpoint_metadata(str(path))
    except Exception as e:
        raise PublishError(
            f'cannot read checkpoint {path} safely ({type(e).__name__}: {e}); only tensors, numbers and '
            f'argparse args are accepted (torch.load weights_only)') from e
    if not isinstance(ckpt, dict):
        raise PublishError(f'{path} is not a checkpoint dict')
    if 'state_dict' not in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt), {}, False
    if 'state_dict' not in ckpt:
        raise PublishError(f'{path} has no state_dict (keys: {sorted(ckpt)})')
    ema = use_ema and isinstance(ckpt.get('state_dict_ema'), dict) and len(ckpt['state_dict_ema']) > 0
    sd = ckpt['state_dict_ema'] if ema else ckpt['state_dict']
    sd = {k[len('_orig_mod.'):] if k.startswith('_orig_mod.') else k: v for k, v in clean_state_dict(sd).items()}
    meta = {k: v for k, v in ckpt.items() if k in ('epoch', 'arch', 'metric', 'version')}
    return sd, meta, ema


# ---------------------------------------------------------------------------------------------- the model
def _split_model_name(name: str) -> Tuple[str, str]:
    """'resnet18_tract.a1_in1k' -> ('resnet18_tract', 'a1_in1k')."""
    arch, _, tag = name.partition('.')
    return arch, tag


def _base_arch(arch: str) -> str:
    import timm
    base = arch[:-len('_tract')] if arch.endswith('_tract') else arch
    if not timm.is_model(base):
        raise PublishError(f'architecture {base!r} (from {arch!r}) is not a timm model; cannot publish it')
    return base


def _tract_settings(args: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """λ and how TrAct was used: a `*_tract` model, or a `tract-*` optimizer on the base model."""
    opt = str(args.get('opt') or '')
    opt_base = opt.split('_')[-1]
    via_model, via_opt = arch.endswith('_tract'), opt_base.startswith('tract-')
    if not (via_model or via_opt):
        raise PublishError(
            f'this run did not train with TrAct (model {arch!r}, optimizer {opt!r}): publish it with timm\'s '
            f'push_to_hf_hub instead, or train with a *_tract model or a tract-* optimizer')
    lam = args.get('tract_lambda')
    for kw in ('opt_kwargs', 'model_kwargs'):
        kwargs = args.get(kw) or {}
        if lam is None and isinstance(kwargs, dict) and kwargs.get('tract_lambda') is not None:
            lam = kwargs['tract_lambda']
    from .functional import DEFAULT_LAMBDA
    return {'lambda': float(lam if lam is not None else DEFAULT_LAMBDA), 'via': 'model' if via_model else 'optimizer',
            'optimizer': opt}


def _model_kwargs(args: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = {k: v for k, v in (args.get('model_kwargs') or {}).items() if not k.startswith('tract')}
    in_chans = args.get('in_chans') or ((args.get('input_size') or [None])[0])
    if in_chans:
        kwargs['in_chans'] = int(in_chans)
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    return kwargs


def _build_base_model(base: str, sd: Dict[str, torch.Tensor], args: Dict[str, Any]) -> torch.nn.Module:
    """The plain timm model with the run's weights loaded strictly (TrAct weights are plain weights)."""
    import timm

    kwargs = _model_kwargs(args)
    probe = timm.create_model(base, device='meta', **kwargs)
    classifier = probe.pretrained_cfg.get('classifier')
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    weight = sd.get(f'{classifier}.weight') if classifier else None
    num_classes = int(weight.shape[0]) if weight is not None else args.get('num_classes')
    if num_classes is None:
        raise PublishError(f'cannot tell the number of classes: no {classifier}.weight in the checkpoint '
                           f'and no num_classes in args.yaml')
    model = timm.create_model(base, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PublishError(f'the checkpoint does not match {base}(num_classes={num_classes}, {kwargs}): {e}') from e
    return model.eval()


def _label_names(args: Dict[str, Any], num_classes: int, given: Optional[Sequence[str]]) -> Optional[List[str]]:
    """Class names: given > args.class_map file > ImageFolder train split folders > known datasets; else None."""
    if given is not None:
        names = list(given)
        if len(names) != num_classes:
            raise PublishError(f'{len(names)} label names given for a model with {num_classes} classes')
        return names
    names = None
    class_map = args.get('class_map')
    if class_map and Path(class_map).is_file():
        names = [line.strip().split()[0] for line in Path(class_map).read_text().splitlines() if line.strip()]
    elif args.get('data_dir') and not args.get('dataset'):
        root = Path(args['data_dir'])
        for split in [args.get('train_split') or 'train', *_TRAIN_SPLITS]:
            if (root / split).is_dir():
                names = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
                break
    elif args.get('dataset') == 'torch/cifar10':
        names = _CIFAR10_LABELS
    if names is not None and len(names) != num_classes:
        _log(f'ignoring {len(names)} class names found for a {num_classes}-class model; use --label-names')
        return None
    return names


def _dataset(args: Dict[str, Any], name: Optional[str], dataset_id: Optional[str]) -> Tuple[str, Optional[str]]:
    ds = str(args.get('dataset') or '')
    known_name, known_id = _KNOWN_DATASETS.get(ds.lower(), (None, None))
    if ds.startswith(('hfds/', 'hfids/')):
        known_name = known_id = ds.split('/', 1)[1]
    if known_name is None:
        known_name = Path(args['data_dir']).name if args.get('data_dir') else (ds or 'unknown')
    return name or known_name, dataset_id or known_id


def _base_model_id(args: Dict[str, Any]) -> Optional[str]:
    """The Hub repo the run was fine-tuned from, when it started from Hub weights."""
    model = str(args['model'])
    if model.startswith(('hf-hub:', 'hf_hub:')):
        return model.split(':', 1)[1].split('@')[0]
    if not args.get('pretrained') or args.get('pretrained_path') or args.get('initial_checkpoint'):
        return None
    import timm.models
    arch, tag = _split_model_name(model)
    base = arch[:-len('_tract')] if arch.endswith('_tract') else arch
    cfg = timm.models.get_pretrained_cfg(f'{base}.{tag}' if tag else base)
    hub_id = getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    return hub_id.split('@')[0] if hub_id else None


# ---------------------------------------------------------------------------------------------- the folder
def _results_rows(summary: List[Dict[str, str]], limit: int = 20) -> List[Dict[str, str]]:
    def fmt(v: str) -> str:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return v or ''
        return str(int(f)) if f.is_integer() and abs(f) < 1e6 else f'{f:.4g}'
    keys = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
    rows = [{k: fmt(r.get(k, '')) for k in keys} for r in summary]
    if len(rows) > limit:
        step = len(rows) / (limit - 1)
        rows = [rows[int(i * step)] for i in range(limit - 1)] + [rows[-1]]
    return rows


def _checkpoint_accuracy(summary, epoch) -> Tuple[Optional[float], Optional[float]]:
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return None
    rows = [r for r in summary if epoch is not None and num(r.get('epoch')) == float(epoch)]
    if not rows:
        return None, None
    return num(rows[-1].get('eval_top1')), num(rows[-1].get('eval_top5'))


def _comparison(report: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Card section from `timm-tract compare`'s report.json: its speed-up sentence and top-1 table (mean ± std)."""
    if not report:
        return None
    speed = report.get('speedup')
    if isinstance(speed, dict) and speed.get('text'):
        summary = speed['text']
    elif isinstance(speed, (int, float)):
        summary = f'Speed-up {speed:.2f}x over the baseline.'
    else:
        summary = 'No speed-up was measured.'
    labels = {'baseline': report.get('baseline_label', 'baseline'), 'tract': report.get('tract_label', 'TrAct')}
    seeds = report.get('seeds')
    if seeds:
        summary += f" Baseline and TrAct were trained with the same recipe and data order, seeds {', '.join(map(str, seeds))}."
    rows = []
    for r in report.get('table') or []:
        if isinstance(r, dict) and {'method', 'epochs', 'mean'} <= set(r):
            rows.append([labels.get(r['method'], r['method']), str(r['epochs']), str(r.get('n', '')),
                         f"{r['mean']:.2f} ± {r.get('std', 0.0):.2f}"])
    return {'summary': summary, 'columns': ['method', 'epochs', 'seeds', 'top-1 (%)'], 'rows': rows}


def _first_layer_name(model: torch.nn.Module) -> str:
    from .layers import find_first_layer
    return ', '.join(find_first_layer(model))


def _supports_features(base: str, kwargs: Dict[str, Any]) -> bool:
    import timm
    try:
        timm.create_model(base, features_only=True, device='meta', **kwargs)
    except Exception:  # timm raises various errors for architectures without a feature extractor
        return False
    return True


def _write_folder(
        run: RunInfo,
        repo_id: str,
        folder: Path,
        use_ema: bool,
        license: str,
        label_names: Optional[Sequence[str]],
        dataset_name: Optional[str],
        dataset_id: Optional[str],
        base_model: Optional[str],
) -> Dict[str, Any]:
    """Write every repository file into the (empty) `folder`; returns the manifest entry for these weights."""
    from timm.data import resolve_data_config
    from timm.models import save_for_hf

    args = run.args
    sd, meta, ema = _load_weights(run.checkpoint_path, use_ema)
    arch, _ = _split_model_name(str(meta.get('arch') or args['model']))
    if arch.startswith(('hf-hub:', 'hf_hub:')):
        raise PublishError('runs started from an hf-hub: model name are not supported; train a registered arch')
    base = _base_arch(arch)
    tract = _tract_settings(args, arch)
    model = _build_base_model(base, sd, args)
    tract_arch = f'{base}_tract'
    layer = _first_layer_name(model)
    data_config = resolve_data_config(args, model=model)
    names = _label_names(args, model.num_classes, label_names)
    ds_name, ds_id = _dataset(args, dataset_name, dataset_id)
    base_model = base_model or _base_model_id(args)
    tag = repo_id.split('/')[-1].split('.', 1)[1] if '.' in repo_id.split('/')[-1] else 'tract'

    for key in ('paper_name', 'description', 'notes', 'origin_url', 'test_input_size', 'test_crop_pct', 'label_names',
                'label_descriptions'):
        model.pretrained_cfg.pop(key, None)
    model_config: Dict[str, Any] = {
        'pretrained_cfg': {
            'tag': tag, 'license': license, 'paper_ids': TRACT_PAPER,
            'notes': (f'First layer {layer} trained with TrAct (lambda={tract["lambda"]}); '
                      f'continue TrAct training with {tract_arch} from timm-tract.',),
        },
        'tract': {
            'used': True, 'lambda': tract['lambda'], 'layer': layer, 'arch': tract_arch,
            'applied_via': tract['via'], 'optimizer': tract['optimizer'], 'paper': TRACT_PAPER,
            'timm_tract_version': __version__,
        },
    }
    if names:
        model_config['label_names'] = names
    save_for_hf(model, str(folder), model_config=model_config, safe_serialization=True, data_config=data_config)
    produced = sorted(p.name for p in folder.iterdir())
    if produced != ['config.json', 'model.safetensors']:
        raise PublishError(f'timm wrote unexpected files {produced}; expected config.json and model.safetensors')

    (folder / 'train_hparams.yaml').write_text(run.args_text)
    if (run.run_dir / 'summary.csv').is_file():
        shutil.copyfile(run.run_dir / 'summary.csv', folder / 'results.csv')
    plot_name = None
    if run.plot is not None:
        plot_name = 'accuracy.png'
        shutil.copyfile(run.plot, folder / plot_name)

    hw = tuple(data_config['input_size'][1:])
    epoch = meta.get('epoch')
    top1, top5 = _checkpoint_accuracy(run.summary, epoch)
    if top1 is None and isinstance(meta.get('metric'), (int, float)):
        top1 = float(meta['metric'])
    model_args = json.loads((folder / 'config.json').read_text()).get('model_args', {})
    info = CardInputs(
        repo_id=repo_id, base_arch=base, tract_arch=tract_arch, num_classes=model.num_classes,
        img_size=hw, stats=model_stats(model, data_config['input_size']), tract_lambda=tract['lambda'],
        tract_layer=layer, train_command=training_command(args), license=license, label_names=names,
        model_args={k: v for k, v in model_args.items() if k not in ('num_classes', 'global_pool', 'in_chans')
                    or (k == 'in_chans' and v != 3)},
        dataset_name=ds_name, dataset_id=ds_id, dataset_split=str(args.get('val_split') or 'validation'),
        base_model=base_model, checkpoint=run.checkpoint_kind,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        epochs=args.get('epochs'), ema=ema, top1=top1, top5=top5, results=_results_rows(run.summary),
        comparison=_comparison(run.report), plot_file=plot_name,
        features_only=_supports_features(base, _model_kwargs(args)), num_features=model.num_features,
    )
    (folder / 'README.md').write_text(render_model_card(info))

    entry = {'model': f'{tract_arch}.{tag}', 'hf_hub_id': repo_id, 'num_classes': model.num_classes,
             'input_size': list(data_config['input_size']), 'mean': list(data_config['mean']),
             'std': list(data_config['std']), 'crop_pct': data_config['crop_pct'],
             'interpolation': data_config['interpolation'], 'license': license}
    return entry


def build_repo_folder(
        run_dir: PathLike,
        repo_id: str,
        output_dir: PathLike,
        *,
        checkpoint: str = 'best',
        use_ema: bool = True,
        license: str = 'apache-2.0',
        label_names: Optional[Sequence[str]] = None,
        dataset_name: Optional[str] = None,
        dataset_id: Optional[str] = None,
        base_model: Optional[str] = None,
) -> PublishResult:
    """Write the Hub repository folder for a run into `output_dir`, all or nothing.

    The files are written into a temporary sibling folder and renamed into place at the end, so a failure leaves
    no partial folder. `output_dir` must not exist or be empty: nothing of the user's is overwritten.
    """
    _check_repo_id(repo_id)
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublishError(f'output folder {out} already exists and is not empty; remove it or choose another '
                           f'--output-dir (nothing was written)')
    run = read_run(run_dir, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        entry = _write_folder(run, repo_id, tmp, use_ema, license, label_names, dataset_name, dataset_id, base_model)
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PublishResult(repo_id=repo_id, folder=out, manifest_entry=entry)


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split('/')
    if len(parts) != 2 or not all(parts):
        raise PublishError(f'--repo-id must be ORG/NAME (e.g. myname/resnet18_tract.tract_cifar10), got {repo_id!r}')


# ---------------------------------------------------------------------------------------------- upload
def _retrying(what: str, fn: Callable[[], T], retries: int, backoff: float) -> T:
    """Call `fn`, retrying network and 5xx/429 errors with exponential backoff; clear PublishError otherwise."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    for attempt in range(retries + 1):
        try:
            return fn()
        except RevisionNotFoundError:
            raise  # the caller decides (e.g. create the branch)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise PublishError(
                    f'{what}: the Hub refused the credentials (HTTP {status}). Log in with `hf auth login`, set '
                    f'HF_TOKEN, or pass --token with a token that has write access to this namespace') from None
            if isinstance(e, RepositoryNotFoundError) or status not in _RETRY_STATUS:
                raise PublishError(f'{what} failed (HTTP {status}): {_server_message(e)}') from None
            error = f'HTTP {status}'
        except _transport_errors() as e:
            error = f'{type(e).__name__}: {e}'
        if attempt == retries:
            raise PublishError(
                f'{what} failed after {retries + 1} attempts ({error}). Check the network connection and the Hub '
                f'endpoint, then run the command again') from None
        wait = backoff * 2 ** attempt
        _log(f'{what}: {error}; retrying in {wait:.1f}s ({attempt + 1}/{retries})')
        time.sleep(wait)
    raise AssertionError('unreachable')


def _transport_errors() -> Tuple[type, ...]:
    """Connection-level errors of the HTTP stack huggingface_hub uses (httpx in >= 1.0, requests before)."""
    errors: Tuple[type, ...] = (ConnectionError, TimeoutError)
    try:
        from huggingface_hub.utils import httpx
        errors += (httpx.TransportError,)
    except ImportError:
        import requests
        errors += (requests.ConnectionError, requests.Timeout)
    return errors


def _server_message(e: Exception) -> str:
    message = getattr(e, 'server_message', None) or str(e)
    return message.strip().splitlines()[0] if message.strip() else type(e).__name__


def _upload(
        folder: Path, repo_id: str, *, token: Optional[str], endpoint: Optional[str], private: bool,
        revision: Optional[str], commit_message: Optional[str], create_pr: bool, overwrite: bool,
        retries: int, backoff: float) -> Tuple[str, str, Optional[str]]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi(endpoint=endpoint, token=token, library_name='timm-tract', library_version=__version__)
    _log(f'creating {repo_id} on {api.endpoint} (private={private})')
    repo_url = _retrying('create_repo', lambda: api.create_repo(repo_id, private=private, exist_ok=True),
                         retries, backoff)
    branch = revision or 'main'
    try:
        existing = _retrying('listing the repository',
                             lambda: api.list_repo_files(repo_id, revision=branch), retries, backoff)
    except RevisionNotFoundError:
        _log(f'creating branch {branch}')
        _retrying('create_branch', lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), retries, backoff)
        existing = []
    existing = [f for f in existing if f != '.gitattributes']
    if existing and not (overwrite or create_pr):
        raise PublishError(
            f'{repo_id}@{branch} already has files ({", ".join(sorted(existing)[:5])}{", ..." if len(existing) > 5 else ""}); '
            f'nothing was uploaded. Pass --overwrite to replace them, or --create-pr to propose the change')
    files = sorted(p.name for p in folder.iterdir())
    size = sum((folder / f).stat().st_size for f in files) / 1e6
    _log(f'uploading {len(files)} files ({size:.1f} MB) in one commit to {repo_id}@{branch}'
         + (' as a pull request' if create_pr else ''))
    info = _retrying('upload_folder', lambda: api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
        commit_message=commit_message or f'Publish TrAct weights with timm-tract {__version__}',
        delete_patterns='*' if (overwrite and not create_pr) else None,
    ), retries, backoff)
    return str(repo_url), info.commit_url, info.pr_url


def publish(
        run_dir: PathLike,
        repo_id: str,
        *,
        dry_run: bool = False,
        output_dir: Optional[PathLike] = None,
        checkpoint: str = 'best',
        use_ema: bool = True,
        license: str = 'apache-2.0',
        label_names: Optional[Sequence[str]] = None,
        dataset_name: Optional[str] = None,
        dataset_id: Optional[str] = None,
        base_model: Optional[str] = None,
        token: Optional[str] = None,
        endpoint: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        overwrite: bool = False,
        retries: int = 4,
        backoff: float = 2.0,
) -> PublishResult:
    """Build the repository folder for a run and upload it as one commit (or only write it: dry run).

    With `dry_run` or `output_dir` the folder is written to `output_dir` (default `RUN_DIR/hub/<NAME>`) and
    nothing is uploaded. Otherwise it is built in a temporary folder, `create_repo` runs (accepting an existing
    repo), and `upload_folder` makes one commit; a repo that already has files is refused unless `overwrite`
    (which then replaces every file) or `create_pr`. The token comes from `token`, `HF_TOKEN` or the
    huggingface_hub login and is never printed or written. Network and 5xx errors are retried `retries` times with
    exponential backoff starting at `backoff` seconds.
    """
    _check_repo_id(repo_id)
    folder_kwargs = dict(checkpoint=checkpoint, use_ema=use_ema, license=license, label_names=label_names,
                         dataset_name=dataset_name, dataset_id=dataset_id, base_model=base_model)
    if dry_run or output_dir is not None:
        out = Path(output_dir) if output_dir is not None else Path(run_dir) / 'hub' / repo_id.split('/')[-1]
        _log(f'writing the repository folder to {out} (nothing is uploaded)')
        return build_repo_folder(run_dir, repo_id, out, **folder_kwargs)
    with tempfile.TemporaryDirectory(prefix='timm-tract-publish-') as tmp:
        result = build_repo_folder(run_dir, repo_id, Path(tmp) / 'repo', **folder_kwargs)
        repo_url, commit_url, pr_url = _upload(
            result.folder, repo_id, token=token, endpoint=endpoint, private=private, revision=revision,
            commit_message=commit_message, create_pr=create_pr, overwrite=overwrite, retries=retries,
            backoff=backoff)
    return dataclasses.replace(result, folder=None, repo_url=repo_url, commit_url=commit_url, pr_url=pr_url)
