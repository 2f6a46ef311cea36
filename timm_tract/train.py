""" `timm-tract train`: one training run from timm's library pieces, with timm train.py's flags and output layout.

Same call sequence as timm's train.py (create_model → ClassificationTask → create_optimizer_v2 → resume → EMA →
torch.compile → DDP → epochs), so a `*_tract` model or a `tract-*` optimizer behaves here as in train.py. The output
directory is train.py's: `args.yaml`, `summary.csv` (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr),
`last.pth.tar`, `model_best.pth.tar`, `checkpoint-<epoch>.pth.tar` (timm's CheckpointSaver format).

Differences from train.py, all in the direction of reproducible, comparable runs:
- the data order of epoch e is a function of (--seed, e) only: the same in a baseline and a TrAct run, in a resumed
  run, and the same global batches for 1 process and for N torchrun processes (global batch = N × --batch-size);
- `--device` defaults to cuda when available, else cpu; torchrun DDP also runs on cpu (gloo);
- an existing output dir is never trained over unless the run resumes from a checkpoint inside it;
- `last.pth.tar` is replaced atomically (temp file + rename), so a kill never leaves it corrupt or missing.
"""
import argparse
import csv
import difflib
import logging
import os
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import yaml

__all__ = ['build_train_parser', 'train', 'TrainError']

_logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')


class TrainError(ValueError):
    """Bad training input (data dir, model name, flags); the message names the problem and the fix."""


# --- arguments ------------------------------------------------------------------------------------------------------

