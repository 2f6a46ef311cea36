""" `timm-tract train`: one training run from timm's library pieces, with timm train.py's flags and output layout.

Same call sequence as timm's train.py (create_model → ClassificationTask → create_optimizer_v2 → resume → EMA →
torch.compile → DDP → epochs), so a `*_tract` model or a `tract-*` optimizer behaves here as in train.py. The output
directory is train.py's: `args.yaml`, `summary.csv` (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr),
`last.pth.tar`, `model_best.pth.tar`, `checkpoint-<epoch>.pth.tar` (timm's CheckpointSaver format).

The function reads like train.py's sections: check the arguments, build the model, the data, the optimizer, restore
a checkpoint, then run the epochs; every step passes one `_Run` state object on.

Differences from train.py, all in the direction of reproducible, comparable runs:
- the data order of epoch e is a function of (--seed, e) only: the same in a baseline and a TrAct run, in a resumed
  run, and the same global batches for 1 process and for N torchrun processes (global batch = N × --batch-size);
- `--device` defaults to cuda when available, else cpu; torchrun DDP also runs on cpu (gloo);
- an existing output dir is never trained over unless the run resumes from a checkpoint inside it, and a run claims
  its directory (`rundir.claim_dir`, a lock the kernel drops when the process dies): a second run started into the
  same --output/--experiment is refused; --experiment must name a folder inside --output;
- every flag is checked before anything is built or written (`check_train_args`); errors timm or torch raise on bad
  flags while the model, data, optimizer or scheduler are built become one TrainError naming the flags to fix;
- resuming a TrAct run (TrAct layers or a tract-* optimizer in its checkpoint's args) without TrAct is refused;
- `last.pth.tar` is replaced atomically (temp file + rename), so a kill never leaves it corrupt or missing; a failed
  checkpoint write removes its temp file, keeps the previous `last.pth.tar` and stops with a TrainError saying how to
  resume; summary.csv gets an epoch's row only once its checkpoint is on disk;
- a run that fails before its first checkpoint removes the output directory it created (nothing blocks a re-run);
- ImageFolder / torch datasets whose images are smaller than the model's default input size are trained at their own
  size (logged), unless --img-size / --input-size says otherwise.
"""
import argparse
import dataclasses
import difflib
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .errors import TimmTractError, TrainError
from .functional import check_lambda, check_lambda_mode
from .layers import is_tract_layer
from .naming import (TRACT_OPT_PREFIX, base_optimizer_name, is_tract_optimizer, is_weights_source, split_model_name_tag,
                     twin_name)
from . import rundir

__all__ = ['train', 'check_train_args', 'check_experiment', 'TrainError', 'TrainResult']

_logger = logging.getLogger(__name__)

# --- checking the arguments (before anything is built or written) ---------------------------------------------------

_EVAL_METRICS = ('top1', 'top5', 'loss')
_FLAG_HINTS = {  # the flags each construction phase reads: named in its error line
    'model': '--model, --model-kwargs, --num-classes, --in-chans, --drop/--drop-path, --gp, --pretrained, '
             '--initial-checkpoint',
    'data': '--data-dir, --dataset, --class-map, --train-split/--val-split, --input-img-mode, --in-chans, '
            '--img-size/--input-size, --mean/--std, --crop-pct, --interpolation, augmentation flags',
    'optimizer': '--opt, --lr, --momentum, --weight-decay, --opt-eps, --opt-betas, --layer-decay, --opt-kwargs',
    'scheduler': '--sched, --epochs, --warmup-epochs, --warmup-lr, --min-lr, --decay-epochs, --decay-milestones, '
                 '--decay-rate, --cooldown-epochs, --patience-epochs',
}


@contextmanager
def _user_input(phase: str):
    """Errors timm and torch raise while building the `phase` ('model', 'data', 'optimizer', 'scheduler') from the
    flags (ValueError, TypeError, KeyError, AssertionError, OSError) become one TrainError naming the phase's flags; the
    original stays chained (`--debug` shows it). Errors outside these phases keep their traceback."""
    try:
        yield
    except TimmTractError:
        raise
    except (ValueError, TypeError, KeyError, AssertionError, OSError) as e:
        detail = ' '.join(str(e).split()) or 'no message'
        raise TrainError(f'building the {phase} from the flags failed ({type(e).__name__}: {detail}); check '
                         f'{_FLAG_HINTS[phase]}.') from e


def check_train_args(args: argparse.Namespace, build: bool = False) -> None:
    """Every check `train` makes before it builds or writes anything: the flags, the data folder, the output path.

    With `build`, also build the model, optimizer and scheduler on the meta device (no memory, no weights read,
    nothing downloaded), so a flag timm or torch rejects is reported now: `timm-tract compare` checks each of its runs
    this way before the first one trains. Raises TrainError (one line, naming the flag); changes nothing in `args`.
    """
    _check_args(args)
    _check_data_dir(args)
    if build:
        _check_construction(args)


