""" The `timm-tract train` flags: timm train.py's names, defaults and meanings (the subset `--help` lists), plus the
TrAct flags. Argparse only: `compare`, `cards` and `cli` read the flags from here without importing the engine.
"""
import argparse
import os
from typing import Dict

import torch

__all__ = ['build_train_parser', 'train_flags', 'HelpFormatter', 'cpu_count']


# --- the flags ------------------------------------------------------------------------------------------------------

def cpu_count() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once: not when the help states it already, nor for empty / unset / off defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if '(default' in text or '%(default)' in text or action.default in (None, '', False, [], {}):
            return text
        return super()._get_help_string(action)


def _flag_group(parser: argparse.ArgumentParser, title: str):
    """An argument group whose flags are recorded in `parser.train_flags` (dest -> Action), see `train_flags`."""
    group = parser.add_argument_group(title)
    add = group.add_argument

    def add_argument(*args, **kwargs) -> argparse.Action:
        action = add(*args, **kwargs)
        parser.train_flags[action.dest] = action
        return action
    group.add_argument = add_argument
    return group


def train_flags() -> Dict[str, argparse.Action]:
    """Every `timm-tract train` flag by its argparse destination (names, defaults and meanings of train.py's)."""
    return dict(build_train_parser().train_flags)


def build_train_parser() -> argparse.ArgumentParser:
    """Parser with timm train.py's flag names, defaults and meanings (the subset listed in `--help`), plus
    `--tract-lambda`."""
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog='timm-tract train', formatter_class=HelpFormatter,
        description='Train a timm model (with TrAct: a *_tract model or a tract-* optimizer) like timm\'s train.py.')
    p.train_flags = {}
    g = _flag_group(p, 'Dataset')
    g.add_argument('--data-dir', metavar='DIR', help='dataset root (ImageFolder: DIR/<split>/<class>/*.png)')
    g.add_argument('--dataset', '-d', metavar='NAME', default='',
                   help="dataset type, e.g. torch/cifar10 (default: '', an ImageFolder)")
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation', help="'' disables evaluation")
    g.add_argument('--dataset-download', action='store_true', default=False)
    g.add_argument('--class-map', default='', metavar='FILENAME')
    g.add_argument('--input-img-mode', default=None, type=str, metavar='MODE',
                   help="image mode the data is read in: RGB, L (grayscale), ... (default: RGB for 3 input "
                        "channels, L for 1, as train.py)")
    g = _flag_group(p, 'Model')
    g.add_argument('--model', default='resnet50', metavar='MODEL', help='timm model, e.g. resnet50 or resnet50_tract')
    g.add_argument('--pretrained', action='store_true', default=False)
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load model weights from this checkpoint')
    g.add_argument('--resume', default='', metavar='PATH', help='resume model, optimizer, scaler, EMA and epoch')
    g.add_argument('--no-resume-opt', action='store_true', default=False)
    g.add_argument('--num-classes', type=int, default=None, metavar='N')
    g.add_argument('--gp', default=None, metavar='POOL', help='global pool type (model default if None)')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='input size (data only, as in train.py)')
    g.add_argument('--in-chans', type=int, default=None, metavar='N')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    g.add_argument('--interpolation', default='', metavar='NAME')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N')
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='k=v passed to create_model')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND')
    g.add_argument('--torchcompile-mode', type=str, default=None)
    g = _flag_group(p, 'TrAct')
    g.add_argument('--tract-lambda', type=float, default=None, metavar='LAMBDA',
                   help='TrAct λ (> 0; 0.1 when not given): set on the TrAct layers of the built model (a *_tract '
                        'model), else passed to a tract-* optimizer')
    g.add_argument('--tract-lambda-mode', choices=('absolute', 'relative'), default=None,
                   help="'absolute' (when not given; the paper's XᵀX/N + λI) or 'relative' (XᵀX/N + λ·s·I with s the "
                        "mean second moment of the patch entries: λ independent of the input's scale); routed like "
                        "--tract-lambda")
    g = _flag_group(p, 'Optimizer')
    g.add_argument('--opt', default='sgd', metavar='OPTIMIZER', help='timm optimizer, e.g. sgd, adamw, tract-sgd')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='k=v passed to the optimizer (tract_lambda=, tract_sync_gram= for tract-*)')
    g = _flag_group(p, 'Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (default: --lr-base × global batch / --lr-base-size)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help="linear or sqrt ('' = by optimizer)")
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR')
    g.add_argument('--epochs', type=int, default=300, metavar='N')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    g = _flag_group(p, 'Augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    g.add_argument('--aa', type=str, default=None, metavar='NAME')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT')
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', type=str, default='random')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT')
    g = _flag_group(p, 'Model EMA')
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')
    g = _flag_group(p, 'Miscellaneous')
    g.add_argument('--seed', type=int, default=42, metavar='S')
    g.add_argument('--log-interval', type=int, default=50, metavar='N')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    g.add_argument('-j', '--workers', type=int, default=min(4, cpu_count()), metavar='N',
                   help='data loader processes (train.py: 4; here at most the number of CPU cores)')
    g.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    g.add_argument('--amp-dtype', default='float16', type=str, help='float16 or bfloat16')
    g.add_argument('--no-prefetcher', action='store_false', dest='prefetcher', default=True)
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--output', default='', metavar='PATH', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', metavar='NAME', help='subfolder of --output (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1', metavar='EVAL_METRIC', help='top1, top5 or loss')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda, cpu, cuda:1, ...')
    g.add_argument('--dist-backend', default=None, help='process group backend (default: nccl for cuda, gloo for cpu)')
    g.add_argument('--dist-url', default=None, help='process group init URL (default: env://, set by torchrun)')
    g.add_argument('--dist-bn', type=str, default='reduce', help="BatchNorm stats across ranks: broadcast, reduce, ''")
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP broadcast_buffers=False')
    return p