def build_train_parser() -> argparse.ArgumentParser:
    """Parser with timm train.py's flag names, defaults and meanings (the subset listed in `--help`), plus
    `--tract-lambda`."""
    from timm.utils import ParseKwargs

    p = argparse.ArgumentParser(
        prog='timm-tract train', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Train a timm model (with TrAct: a *_tract model or a tract-* optimizer) like timm\'s train.py.')
    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', metavar='DIR', help='dataset root (ImageFolder: DIR/<split>/<class>/*.png)')
    g.add_argument('--dataset', '-d', metavar='NAME', default='', help='dataset type, e.g. torch/cifar10 ('' = folder)')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation', help="'' disables evaluation")
    g.add_argument('--dataset-download', action='store_true', default=False)
    g.add_argument('--class-map', default='', metavar='FILENAME')
    g = p.add_argument_group('Model')
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
    g = p.add_argument_group('TrAct')
    g.add_argument('--tract-lambda', type=float, default=None, metavar='LAMBDA',
                   help='TrAct λ: create_model kwarg for a *_tract model, optimizer kwarg for a tract-* optimizer '
                        '(default: 0.1)')
    g = p.add_argument_group('Optimizer')
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
    g = p.add_argument_group('Learning rate schedule')
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
    g = p.add_argument_group('Augmentation and regularization')
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
    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')
    g = p.add_argument_group('Miscellaneous')
    g.add_argument('--seed', type=int, default=42, metavar='S')
    g.add_argument('--log-interval', type=int, default=50, metavar='N')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    g.add_argument('--amp', action='store_true', default=False, help='mixed precision (torch.autocast)')
    g.add_argument('--amp-dtype', default='float16', type=str, help='float16 or bfloat16')
    g.add_argument('--no-prefetcher', action='store_false', dest='prefetcher', default=True)
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--output', default='', metavar='PATH', help='output root (default: ./output/train)')
    g.add_argument('--experiment', default='', metavar='NAME', help='subfolder of --output (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1', metavar='EVAL_METRIC', help='top1, top5 or loss')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda, cpu, cuda:1, ...')
    g.add_argument('--dist-backend', default=None, help='default: nccl for cuda, gloo for cpu')
    g.add_argument('--dist-url', default=None, help='default: env:// (torchrun)')
    g.add_argument('--dist-bn', type=str, default='reduce', help="BatchNorm stats across ranks: broadcast, reduce, ''")
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP broadcast_buffers=False')
    return p


def _route_tract_lambda(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_kwargs, opt_kwargs) with `--tract-lambda` placed where TrAct is used."""
    model_kwargs, opt_kwargs = dict(args.model_kwargs or {}), dict(args.opt_kwargs or {})
    if args.tract_lambda is None:
        return model_kwargs, opt_kwargs
    via_model = args.model.split('.')[0].endswith('_tract')
    via_opt = args.opt.lower().split('_')[-1].startswith('tract-')
    if not (via_model or via_opt):
        raise TrainError(
            f'--tract-lambda needs TrAct in the run: use a *_tract model (e.g. --model {args.model}_tract) or a '
            f'tract-* optimizer (e.g. --opt tract-{args.opt.split("_")[-1]}).')
    target = model_kwargs if via_model else opt_kwargs
    flag = '--model-kwargs' if via_model else '--opt-kwargs'
    if 'tract_lambda' in target and target['tract_lambda'] != args.tract_lambda:
        raise TrainError(f'--tract-lambda {args.tract_lambda} and {flag} tract_lambda={target["tract_lambda"]} '
                         f'disagree: give λ once.')
    target['tract_lambda'] = args.tract_lambda
    return model_kwargs, opt_kwargs


# --- building blocks ------------------------------------------------------------------------------------------------

def _create_model(args: argparse.Namespace, model_kwargs: Dict[str, Any]) -> nn.Module:
    import timm
    arch = args.model.split('.')[0]
    if not (timm.is_model(arch) or args.model.startswith(('hf-hub:', 'hf_hub:', 'local-dir:'))):
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.75)
        raise TrainError(
            f'Unknown model {args.model!r}. timm models: timm.list_models("<filter>") (TrAct twins end in _tract)'
            + (f'; similar: {", ".join(close)}' if close else '') + '.')
    kwargs = dict(pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
                  drop_path_rate=args.drop_path, global_pool=args.gp)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
    if in_chans is not None:
        kwargs['in_chans'] = in_chans
    if args.initial_checkpoint:
        kwargs['checkpoint_path'] = args.initial_checkpoint
    dup = sorted(set(kwargs) & set(model_kwargs))
    if dup:
        raise TrainError(f'--model-kwargs repeats {dup}, which have their own flags (--num-classes, --drop, ...).')
    return timm.create_model(args.model, **kwargs, **model_kwargs)


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


def _create_datasets(args: argparse.Namespace):
    from timm.data import create_dataset
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
    train_ds = create_dataset(args.dataset, split=args.train_split, is_training=True, **common)
    eval_ds = None
    if args.val_split:
        eval_ds = create_dataset(args.dataset, split=args.val_split, is_training=False, **common)
    if len(train_ds) < args.batch_size * args.world_size:
        raise TrainError(
            f'the train split has {len(train_ds)} images, fewer than one global batch ({args.batch_size} × '
            f'{args.world_size} processes): lower --batch-size.')
    return train_ds, eval_ds


def _resolve_lr(args: argparse.Namespace) -> float:
    """train.py's rule: --lr, else --lr-base scaled by global batch / --lr-base-size (sqrt for ada*/lamb*)."""
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


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
    from timm.models import safe_model_name
    name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(data_config['input_size'][-1])])
    out = os.path.join(args.output or os.path.join('.', 'output', 'train'), name)
    resuming_here = bool(args.resume) and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(out)
    if not resuming_here and any(os.path.exists(os.path.join(out, f)) for f in ('last.pth.tar', 'summary.csv')):
        raise TrainError(
            f'output dir {out!r} already holds a run; resume it with --resume {os.path.join(out, "last.pth.tar")}, '
            f'or pick another --experiment / --output (nothing was overwritten).')
    return out


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


class _Progress:
    """One progress bar per epoch on stderr (redrawn in a terminal, a line every --log-interval batches otherwise)."""

    def __init__(self, epoch: int, epochs: int, total: int, enabled: bool, log_interval: int):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.enabled, self.log_interval = enabled, max(1, log_interval)
        self.tty = enabled and sys.stderr.isatty()
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
        sys.stderr.write(('\r' + line) if self.tty else (line + '\n'))
        if self.tty and done == self.total:
            sys.stderr.write('\n')
        sys.stderr.flush()


# --- loops ----------------------------------------------------------------------------------------------------------

def _train_one_epoch(
        epoch, task, loader, optimizer, args, device, amp_autocast, loss_scaler, lr_scheduler, num_updates,
        progress) -> Tuple[Dict[str, float], int]:
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad, reduce_tensor

    model = task.get_trainable_module()
    second_order = getattr(optimizer, 'is_second_order', False)
    accum = args.grad_accum_steps
    num_batches = len(loader)
    task.train()
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
    optimizer.zero_grad()
    for batch_idx, (x, y) in enumerate(loader):
        last = batch_idx + 1 == num_batches
        need_update = last or (batch_idx + 1) % accum == 0
        if not args.prefetcher:
            x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync_ctx = nullcontext() if need_update or not args.distributed else task.no_sync()
        with sync_ctx:
            with amp_autocast():
                loss = task(x, y)['loss']
            scaled = loss / accum if accum > 1 else loss
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
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
            num_updates += 1
            task.update_ema(step=num_updates)
            if lr_scheduler is not None:
                lr_scheduler.step_update(num_updates=num_updates)
        progress.update(batch_idx + 1, loss, optimizer.param_groups[0]['lr'])
    avg = loss_sum / max(count, 1)
    if args.distributed:
        avg = reduce_tensor(avg, args.world_size)
    return {'loss': avg.item()}, num_updates


@torch.no_grad()
def _validate(model, loader, args, device, amp_autocast) -> Dict[str, float]:
    from timm.utils import accuracy, reduce_tensor
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    totals = torch.zeros(4, dtype=torch.float64)  # loss·n, top1·n, top5·n, n
    topk = (1, min(5, args.num_classes))
    for x, y in loader:
        if not args.prefetcher:
            x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            loss = loss_fn(out, y)
        acc1, acc5 = accuracy(out.float(), y, topk=topk)
        n = x.shape[0]
        totals += torch.tensor([loss.item() * n, acc1.item() * n, acc5.item() * n, n], dtype=torch.float64)
    if args.distributed:
        totals = reduce_tensor(totals.to(device), 1).cpu()  # sum over ranks
    n = max(totals[3].item(), 1)
    return {'loss': totals[0].item() / n, 'top1': totals[1].item() / n, 'top5': totals[2].item() / n}


def _read_history(summary_path: str) -> List[Dict[str, Optional[float]]]:
    if not os.path.exists(summary_path):
        return []
    with open(summary_path, newline='') as f:
        rows = list(csv.DictReader(f))

    def num(v):
        return None if v in (None, '') else float(v)
    return [{k: (int(float(r['epoch'])) if k == 'epoch' else num(r.get(k))) for k in SUMMARY_FIELDS} for r in rows]


# --- the run --------------------------------------------------------------------------------------------------------

def _setup_device(args: argparse.Namespace) -> torch.device:
    """timm's init_distributed_device: torchrun env → DDP process group (nccl for cuda, gloo for cpu)."""
    from timm.utils import init_distributed_device
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise TrainError(f'--device {args.device} but CUDA is not available: use --device cpu.')
    return init_distributed_device(args)