def _check_args(args: argparse.Namespace) -> None:
    if args.grad_accum_steps < 1:
        raise TrainError('--grad-accum-steps must be >= 1.')
    if args.amp_dtype not in ('float16', 'bfloat16'):
        raise TrainError(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype!r}.')
    if args.num_classes is not None and args.num_classes < 1:
        raise TrainError(f'--num-classes must be >= 1, got {args.num_classes}.')
    if args.batch_size < 1 or args.epochs < 1:
        raise TrainError('--batch-size and --epochs must be >= 1.')
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise TrainError(f'--validation-batch-size must be >= 1, got {args.validation_batch_size}.')
    if args.workers < 0:
        raise TrainError('--workers must be >= 0 (0 loads the data in the training process).')
    for flag, value in (('--lr', args.lr), ('--warmup-lr', args.warmup_lr), ('--min-lr', args.min_lr),
                        ('--weight-decay', args.weight_decay)):
        if value is not None and not value >= 0:
            raise TrainError(f'{flag} must be >= 0, got {value}.')
    if args.checkpoint_hist < 1:
        raise TrainError(f'--checkpoint-hist must be >= 1 (checkpoints kept besides last.pth.tar), got '
                         f'{args.checkpoint_hist}.')
    if args.eval_metric not in _EVAL_METRICS:
        raise TrainError(f'--eval-metric must be one of {", ".join(_EVAL_METRICS)}, got {args.eval_metric!r}.')
    for flag, values in (('--mean', args.mean), ('--std', args.std)):
        if values is not None and len(values) not in (1, _given_in_chans(args) or len(values)):
            raise TrainError(f'{flag} has {len(values)} values for {_given_in_chans(args)} input channels: give one '
                             f'value per channel (or one for all).')
    _check_device(args.device)
    _check_ranges(args)
    model_kwargs, opt_kwargs = args.model_kwargs or {}, args.opt_kwargs or {}
    for key, check in (('tract_lambda', check_lambda), ('tract_lambda_mode', check_lambda_mode)):
        for flag, value in ((f"--{key.replace('_', '-')}", getattr(args, key, None)),
                            (f'--model-kwargs {key}', model_kwargs.get(key)),
                            (f'--opt-kwargs {key}', opt_kwargs.get(key))):
            if value is not None:
                try:
                    check(value)
                except TimmTractError as e:
                    raise TrainError(f'{flag}: {e}') from None
    for flag, path in (('--class-map', args.class_map), ('--initial-checkpoint', args.initial_checkpoint)):
        if path and not os.path.isfile(path):
            raise TrainError(f'{flag} {path!r} is not a file.')
    root = args.output or os.path.join('.', 'output', 'train')
    _check_output_root(root)
    check_experiment(args.experiment, root)
    if args.resume and not os.path.isfile(args.resume):
        raise TrainError(f'--resume {args.resume!r} is not a file (expected e.g. <output dir>/last.pth.tar).')


_CLIP_MODES = ('norm', 'value', 'agc')
_DIST_BN = ('', 'broadcast', 'reduce')
_LR_BASE_SCALES = ('', 'linear', 'sqrt')


def _check_ranges(args: argparse.Namespace) -> None:
    """Probabilities, sizes and names timm only rejects mid-run (in a data-loader transform, the first forward, the
    first clipped step) or not at all."""
    from timm.data.transforms import str_to_interp_mode
    for flag, value, high in (('--drop', args.drop, 1.), ('--drop-path', args.drop_path, 1.),
                              ('--reprob', args.reprob, 1.), ('--hflip', args.hflip, 1.), ('--vflip', args.vflip, 1.),
                              ('--model-ema-decay', args.model_ema_decay, 1.)):
        if value is not None and not 0. <= value <= high:
            raise TrainError(f'{flag} is a probability (0 to 1), got {value}.')
    if not 0. <= args.smoothing < 1.:
        raise TrainError(f'--smoothing must be in [0, 1), got {args.smoothing}.')
    if args.crop_pct is not None and not args.crop_pct > 0:
        raise TrainError(f'--crop-pct must be > 0, got {args.crop_pct}.')
    sizes = ([args.img_size] if args.img_size is not None else []) + list(args.input_size or [])
    if any(v < 1 for v in sizes):
        raise TrainError(f'--img-size and --input-size must be >= 1, got --img-size {args.img_size} --input-size '
                         f'{args.input_size}.')
    for flag, name, extra in (('--interpolation', args.interpolation, ('',)),
                              ('--train-interpolation', args.train_interpolation, ('random',))):
        if name not in extra:
            try:
                str_to_interp_mode(name)
            except KeyError:
                raise TrainError(f'{flag} {name!r} is not an interpolation: nearest, bilinear, bicubic, box, hamming, '
                                 f'lanczos' + (', random' if 'random' in extra else '') + '.') from None
    for flag, value, choices in (('--clip-mode', args.clip_mode, _CLIP_MODES), ('--dist-bn', args.dist_bn, _DIST_BN),
                                 ('--lr-base-scale', args.lr_base_scale, _LR_BASE_SCALES)):
        if value not in choices:
            raise TrainError(f'{flag} must be one of {", ".join(repr(c) for c in choices)}, got {value!r}.')
    if args.torchcompile and args.torchcompile not in torch.compiler.list_backends(exclude_tags=()):
        raise TrainError(f'--torchcompile {args.torchcompile!r} is not a torch.compile backend: '
                         f'{", ".join(torch.compiler.list_backends())}.')


def _check_device(device: str) -> None:
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise TrainError(f'--device {device!r} is not a device: use cpu, cuda, cuda:<index>, mps, ...') from None
    if str(device).startswith('cuda') and not torch.cuda.is_available():
        raise TrainError(f'--device {device} but CUDA is not available: use --device cpu.')


def check_experiment(name: str, root: str, flag: str = '--experiment') -> None:
    """An --experiment names a folder inside --output: relative, without '..', each part a legal file name length."""
    if not name:
        return
    parts = name.replace(os.sep, '/').split('/')
    if os.path.isabs(name) or '..' in parts:
        raise TrainError(f'{flag} {name!r} must be a folder name inside --output (no absolute path, no ".."): put '
                         f'the location in --output.')
    path = os.path.abspath(root)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        name_max = os.pathconf(path, 'PC_NAME_MAX')
    except (AttributeError, OSError, ValueError):
        name_max = 255
    long = next((p for p in parts if len(os.fsencode(p)) > name_max), None)
    if long is not None:
        raise TrainError(f'{flag} is {len(os.fsencode(long))} bytes long, more than the {name_max} a file name may '
                         f'have here: pick a shorter name.')


