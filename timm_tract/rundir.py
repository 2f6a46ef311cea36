""" The run directory of timm's train.py, read and written in one place.

`timm-tract train` writes it, `timm-tract compare` keeps one per run, `timm-tract publish` and the model card read it,
and so does every tool that reads a train.py run:

    args.yaml              every argument of the run (yaml.safe_dump of the argparse namespace)
    summary.csv            one row per finished epoch: epoch, train_loss, eval_loss, eval_top1, eval_top5, lr
                           (top-1/top-5 in percent; epochs counted from 0, as timm writes them)
    last.pth.tar           the latest checkpoint (timm's CheckpointSaver format), replaced atomically
    model_best.pth.tar     the best checkpoint by the eval metric
    checkpoint-<epoch>.pth.tar  the retained history
"""
import csv
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import RunDirError

__all__ = [
    'ARGS_FILE', 'SUMMARY_FILE', 'LAST_CHECKPOINT', 'BEST_CHECKPOINT', 'TEMP_CHECKPOINT', 'SUMMARY_FIELDS',
    'read_args', 'write_args', 'read_history', 'history_row', 'resumable_checkpoint', 'remove_checkpoints',
]

PathLike = Union[str, Path]

ARGS_FILE = 'args.yaml'
SUMMARY_FILE = 'summary.csv'
LAST_CHECKPOINT = 'last.pth.tar'
BEST_CHECKPOINT = 'model_best.pth.tar'
TEMP_CHECKPOINT = 'tmp.pth.tar'  # CheckpointSaver writes here, then renames over last.pth.tar
SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
_CHECKPOINT_GLOBS = (LAST_CHECKPOINT, BEST_CHECKPOINT, 'checkpoint-*.pth.tar')
_EPOCH_CHECKPOINT = re.compile(r'checkpoint-(\d+)\.pth\.tar$')


def read_args(run_dir: PathLike) -> Tuple[Dict[str, Any], str]:
    """(args, raw text) of `run_dir/args.yaml`; RunDirError when missing, not YAML, or not a mapping."""
    import yaml

    path = Path(run_dir) / ARGS_FILE
    if not path.is_file():
        raise RunDirError(
            f'{run_dir} has no {ARGS_FILE}: pass the output directory of timm-tract train or timm\'s train.py '
            f'(the folder holding args.yaml, summary.csv and model_best.pth.tar)')
    text = path.read_text(errors='replace')
    try:
        args = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, 'problem_mark', None)
        raise RunDirError(f'{path} is not valid YAML ({getattr(e, "problem", None) or type(e).__name__}'
                          + (f' at line {where.line + 1}' if where else '') + '); fix or restore the file') from None
    if not isinstance(args, dict):
        raise RunDirError(f'{path} is not a mapping of argument names to values; fix or restore the file')
    return args, text


def write_args(run_dir: PathLike, args: Dict[str, Any]) -> None:
    """Write `args.yaml` as train.py does (yaml.safe_dump, block style)."""
    import yaml
    with open(Path(run_dir) / ARGS_FILE, 'w') as f:
        yaml.safe_dump(args, f, default_flow_style=False)


def _number(value: Optional[str], path: Path, line: int) -> Optional[float]:
    if value in (None, ''):
        return None
    try:
        return float(value)
    except ValueError:
        raise RunDirError(f'{path} line {line}: {value!r} is not a number; fix or restore the file') from None


def read_history(run_dir: PathLike) -> List[Dict[str, Optional[float]]]:
    """Rows of `summary.csv` as numbers ('epoch' an int, missing values None); [] when the run has none yet."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    history = []
    for line, row in enumerate(rows, start=2):
        if row.get('epoch') in (None, '', 'epoch'):
            continue  # a repeated header (several runs appended) or an empty line
        values = {k: _number(row.get(k), path, line) for k in SUMMARY_FIELDS}
        values['epoch'] = int(values['epoch'])
        history.append(values)
    return history


def history_row(history: List[Dict[str, Optional[float]]], epoch: Optional[int]) -> Optional[Dict[str, Any]]:
    """The summary row of `epoch` (the last one written for it), or None."""
    rows = [r for r in history if epoch is not None and r['epoch'] == epoch]
    return rows[-1] if rows else None


def resumable_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint a run in `run_dir` resumes from: last.pth.tar, else the newest checkpoint-<epoch>.pth.tar."""
    run_dir = Path(run_dir)
    if (run_dir / LAST_CHECKPOINT).is_file():
        return run_dir / LAST_CHECKPOINT
    numbered = [(int(m.group(1)), p) for p in run_dir.glob('checkpoint-*.pth.tar')
                for m in [_EPOCH_CHECKPOINT.search(p.name)] if m]
    return max(numbered)[1] if numbered else None


def remove_checkpoints(run_dir: PathLike) -> None:
    """Delete the run's checkpoints (keeps args.yaml and summary.csv)."""
    for pattern in _CHECKPOINT_GLOBS:
        for path in Path(run_dir).glob(pattern):
            path.unlink()