def train(args: argparse.Namespace) -> dict:
    """Run one training as configured by `build_train_parser()` arguments.

    Writes train.py's output layout and returns {'output_dir', 'best_metric' (best --eval-metric; NaN without
    evaluation), 'best_epoch' (-1 without evaluation), 'history': [{'epoch', 'train_loss', 'eval_loss', 'eval_top1',
    'eval_top5', 'lr'}, ...] (every epoch of the run, also those before a --resume; eval_* None without evaluation)}.
    Raises TrainError for bad input.
    """
    import timm  # noqa: F401  (model registry)
    import timm_tract  # noqa: F401  (registers *_tract models and tract-* optimizers, also for train(args) callers)
    from timm.data import create_loader, resolve_data_config
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.task import ClassificationTask, load_task_ema_checkpoint, resume_task_checkpoint
    import timm.utils
    from timm.utils import NativeScaler, distribute_bn, random_seed, update_summary

    args = argparse.Namespace(**vars(args))  # never mutate the caller's namespace
    if args.grad_accum_steps < 1:
        raise TrainError('--grad-accum-steps must be >= 1.')
    if args.amp_dtype not in ('float16', 'bfloat16'):
        raise TrainError(f'--amp-dtype must be float16 or bfloat16, got {args.amp_dtype!r}.')
    model_kwargs, opt_kwargs = _route_tract_lambda(args)
    _check_data_dir(args)
    device = _setup_device(args)
    primary = args.rank == 0
    random_seed(args.seed, args.rank)

    model = _create_model(args, model_kwargs)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = None
    if args.amp and amp_dtype == torch.float16 and device.type == 'cuda':  # train.py: scaler for CUDA fp16 only
        loss_scaler = NativeScaler(device=device.type)

    train_ds, eval_ds = _create_datasets(args)
    args.lr = _resolve_lr(args)

    task = ClassificationTask(model, criterion_kwargs=dict(smoothing=args.smoothing), device=device, verbose=False)
    model = task.get_trainable_module()
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **opt_kwargs)
    except ValueError as e:
        if 'not found in registry' not in str(e):
            raise
        raise TrainError(f'Unknown optimizer {args.opt!r} ({e}); see timm.optim.list_optimizers() — every one has a '
                         f'TrAct twin tract-<name>.') from None

    start_epoch = 0
    if args.resume:
        if not os.path.isfile(args.resume):
            raise TrainError(f'--resume {args.resume!r} is not a file (expected e.g. <output dir>/last.pth.tar).')
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

    loader_common = dict(
        input_size=data_config['input_size'], interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher)
    loader_train = create_loader(
        train_ds, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, auto_augment=args.aa,
        **{**loader_common, 'interpolation': args.train_interpolation})
    loader_eval = None
    if eval_ds is not None:
        loader_eval = create_loader(eval_ds, batch_size=args.validation_batch_size or args.batch_size,
                                    is_training=False, crop_pct=data_config['crop_pct'], **loader_common)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    output_dir = _output_dir(args, data_config)
    summary_path = os.path.join(output_dir, 'summary.csv')
    saver = None
    if primary:
        os.makedirs(output_dir, exist_ok=True)
        saver = _make_saver(task, optimizer, args, loss_scaler, output_dir)
        resumed_here = args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(output_dir)
        if resumed_here and hasattr(saver, 'load_state_dict_from_checkpoint'):  # timm >= 1.0.31: keep best/history
            saver.load_state_dict_from_checkpoint(args.resume)
        if hasattr(timm.utils, 'trim_summary'):  # timm >= 1.0.31: drop summary rows of epochs run again
            timm.utils.trim_summary(summary_path, start_epoch)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(vars(args), f, default_flow_style=False)
        _logger.info(f'{args.model} / {args.opt}: {num_epochs} epochs from {start_epoch}, lr {args.lr:.4g}, '
                     f'{args.world_size} process(es), output {output_dir}')

    eval_model = task.get_eval_model()
    history: List[Dict[str, Any]] = []
    best_metric, best_epoch = None, None
    num_updates = start_epoch * updates_per_epoch
    for epoch in range(start_epoch, num_epochs):
        _seed_epoch(loader_train, args, epoch)
        progress = _Progress(epoch, num_epochs, len(loader_train), primary, args.log_interval)
        train_metrics, num_updates = _train_one_epoch(
            epoch, task, loader_train, optimizer, args, device, amp_autocast, loss_scaler, lr_scheduler,
            num_updates, progress)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = _validate(eval_model, loader_eval, args, device, amp_autocast)
            if task.has_ema() and not args.model_ema_force_cpu:
                eval_metrics = _validate(task.get_eval_model(ema=True), loader_eval, args, device, amp_autocast)
        lr = sum(g['lr'] for g in optimizer.param_groups) / len(optimizer.param_groups)
        metric = None if eval_metrics is None else eval_metrics[args.eval_metric]
        if primary:
            update_summary(epoch, train_metrics, eval_metrics, filename=summary_path, lr=lr)
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
        history.append({'epoch': epoch, 'train_loss': train_metrics['loss'], 'lr': lr,
                        **{f'eval_{k}': (eval_metrics or {}).get(k) for k in ('loss', 'top1', 'top5')}})
        lr_scheduler.step(epoch + 1, metric)
    if primary:
        history = _read_history(summary_path) or history
    if primary:
        best_metric, best_epoch = saver.best_metric, saver.best_epoch
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {
        'output_dir': output_dir,
        'best_metric': float('nan') if best_metric is None else float(best_metric),
        'best_epoch': -1 if best_epoch is None else int(best_epoch),
        'history': history,
    }