def _given_in_chans(args: argparse.Namespace) -> Optional[int]:
    """Input channels given by flags (--in-chans, else --input-size), None when the model's default applies."""
    return args.in_chans or (args.input_size[0] if args.input_size else None)


def _model_in_chans(args: argparse.Namespace, model: nn.Module) -> int:
    """The input channels of the run: the flags', else the model's (timm's resolve_data_config rule)."""
    return _given_in_chans(args) or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3,))[0]


def _check_output_root(root: str) -> None:
    """--output must be a directory this process can create files in (or one it can create)."""
    path = os.path.abspath(root)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise TrainError(f'--output {root!r}: {path} is a file, not a directory; pick another --output.')
    if not os.access(path, os.W_OK | os.X_OK):
        raise TrainError(f'--output {root!r}: no permission to write in {path}; pick another --output.')


_SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))  # timm's


def _check_data_dir(args: argparse.Namespace) -> None:
    splits = [args.train_split] + ([args.val_split] if args.val_split else [])
    if not args.data_dir:
        raise TrainError('--data-dir is required (ImageFolder layout: DIR/train/<class>/*.png, DIR/validation/...).')
    if not os.path.exists(args.data_dir):
        raise TrainError(f'--data-dir {args.data_dir!r} does not exist.')
    if args.dataset:  # torch/, hfds/, ... datasets have their own layout
        return
    if os.path.isfile(args.data_dir):
        return  # a .tar archive
    for split in splits:
        names = next((group for group in _SPLIT_SYNONYMS if split in group), (split,))
        if not any(os.path.isdir(os.path.join(args.data_dir, name)) for name in names):
            raise TrainError(
                f'--data-dir {args.data_dir!r} has no {split!r} split folder (expected '
                f'{os.path.join(args.data_dir, split)}'
                f'/<class>/<image>); use --train-split/--val-split to name yours, --val-split "" for no evaluation.')


# --- model ----------------------------------------------------------------------------------------------------------

def _create_model(args: argparse.Namespace) -> nn.Module:
    import timm
    arch = split_model_name_tag(args.model)[0]
    if not (timm.is_model(arch) or is_weights_source(args.model)):
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.75)
        raise TrainError(
            f'Unknown model {args.model!r}. timm models: timm.list_models("<filter>") (TrAct twins end in '
            f'{twin_name("")})' + (f'; similar: {", ".join(close)}' if close else '') + '.')
    kwargs = dict(pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, global_pool=args.gp)
    in_chans = _given_in_chans(args)
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    if args.initial_checkpoint:
        kwargs['checkpoint_path'] = args.initial_checkpoint
    model_kwargs = dict(args.model_kwargs or {})
    dup = sorted(set(kwargs) & set(model_kwargs))
    if dup:
        raise TrainError(f'--model-kwargs repeats {dup}, which have their own flags (--num-classes, --drop, ...).')
    try:
        return timm.create_model(args.model, **kwargs, **model_kwargs)
    except TypeError as e:  # an unknown --model-kwargs key reaches the model class
        if model_kwargs and 'unexpected keyword argument' in str(e):
            raise TrainError(f'--model-kwargs: {args.model} does not take {e}.'.replace('.__init__()', '')) from None
        raise


def _route_tract_settings(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    """Put --tract-lambda and --tract-lambda-mode where TrAct is, decided from the built model and the optimizer name
    (never from the model name: an hf-hub:/local-dir: model of a TrAct run names its base architecture). Sets them on
    the model's TrAct layers, or returns the optimizer kwargs with them for a tract-* optimizer."""
    opt_kwargs = dict(args.opt_kwargs or {})
    settings = {key: getattr(args, key, None) for key in ('tract_lambda', 'tract_lambda_mode')}
    settings = {key: value for key, value in settings.items() if value is not None}
    if not settings:
        return opt_kwargs
    for key, value in settings.items():
        flag = '--' + key.replace('_', '-')
        for where, given in (('--model-kwargs', (args.model_kwargs or {}).get(key)),
                             ('--opt-kwargs', opt_kwargs.get(key))):
            if given is not None and given != value:
                raise TrainError(f'{flag} {value} and {where} {key}={given} disagree: give it once.')
    layers = [m for m in model.modules() if is_tract_layer(m)]
    if layers:
        for layer in layers:
            for key, value in settings.items():
                setattr(layer, key, value)
    elif is_tract_optimizer(args.opt):
        opt_kwargs.update(settings)
    else:
        flags = ' / '.join('--' + key.replace('_', '-') for key in settings)
        raise TrainError(
            f'{flags} needs TrAct in the run: {args.model} has no TrAct layer and {args.opt} is not a tract-* '
            f'optimizer; use a *_tract model (e.g. --model {twin_name(args.model.split(".")[0])}) or a tract-* '
            f'optimizer (e.g. --opt {TRACT_OPT_PREFIX}{base_optimizer_name(args.opt)}).')
    return opt_kwargs


def _tract_layer_names(model: nn.Module) -> List[str]:
    return [name for name, m in model.named_modules() if is_tract_layer(m)]


# --- data -----------------------------------------------------------------------------------------------------------

def _input_img_mode(args: argparse.Namespace, in_chans: int) -> str:
    """train.py's rule: --input-img-mode, else RGB for 3 input channels and L (grayscale) otherwise."""
    return args.input_img_mode or ('RGB' if in_chans == 3 else 'L')


def _check_channels(args: argparse.Namespace, in_chans: int) -> None:
    """The image mode the data is read in and --mean/--std must give the model's `in_chans` channels."""
    from PIL import Image
    mode = _input_img_mode(args, in_chans)
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        raise TrainError(f'--input-img-mode {mode!r} is not a PIL image mode (RGB, L, RGBA, LA, ...).') from None
    if not args.dataset and bands != in_chans:
        raise TrainError(f'the model takes {in_chans} input channels but the images are read as {mode} ({bands} '
                         f'channel{"s" * (bands != 1)}): give --in-chans {bands}, or an --input-img-mode with '
                         f'{in_chans} channels.')
    for flag, values in (('--mean', args.mean), ('--std', args.std)):
        if values is not None and len(values) not in (1, in_chans):
            raise TrainError(f'{flag} has {len(values)} values for {in_chans} input channels: give one value per '
                             f'channel (or one for all).')


def _create_datasets(args: argparse.Namespace, in_chans: int):
    from timm.data import create_dataset
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed, input_img_mode=_input_img_mode(args, in_chans))
    datasets = []
    for split, is_training in ((args.train_split, True), (args.val_split, False)):
        if not split:
            datasets.append(None)
            continue
        try:
            ds = create_dataset(args.dataset, split=split, is_training=is_training, **common)
        except RuntimeError as e:  # timm's ImageFolder reader: "Found 0 images in subfolders of ..."
            if 'Found 0 images' not in str(e):
                raise
            ds = []
        if len(ds) == 0:
            raise TrainError(f'the {split!r} split of --data-dir {args.data_dir!r} holds no images; put images in '
                             f'<split>/<class>/ folders (or name another split with --train-split/--val-split).')
        datasets.append(ds)
    train_ds, eval_ds = datasets
    if len(train_ds) < args.batch_size * args.world_size:
        raise TrainError(
            f'the train split has {len(train_ds)} images, fewer than one global batch ({args.batch_size} × '
            f'{args.world_size} processes): lower --batch-size.')
    return train_ds, eval_ds


def _dataset_num_classes(ds) -> Optional[int]:
    """Classes a dataset labels with (timm ImageFolder / tar readers, torchvision datasets), None if it cannot tell."""
    reader = getattr(ds, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(ds, 'classes', None)
    return len(classes) if classes else None


def _check_num_classes(args: argparse.Namespace, model: nn.Module, datasets) -> None:
    found = max((n for n in map(_dataset_num_classes, [d for d in datasets if d is not None]) if n), default=None)
    if found is not None and model.num_classes < found:
        raise TrainError(f'the data has {found} classes but the model predicts {model.num_classes}: pass '
                         f'--num-classes {found} (or leave it out when the model default is larger).')


def _native_image_size(ds) -> Optional[Tuple[int, int]]:
    """(H, W) of the data set's first image, when it is a PIL image (ImageFolder, torchvision data sets)."""
    from PIL import Image
    try:
        sample = ds[0][0]
    except Exception:  # readers that cannot index (iterable datasets): nothing to detect
        return None
    return (sample.height, sample.width) if isinstance(sample, Image.Image) else None


def _use_native_size(args: argparse.Namespace, model: nn.Module, train_ds, default_hw: Tuple[int, int]) -> None:
    """Train small images at their own size instead of silently resizing them up to the model's default input."""
    if args.img_size is not None or args.input_size is not None:
        return
    hw = _native_image_size(train_ds)
    if hw is None or max(hw) >= min(default_hw):
        return
    if (getattr(model, 'pretrained_cfg', None) or {}).get('fixed_input_size'):
        raise TrainError(
            f'the images are {hw[0]}x{hw[1]} px but {args.model} takes a fixed {default_hw[0]}x{default_hw[1]} px '
            f'input: pass --img-size {default_hw[0]} to resize them up, or build the model for the data with '
            f'--model-kwargs img_size={hw[0]}.')
    if hw[0] == hw[1]:
        args.img_size = hw[0]
    else:
        args.input_size = [args.in_chans or model.pretrained_cfg.get('input_size', (3,))[0], *hw]
    _logger.info(f'The images are {hw[0]}x{hw[1]} px, smaller than the {default_hw[0]}x{default_hw[1]} px default of '
                 f'{args.model}: training at {hw[0]}x{hw[1]} (pass --img-size to resize them).')


def _use_recorded_statistics(args: argparse.Namespace, in_chans: int) -> None:
    """Without --mean/--std, a data folder timm-tract prepared is standardized with its own recorded statistics (the
    inputs TrAct's λ advice assumes), not with the model's ImageNet ones (when they are per read channel)."""
    from .data import recorded_statistics
    stats = recorded_statistics(args.data_dir) if args.mean is None and args.std is None else None
    if stats is not None and all(len(v) in (1, in_chans) for v in stats):
        args.mean, args.std = stats
        _logger.info(f'standardizing with the data set\'s recorded mean {args.mean} / std {args.std} '
                     f'(give --mean/--std to override)')


def _create_loaders(args: argparse.Namespace, data_config: Dict[str, Any], device: torch.device, train_ds, eval_ds):
    from timm.data import create_loader
    common = dict(
        input_size=data_config['input_size'], interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher)
    loader_train = create_loader(
        train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa, **{**common, 'interpolation': args.train_interpolation})
    loader_eval = None
    if eval_ds is not None:
        loader_eval = create_loader(eval_ds, batch_size=args.validation_batch_size or args.batch_size,
                                    is_training=False, crop_pct=data_config['crop_pct'], **common)
    return loader_train, loader_eval


def _seed_epoch(loader, args: argparse.Namespace, epoch: int) -> None:
    """Data order and augmentation RNG of an epoch from (--seed, epoch) only.

    Single process: the RandomSampler draws torch.randperm(n) from a generator seeded with seed + epoch, exactly the
    permutation DistributedSampler(seed=seed).set_epoch(epoch) splits over ranks, so N processes see the same global
    batches as one process with N × --batch-size.
    """
    from timm.utils import random_seed
    sampler = loader.sampler
    if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        sampler.seed = args.seed
        sampler.set_epoch(epoch)
    elif isinstance(sampler, torch.utils.data.RandomSampler):
        sampler.generator = torch.Generator().manual_seed(args.seed + epoch)
    random_seed(args.seed + 1_000_003 * (epoch + 1), args.rank)  # augmentation, dropout, worker seeds


# --- optimizer, schedule, checkpoints -------------------------------------------------------------------------------

def _resolve_lr(args: argparse.Namespace) -> float:
    """train.py's rule: --lr, else --lr-base scaled by global batch / --lr-base-size (sqrt for ada*/lamb*)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _create_optimizer(args: argparse.Namespace, model: nn.Module, opt_kwargs: Dict[str, Any]):
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **opt_kwargs)
    except ValueError as e:
        if 'not found in registry' not in str(e):
            raise
        raise TrainError(f'Unknown optimizer {args.opt!r} ({e}); see timm.optim.list_optimizers() — every one has a '
                         f'TrAct twin {TRACT_OPT_PREFIX}<name>.') from None


def _tract_use(model_name: str, opt: str, tract_layers: List[str]) -> Optional[str]:
    """How a run uses TrAct ('TrAct layers conv1' / 'optimizer tract-sgd'), None when it does not."""
    if tract_layers:
        return f'TrAct layers {", ".join(tract_layers)} ({model_name})'
    return f'optimizer {opt}' if is_tract_optimizer(opt or '') else None


def _check_resume_keeps_tract(path: str, saved: Any, args: argparse.Namespace, model: nn.Module) -> None:
    """Resuming a TrAct run without TrAct (a plain --model / --opt) would silently train the rest without it."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if not isinstance(saved, dict):
        return  # a checkpoint without its run's args (not written by timm's CheckpointSaver): nothing to compare
    before = _tract_use(saved.get('model', '?'), saved.get('opt', ''), saved.get('tract_layers') or [])
    now = _tract_use(args.model, args.opt, _tract_layer_names(model))
    if before and not now:
        raise TrainError(f'--resume {path!r} was trained with TrAct ({before}) but this run has none '
                         f'(--model {args.model} --opt {args.opt}): resume with the run\'s own --model '
                         f'{saved.get("model")} --opt {saved.get("opt")}, or start a new run from its weights with '
                         f'--initial-checkpoint.')
    if now and not before:
        _logger.warning(f'--resume {path}: the checkpoint was trained without TrAct; the remaining epochs use {now}.')


def _check_resume_checkpoint(path: str, model: nn.Module, args: argparse.Namespace) -> None:
    """A --resume file must be a timm training checkpoint of this model (read with weights_only, nothing pickled),
    and of a run that used TrAct the same way."""
    from timm.models import clean_state_dict
    from timm.utils import load_checkpoint_metadata
    try:
        ckpt = load_checkpoint_metadata(path)
    except Exception as e:  # torch.load of a file that is not a checkpoint raises many kinds of errors
        raise TrainError(f'--resume {path!r} is not a readable timm checkpoint ({type(e).__name__}); give the '
                         f'last.pth.tar of a run, or start without --resume.') from None
    sd = ckpt.get('state_dict', ckpt.get('model')) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise TrainError(f'--resume {path!r} holds no model state_dict; give the last.pth.tar of a run.')
    own = model.state_dict()
    sd = clean_state_dict(sd)
    mismatched = sorted(k for k in set(own) | set(sd)
                        if k not in own or k not in sd or tuple(own[k].shape) != tuple(sd[k].shape))
    if mismatched:
        arch = ckpt.get('arch', 'another model')
        raise TrainError(f'--resume {path!r} was saved from {arch}, which does not match this model '
                         f'({len(mismatched)} tensors differ, e.g. {mismatched[0]}); resume with the --model and '
                         f'--model-kwargs the checkpoint was trained with.')
    _check_resume_keeps_tract(path, ckpt.get('args'), args, model)


def _make_saver(task, optimizer, args, loss_scaler, output_dir):
    """timm's CheckpointSaver; `last.pth.tar` is replaced atomically (os.replace, no unlink before it)."""
    from timm.utils import CheckpointSaver

    class _AtomicCheckpointSaver(CheckpointSaver):
        def _replace(self, src, dst):
            os.replace(src, dst)

    return _AtomicCheckpointSaver(
        model=task.get_trainable_module(), optimizer=optimizer, args=args, amp_scaler=loss_scaler,
        checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=args.eval_metric == 'loss',
        max_history=args.checkpoint_hist, task=task)


def _output_dir(args: argparse.Namespace, data_config: Dict[str, Any]) -> str:
    """The run directory; refused when it holds a run that can be resumed (unless this run resumes it)."""
    from timm.models import safe_model_name
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    out = os.path.join(args.output or os.path.join('.', 'output', 'train'), name)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TrainError(f'output dir {out!r} is a file; pick another --experiment / --output.')
    _refuse_existing_run(args, out)
    return out


def _refuse_existing_run(args: argparse.Namespace, out: str) -> None:
    resuming_here = bool(args.resume) and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(out)
    ckpt = None if resuming_here else rundir.resumable_checkpoint(out)
    if ckpt is not None:
        raise TrainError(
            f'output dir {out!r} already holds a run; resume it with --resume {ckpt}, '
            f'or pick another --experiment / --output (nothing was overwritten).')


def _claim_output(args: argparse.Namespace, out: str) -> Tuple[rundir.DirClaim, bool]:
    """Create the run directory (if needed) and claim it for this process, so a second run started into the same
    directory is refused; checks again, under the claim, that it holds no other run. Returns (claim, created)."""
    try:
        os.makedirs(out)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise TrainError(f'cannot create the output dir {out!r} ({e.strerror or e}); pick another --output.') from None
    claim = rundir.claim_dir(out, 'output dir')
    try:
        _refuse_existing_run(args, out)  # a run may have finished in there since _output_dir looked
    except BaseException:
        claim.release()
        raise
    return claim, created


# --- the run --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    """What a run produced. `history` has one dict per epoch (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr;
    eval_* None without evaluation). On rank 0 it is read back from summary.csv, so it includes the epochs before a
    --resume and `best_*` is the checkpoint saver's record; on other ranks it holds the epochs this process ran and
    `best_*` is NaN / -1."""
    output_dir: str
    best_metric: float
    best_epoch: int
    history: List[Dict[str, Any]]


@dataclasses.dataclass
class _Run:
    """Everything the epochs need, built once by `train` (train.py's locals, named)."""
    args: argparse.Namespace
    device: torch.device
    primary: bool
    task: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    amp_autocast: Callable
    loss_scaler: Any
    loader_train: Any
    loader_eval: Any
    lr_scheduler: Any
    num_epochs: int
    updates_per_epoch: int
    start_epoch: int
    output_dir: str
    data_config: Dict[str, Any]
    saver: Any = None
    num_updates: int = 0


class _Progress:
    """One progress bar per epoch: redrawn on stderr in a terminal, else a log line every --log-interval batches.

    Silenced with the library's logger (`logging.getLogger('timm_tract.train').setLevel(logging.WARNING)`)."""

    def __init__(self, epoch: int, epochs: int, total: int, enabled: bool, log_interval: int):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.enabled = enabled and _logger.isEnabledFor(logging.INFO)
        self.log_interval = max(1, log_interval)
        self.tty = self.enabled and sys.stderr.isatty()
        self.start = time.time()

    def update(self, done: int, loss: torch.Tensor, lr: float) -> None:
        if not self.enabled or not (self.tty or done % self.log_interval == 0 or done == self.total):
            return
        loss = loss.item()
        width = 24
        fill = int(width * done / max(self.total, 1))
        rate = done / max(time.time() - self.start, 1e-9)
        line = (f'epoch {self.epoch + 1}/{self.epochs} [{"#" * fill}{"." * (width - fill)}] {done}/{self.total} '
                f'loss {loss:.4f} lr {lr:.3g} {rate:.1f} it/s')
        if not self.tty:
            _logger.info(line)
            return
        sys.stderr.write('\r' + line + ('\n' if done == self.total else ''))
        sys.stderr.flush()


def _train_one_epoch(run: _Run, epoch: int) -> Dict[str, float]:
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad, reduce_tensor

    args, task, optimizer, model = run.args, run.task, run.optimizer, run.task.get_trainable_module()
    second_order = getattr(optimizer, 'is_second_order', False)
    accum = args.grad_accum_steps
    num_batches = len(run.loader_train)
    last_window_start = num_batches - num_batches % accum  # train.py: the last, partial window is its real size
    progress = _Progress(epoch, run.num_epochs, num_batches, run.primary, args.log_interval)
    task.train()
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=run.device), 0
    optimizer.zero_grad()
    for batch_idx, (x, y) in enumerate(run.loader_train):
        last = batch_idx + 1 == num_batches
        need_update = last or (batch_idx + 1) % accum == 0
        if not args.prefetcher:
            x, y = x.to(run.device), y.to(run.device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync_ctx = nullcontext() if need_update or not args.distributed else task.no_sync()
        with sync_ctx:
            with run.amp_autocast():
                loss = task(x, y)['loss']
            window = accum if batch_idx < last_window_start else num_batches % accum
            scaled = loss / window if window > 1 else loss
            if run.loss_scaler is not None:
                run.loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                                parameters=model_parameters(model, exclude_head='agc' in args.clip_mode),
                                create_graph=second_order, need_update=need_update)
            else:
                scaled.backward(create_graph=second_order)
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(model_parameters(model, exclude_head='agc' in args.clip_mode),
                                           value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        loss_sum += loss.detach().double() * x.shape[0]
        count += x.shape[0]
        if need_update:
            optimizer.zero_grad()
            run.num_updates += 1
            task.update_ema(step=run.num_updates)
            if run.lr_scheduler is not None:
                run.lr_scheduler.step_update(num_updates=run.num_updates)
        progress.update(batch_idx + 1, loss, optimizer.param_groups[0]['lr'])
    avg = loss_sum / max(count, 1)
    if args.distributed:
        avg = reduce_tensor(avg, args.world_size)
    return {'loss': avg.item()}


@torch.no_grad()
def _validate(run: _Run, model: nn.Module) -> Dict[str, float]:
    from timm.utils import accuracy, reduce_tensor
    args = run.args
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    totals = torch.zeros(4, dtype=torch.float64)  # loss·n, top1·n, top5·n, n
    topk = (1, min(5, args.num_classes))
    for x, y in run.loader_eval:
        if not args.prefetcher:
            x, y = x.to(run.device), y.to(run.device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.amp_autocast():
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            loss = loss_fn(out, y)
        acc1, acc5 = accuracy(out.float(), y, topk=topk)
        n = x.shape[0]
        totals += torch.tensor([loss.item() * n, acc1.item() * n, acc5.item() * n, n], dtype=torch.float64)
    if args.distributed:
        totals = reduce_tensor(totals.to(run.device), 1).cpu()  # sum over ranks
    n = max(totals[3].item(), 1)
    return {'loss': totals[0].item() / n, 'top1': totals[1].item() / n, 'top5': totals[2].item() / n}


def _evaluate(run: _Run) -> Optional[Dict[str, float]]:
    if run.loader_eval is None:
        return None
    metrics = _validate(run, run.task.get_eval_model())
    if run.task.has_ema() and not run.args.model_ema_force_cpu:
        metrics = _validate(run, run.task.get_eval_model(ema=True))
    return metrics


def _write_summary(run: _Run, epoch: int, row: Tuple[Dict[str, float], Optional[Dict[str, float]], float]) -> None:
    from timm.utils import update_summary
    train_metrics, eval_metrics, lr = row
    update_summary(epoch, train_metrics, eval_metrics, filename=os.path.join(run.output_dir, rundir.SUMMARY_FILE),
                   lr=lr)


def _save_epoch(run: _Run, epoch: int, row: Tuple[Dict[str, float], Optional[Dict[str, float]], float],
                metric: Optional[float]) -> None:
    """Add the epoch's summary row, then checkpoint it (as train.py; a resume drops rows of epochs it runs again).

    On a write error: remove the temp file, keep the previous last.pth.tar, take the epoch's row out of summary.csv
    unless its checkpoint landed, and stop with a TrainError that says whether to resume (from which file) or re-run.
    """
    from timm.utils import load_checkpoint_metadata, trim_summary
    summary = os.path.join(run.output_dir, rundir.SUMMARY_FILE)
    try:
        _write_summary(run, epoch, row)
        run.saver.save_checkpoint(epoch, metric=metric)
    except OSError as e:
        tmp = os.path.join(run.output_dir, rundir.TEMP_CHECKPOINT)
        if os.path.exists(tmp):
            os.remove(tmp)
        ckpt, saved = rundir.resumable_checkpoint(run.output_dir), None
        if ckpt is not None:
            try:
                saved = int(load_checkpoint_metadata(str(ckpt))['epoch'])
            except Exception:  # a checkpoint that cannot be read is no resume point
                ckpt = None
        if saved != epoch:
            trim_summary(summary, epoch)
        what = f'{type(e).__name__}: {e.strerror or e}'
        if ckpt is None:
            raise TrainError(f'writing the checkpoint of epoch {epoch + 1} to {run.output_dir} failed ({what}); no '
                             f'checkpoint is on disk: free space or fix the folder, then run the same command again.'
                             ) from None
        raise TrainError(f'writing the checkpoint of epoch {epoch + 1} to {run.output_dir} failed ({what}); '
                         f'{ckpt.name} holds epoch {saved + 1}: free space or fix the folder, then resume with '
                         f'--resume {ckpt}.') from None


def _run_epochs(run: _Run) -> List[Dict[str, Any]]:
    """train.py's epoch loop: train, distribute BN stats, evaluate (EMA too), checkpoint + summary, schedule."""
    from timm.utils import distribute_bn
    args = run.args
    history: List[Dict[str, Any]] = []
    for epoch in range(run.start_epoch, run.num_epochs):
        _seed_epoch(run.loader_train, args, epoch)
        train_metrics = _train_one_epoch(run, epoch)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(run.model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = _evaluate(run)
        lr = sum(g['lr'] for g in run.optimizer.param_groups) / len(run.optimizer.param_groups)
        metric = None if eval_metrics is None else eval_metrics[args.eval_metric]
        if run.primary:
            _save_epoch(run, epoch, (train_metrics, eval_metrics, lr), metric)
        history.append({'epoch': epoch, 'train_loss': train_metrics['loss'], 'lr': lr,
                        **{f'eval_{k}': (eval_metrics or {}).get(k) for k in ('loss', 'top1', 'top5')}})
        run.lr_scheduler.step(epoch + 1, metric)
    return history


def _setup_device(args: argparse.Namespace) -> torch.device:
    """timm's init_distributed_device: torchrun env → DDP process group (nccl for cuda, gloo for cpu)."""
    from timm.utils import init_distributed_device
    return init_distributed_device(args)


def _build_model(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model (λ set on its TrAct layers) and the optimizer kwargs; fills in --num-classes from the model."""
    with _user_input('model'):
        model = _create_model(args)
        if args.num_classes is None:
            args.num_classes = model.num_classes
        opt_kwargs = _route_tract_settings(args, model)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(enable=True)
    return model, opt_kwargs


def _build_optimizer(args: argparse.Namespace, model: nn.Module, opt_kwargs: Dict[str, Any]):
    with _user_input('optimizer'):
        args.lr = _resolve_lr(args)
        return _create_optimizer(args, model, opt_kwargs)


def _build_scheduler(args: argparse.Namespace, optimizer, updates_per_epoch: int):
    """timm's create_scheduler_v2 from the flags: (scheduler, number of epochs)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    with _user_input('scheduler'):
        return create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                                   updates_per_epoch=updates_per_epoch)


def _check_construction(args: argparse.Namespace) -> None:
    """Build the model, optimizer and scheduler on the meta device (no pretrained or initial weights loaded)."""
    import timm_tract  # noqa: F401  (registers *_tract models and tract-* optimizers)

    meta = argparse.Namespace(**vars(args))
    meta.pretrained, meta.initial_checkpoint = False, ''
    meta.world_size = getattr(args, 'world_size', None) or int(os.environ.get('WORLD_SIZE', 1))
    try:
        with torch.device('meta'):
            model, opt_kwargs = _build_model(meta)
            with _user_input('data'):
                _check_channels(meta, _model_in_chans(meta, model))
            optimizer = _build_optimizer(meta, model, opt_kwargs)
            _build_scheduler(meta, optimizer, updates_per_epoch=1)
    except RuntimeError as e:  # a model whose __init__ reads tensor values cannot be built on meta: train checks it
        if 'meta' not in str(e):
            raise
        _logger.debug(f'{args.model} cannot be built on the meta device ({e}); its run checks it when it starts')


def _build_run(args: argparse.Namespace) -> _Run:
    """Device, model, data, optimizer, restore, EMA/compile/DDP, loaders and schedule: everything but the output."""
    from timm.data import resolve_data_config
    from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
    from timm.utils import NativeScaler, random_seed

    device = _setup_device(args)
    primary = args.rank == 0
    random_seed(args.seed, args.rank)

    model, opt_kwargs = _build_model(args)
    with _user_input('data'):
        in_chans = _model_in_chans(args, model)
        _check_channels(args, in_chans)
        _use_recorded_statistics(args, in_chans)
        train_ds, eval_ds = _create_datasets(args, in_chans)
        _check_num_classes(args, model, (train_ds, eval_ds))
        _use_native_size(args, model, train_ds, tuple(resolve_data_config({}, model=model)['input_size'][1:]))
        data_config = resolve_data_config(vars(args), model=model)  # logged once the run starts (_open_output)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = None
    if args.amp and amp_dtype == torch.float16 and device.type == 'cuda':  # train.py: scaler for CUDA fp16 only
        loss_scaler = NativeScaler(device=device.type)

    task = ClassificationTask(model, criterion_kwargs=dict(smoothing=args.smoothing), device=device, verbose=False)
    model = task.get_trainable_module()
    optimizer = _build_optimizer(args, model, opt_kwargs)
    args.tract_layers = _tract_layer_names(model)  # recorded in args.yaml: whether and where this run used TrAct
    args.architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')

    start_epoch = 0
    if args.resume:
        _check_resume_checkpoint(args.resume, model, args)
        start_epoch = resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=loss_scaler,
            log_info=primary) or 0
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device='cpu' if args.model_ema_force_cpu else None)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile:
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    with _user_input('data'):
        loader_train, loader_eval = _create_loaders(args, data_config, device, train_ds, eval_ds)
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = _build_scheduler(args, optimizer, updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    return _Run(args=args, device=device, primary=primary, task=task, model=model, optimizer=optimizer,
                amp_autocast=amp_autocast, loss_scaler=loss_scaler, loader_train=loader_train,
                loader_eval=loader_eval, lr_scheduler=lr_scheduler, num_epochs=num_epochs,
                updates_per_epoch=updates_per_epoch, start_epoch=start_epoch,
                output_dir=_output_dir(args, data_config), data_config=data_config,
                num_updates=start_epoch * updates_per_epoch)


def _open_output(run: _Run) -> None:
    """In the claimed run directory (rank 0): restore the saver's history when resuming into it, drop summary rows
    of epochs that run again, write args.yaml and data_facts.json."""
    from timm.utils import trim_summary
    from .data import describe_data
    args, out = run.args, run.output_dir
    run.saver = _make_saver(run.task, run.optimizer, args, run.loss_scaler, out)
    if args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(out):
        run.saver.load_state_dict_from_checkpoint(args.resume)
    trim_summary(os.path.join(out, rundir.SUMMARY_FILE), run.start_epoch)
    rundir.write_args(out, vars(args))
    rundir.write_data_facts(out, rundir.dataset_label_names(run.loader_train.dataset), describe_data(args.data_dir))
    _logger.info(f'{args.model} / {args.opt}: {run.num_epochs} epochs from {run.start_epoch}, lr {args.lr:.4g}, '
                 f'{args.world_size} process(es), input {run.data_config["input_size"]}, mean '
                 f'{tuple(round(v, 4) for v in run.data_config["mean"])}, std '
                 f'{tuple(round(v, 4) for v in run.data_config["std"])}, output {out}')


def train(args: argparse.Namespace) -> TrainResult:
    """Run one training as configured by `timm_tract.flags.build_train_parser()` arguments (train.py's output layout).

    Raises TrainError (a TimmTractError) for bad input, before anything is written where it can tell. The caller's
    namespace is not changed.
    """
    import timm_tract  # noqa: F401  (registers *_tract models and tract-* optimizers, also for train(args) callers)

    args = argparse.Namespace(**vars(args))
    check_train_args(args)
    run = _build_run(args)
    claim, created = _claim_output(args, run.output_dir) if run.primary else (None, False)
    try:
        if run.primary:
            _open_output(run)
        history = _run_epochs(run)
    except BaseException:
        if created and rundir.resumable_checkpoint(run.output_dir) is None:
            shutil.rmtree(run.output_dir, ignore_errors=True)  # nothing to resume: leave nothing that blocks a re-run
        if claim is not None:
            claim.release()
        raise
    best_metric, best_epoch = None, None
    if run.primary:
        history = rundir.read_history(run.output_dir) or history
        best_metric, best_epoch = run.saver.best_metric, run.saver.best_epoch
        claim.release()
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(
        output_dir=run.output_dir,
        best_metric=float('nan') if best_metric is None else float(best_metric),
        best_epoch=-1 if best_epoch is None else int(best_epoch),
        history=history,
    )
