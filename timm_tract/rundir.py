""" The run directory of timm's train.py, read and written in one place.

`timm-tract train` writes it, `timm-tract compare` keeps one per run, `timm-tract publish` and the model card read it,
and so does every tool that reads a train.py run:

    args.yaml              every argument of the run (yaml.safe_dump of the argparse namespace)
    summary.csv            one row per finished epoch: epoch, train_loss, eval_loss, eval_top1, eval_top5, lr
                           (top-1/top-5 in percent; epochs counted from 0, as timm writes them)
    last.pth.tar           the latest checkpoint (timm's CheckpointSaver format), replaced atomically
    model_best.pth.tar     the best checkpoint by the eval metric
    checkpoint-<epoch>.pth.tar  the retained history
    data_facts.json        what publishing needs to know of the data, recorded by `timm-tract train`: the label
                           names (index order) and, for a data set timm-tract prepared, its real name, Hub id and
                           subset

Reading a finished run (`read_run`, for publishing) reads only files inside the run directory (and `report.json` of
the compare directory that produced it): a file or folder reached through a symbolic link that leaves it is refused
with a `RunDirError` naming the link, before anything of it is read.

The directory of `timm-tract compare` (its layout is defined here too):

    report.json            the report (every run's history and times, tables, statistics, machine)
    report.md, compare.png the report for people and its plot
    runs/<method>-e<budget>-s<seed>/   one run directory of the layout above per run, with runs/<run>.log beside it
    runs/plan.json         every run's train arguments (a stopped comparison resumes only with the same plan)
    runs/<run>.json        a finished run's record (reused on resume)
    .timm-tract.lock       held while a process works in the directory (also in run directories; `claim_dir`)
"""
import csv
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import OutputExistsError, RunDirError

__all__ = [
    'ARGS_FILE', 'SUMMARY_FILE', 'LAST_CHECKPOINT', 'BEST_CHECKPOINT', 'TEMP_CHECKPOINT', 'SUMMARY_FIELDS',
    'read_args', 'write_args', 'read_history', 'history_row', 'resumable_checkpoint', 'remove_checkpoints',
    'RunInfo', 'read_run', 'find_compare_report', 'load_weights',
    'COMPARE_REPORT', 'COMPARE_REPORT_MD', 'COMPARE_PLOT', 'COMPARE_RUNS', 'COMPARE_PLAN', 'compare_run_name',
    'compare_run_record', 'compare_run_log',
    'DATA_FACTS_FILE', 'DataFacts', 'write_data_facts', 'read_data_facts', 'dataset_label_names', 'contained',
    'LOCK_FILE', 'DirClaim', 'claim_dir',
]

PathLike = Union[str, Path]

ARGS_FILE = 'args.yaml'
SUMMARY_FILE = 'summary.csv'
LAST_CHECKPOINT = 'last.pth.tar'
BEST_CHECKPOINT = 'model_best.pth.tar'
TEMP_CHECKPOINT = 'tmp.pth.tar'  # CheckpointSaver writes here, then renames over last.pth.tar
DATA_FACTS_FILE = 'data_facts.json'
SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr')
_CHECKPOINT_GLOBS = (LAST_CHECKPOINT, BEST_CHECKPOINT, 'checkpoint-*.pth.tar')
_EPOCH_CHECKPOINT = re.compile(r'checkpoint-(\d+)\.pth\.tar$')

COMPARE_REPORT = 'report.json'
COMPARE_REPORT_MD = 'report.md'
COMPARE_PLOT = 'compare.png'
COMPARE_RUNS = 'runs'  # <compare dir>/runs/<run name>/ and <compare dir>/runs/<run name>.log
COMPARE_PLAN = 'plan.json'  # <compare dir>/runs/plan.json: every run's train arguments


def compare_run_record(runs_dir: PathLike, name: str) -> Path:
    """`<compare dir>/runs/<run name>.json`: the record of a finished run of a comparison."""
    return Path(runs_dir) / f'{name}.json'


def compare_run_log(runs_dir: PathLike, name: str) -> Path:
    """`<compare dir>/runs/<run name>.log`: the console output of one run of a comparison."""
    return Path(runs_dir) / f'{name}.log'


def compare_run_name(method: str, budget: int, seed: int) -> str:
    """The name of one run of a comparison inside `<compare dir>/runs/`: '<method>-e<budget>-s<seed>'."""
    return f'{method}-e{budget}-s{seed}'


def contained(path: PathLike, base: PathLike) -> Path:
    """`path` resolved, when it lies inside `base` (both resolved: symbolic links followed); RunDirError naming the
    link otherwise. Call before reading anything of `path`, and read the returned path."""
    path, base = Path(path), Path(base).resolve()
    resolved = path.resolve()
    if resolved == base or base in resolved.parents:
        return resolved
    link = next((p for p in [path, *path.parents] if p.is_symlink()), path)
    raise RunDirError(f'{link} is a symbolic link to {link.resolve()}, outside {base}; nothing reached through a link '
                      f'out of the run directory is read or published: replace the link with a copy of what it names')


def read_args(run_dir: PathLike) -> Tuple[Dict[str, Any], str]:
    """(args, raw text) of `run_dir/args.yaml`; RunDirError when missing, not YAML, or not a mapping."""
    import yaml

    path = Path(run_dir) / ARGS_FILE
    if os.path.lexists(path):
        path = contained(path, run_dir)
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
        raise RunDirError(f'{path} line {line}: {value[:40]!r} is not a number; fix or restore the file') from None


def read_history(run_dir: PathLike) -> List[Dict[str, Optional[float]]]:
    """Rows of `summary.csv` as numbers ('epoch' an int, missing values None); [] when the run has none yet."""
    path = Path(run_dir) / SUMMARY_FILE
    if not os.path.lexists(path):
        return []
    path = contained(path, run_dir)
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


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What publishing needs to know of a run's data, recorded at training time (`data_facts.json`): the label names
    in index order (None: the data did not name its classes), and for a data set timm-tract prepared its real name,
    Hub data set id and development subset (None otherwise)."""
    label_names: Optional[Tuple[str, ...]] = None
    name: Optional[str] = None
    hub_id: Optional[str] = None
    subset: Optional[Dict[str, Any]] = None


def dataset_label_names(dataset: Any) -> Optional[List[str]]:
    """Class names in label-index order of a timm or torchvision dataset (its reader's `class_to_idx`, which a
    `--class-map` sets, else `classes`); None when it does not name its classes."""
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if isinstance(class_to_idx, Mapping) and class_to_idx:
        by_index = sorted((int(i), str(n)) for n, i in class_to_idx.items())
        if [i for i, _ in by_index] == list(range(len(by_index))):
            return [n for _, n in by_index]
        return None
    classes = getattr(dataset, 'classes', None)
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None


def write_data_facts(run_dir: PathLike, label_names: Optional[Sequence[str]],
                     described: Optional[Mapping[str, Any]] = None) -> None:
    """Write `data_facts.json` (atomically): the label names and, from `timm_tract.data.describe_data` of a data set
    timm-tract prepared, its name, Hub id and subset. `timm-tract train` calls it when it opens the run directory."""
    described = described or {}
    facts = {'version': 1, 'label_names': list(label_names) if label_names else None,
             'dataset': {k: described.get(k) for k in ('name', 'hub_id', 'subset')} if described else None}
    path = Path(run_dir) / DATA_FACTS_FILE
    fd, tmp = tempfile.mkstemp(prefix=f'.{DATA_FACTS_FILE}.', dir=str(run_dir))
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(facts, f, indent=1)  # ensure_ascii: a folder name that is not UTF-8 stays readable here
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _optional_text(value: Any, path: Path, key: str) -> Optional[str]:
    if value is None or (isinstance(value, str) and value):
        return value
    raise RunDirError(f'{path}: {key} must be a string or null; fix the file or remove it')


def read_data_facts(run_dir: PathLike) -> Optional[DataFacts]:
    """The run's `data_facts.json` as `DataFacts`, None for a run that has none (written before timm-tract recorded
    it); RunDirError for a damaged file or a link out of the run."""
    path = Path(run_dir) / DATA_FACTS_FILE
    if not os.path.lexists(path):
        return None
    path = contained(path, run_dir)
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f'{path} is not valid JSON ({type(e).__name__}); remove it (the run then publishes without '
                          f'label names unless --label-names is given)') from None
    names = facts.get('label_names') if isinstance(facts, dict) else None
    dataset = facts.get('dataset') if isinstance(facts, dict) else None
    if not isinstance(facts, dict) or not (names is None or isinstance(names, list) and all(
            isinstance(n, str) and n for n in names)) or not isinstance(dataset, (dict, type(None))):
        raise RunDirError(f'{path} is not a timm-tract data facts file (label_names: a list of names, dataset: an '
                          f'object); remove it or fix it')
    dataset = dataset or {}
    subset = dataset.get('subset')
    return DataFacts(label_names=tuple(names) if names else None,
                     name=_optional_text(dataset.get('name'), path, 'dataset.name'),
                     hub_id=_optional_text(dataset.get('hub_id'), path, 'dataset.hub_id'),
                     subset=subset if isinstance(subset, dict) and subset else None)


# --- reading a finished run (publishing, model cards) --------------------------------------------------------------

_CHECKPOINT_CHOICES = {'best': BEST_CHECKPOINT, 'last': LAST_CHECKPOINT}


@dataclasses.dataclass
class RunInfo:
    """What a run directory holds: its args, per-epoch results, the chosen checkpoint, the recorded data facts, and
    (for a run of `timm-tract compare`) the comparison report, read only where it belongs to this run."""
    run_dir: Path
    args: Dict[str, Any]
    args_text: str
    history: List[Dict[str, Optional[float]]]
    checkpoint_path: Path
    checkpoint_kind: str
    report: Optional[Dict[str, Any]] = None
    data_facts: Optional[DataFacts] = None


def _checkpoint(run_dir: Path, checkpoint: str) -> Tuple[Path, str]:
    """The checkpoint file: 'best'/'last' or a name inside the run (which must stay inside it), else a path the
    user names explicitly (read where it is)."""
    if checkpoint in _CHECKPOINT_CHOICES:
        path = run_dir / _CHECKPOINT_CHOICES[checkpoint]
        if not os.path.lexists(path):
            others = sorted(p.name for p in run_dir.glob('*.pth.tar'))
            raise RunDirError(f'{run_dir} has no {path.name}; available checkpoints: {others or "none"}; '
                              f'use --checkpoint last|best|PATH')
        return contained(path, run_dir), checkpoint
    path = Path(checkpoint)
    if not path.is_absolute() and not os.path.lexists(path):
        path = run_dir / checkpoint
        if os.path.lexists(path):
            path = contained(path, run_dir)
    if not path.is_file():
        raise RunDirError(f'checkpoint {checkpoint} not found (also looked in {run_dir})')
    return path, path.name


def read_run(run_dir: PathLike, checkpoint: str = 'best') -> RunInfo:
    """Read a train.py-layout run; `checkpoint` is 'best', 'last' or a path to a `.pth.tar`/safetensors file.

    Reads only files inside `run_dir` (a link out of it is refused, see `contained`), the checkpoint the user names
    by path, and `report.json` of the `timm-tract compare` directory that produced the run, verified: the run must
    sit in its `runs/` folder and be listed by the report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f'run directory {run_dir} does not exist')
    args, text = read_args(run_dir)
    if not args.get('model') or not isinstance(args['model'], str):
        raise RunDirError(f'{run_dir / ARGS_FILE} does not name a model (no `model:` entry)')
    ckpt_path, kind = _checkpoint(run_dir, checkpoint)
    report, _ = find_compare_report(run_dir)
    return RunInfo(run_dir, args, text, read_history(run_dir), ckpt_path, kind, report, read_data_facts(run_dir))


def _lists_run(report: Dict[str, Any], run_dir: Path) -> bool:
    """Whether a compare report names `run_dir` (`runs/<name>`) among its runs or as its publish_dir."""
    named = [r.get('output_dir') for r in report.get('runs') or [] if isinstance(r, dict)]
    named.append(report.get('publish_dir'))
    return any(isinstance(p, str) and Path(p).parts[-2:] == (COMPARE_RUNS, run_dir.name) for p in named)


def find_compare_report(run_dir: PathLike) -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """(report, its directory) of the `timm-tract compare` run that produced `run_dir`, or (None, None).

    Looks in the run directory itself and in `<compare dir>` when the run is `<compare dir>/runs/<name>`; a report
    there that does not list this run is ignored (it belongs to other runs), a report reached through a link out of
    its directory is refused."""
    run_dir = Path(run_dir)
    places = [run_dir] + ([run_dir.parent.parent] if run_dir.parent.name == COMPARE_RUNS else [])
    for place in places:
        path = place / COMPARE_REPORT
        if not os.path.lexists(path):
            continue
        path = contained(path, place)
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f'{path} is not valid JSON ({type(e).__name__}); fix or remove it') from None
        if not isinstance(report, dict):
            raise RunDirError(f'{path} is not a compare report (a JSON object); fix or remove it')
        if place == run_dir or _lists_run(report, run_dir):
            return report, place
    return None, None


def load_weights(path: PathLike, use_ema: bool = True) -> Tuple[Dict[str, Any], Dict[str, Any], bool]:
    """(state_dict, checkpoint metadata {epoch, arch, metric, version}, whether EMA weights were taken).

    Reads with `weights_only` (tensors, numbers and argparse args; nothing else is unpickled); optimizer state is
    dropped. A `.safetensors` file is read as a state dict."""
    import torch
    from timm.models import clean_state_dict
    from timm.utils import load_checkpoint_metadata

    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), {}, False
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise RunDirError(f'cannot read {path} as safetensors ({type(e).__name__}: {e})') from None
    try:
        ckpt = load_checkpoint_metadata(str(path))
    except Exception as e:  # torch.load of something that is not a checkpoint raises many kinds of errors
        raise RunDirError(
            f'cannot read checkpoint {path} safely ({type(e).__name__}); only tensors, numbers and argparse args are '
            f'accepted (torch.load weights_only): give a timm training checkpoint or a .safetensors file') from None
    if not isinstance(ckpt, dict):
        raise RunDirError(f'{path} is not a checkpoint dict')
    if 'state_dict' not in ckpt and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt), {}, False
    if 'state_dict' not in ckpt:
        raise RunDirError(f'{path} has no state_dict (keys: {sorted(map(str, ckpt))[:8]})')
    ema = use_ema and isinstance(ckpt.get('state_dict_ema'), dict) and len(ckpt['state_dict_ema']) > 0
    sd = ckpt['state_dict_ema'] if ema else ckpt['state_dict']
    sd = {k[len('_orig_mod.'):] if k.startswith('_orig_mod.') else k: v for k, v in clean_state_dict(sd).items()}
    meta = {k: v for k, v in ckpt.items() if k in ('epoch', 'arch', 'metric', 'version')}
    return sd, meta, ema


# --- claiming a directory for one process (train's run directory, compare's folder) ---------------------------------

LOCK_FILE = '.timm-tract.lock'  # inside the claimed directory while a process works in it; removed on release


class DirClaim:
    """An exclusive claim on a directory: `<dir>/.timm-tract.lock`, held with flock. The kernel drops the lock when
    the process ends however it ends, so a killed process never leaves a stale claim."""

    def __init__(self, lock_path: Path, fd: int):
        self.lock_path, self.fd = lock_path, fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a waiting claimer then re-checks the file, see `claim_dir`)."""
        if self.fd is None:
            return
        try:
            self.lock_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def claim_dir(path: PathLike, what: str = 'folder') -> DirClaim:
    """Claim the existing directory `path` for this process; OutputExistsError (one line naming the holder's pid)
    when another process holds it. Where the OS or file system has no flock (Windows, some network file systems)
    the lock file is written but nothing is excluded."""
    try:
        import fcntl
    except ImportError:
        fcntl = None

    lock = Path(path) / LOCK_FILE
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f'{what} {path}: cannot create {LOCK_FILE} in it ({e.strerror or e}); pick another '
                              f'--output.') from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors='replace').strip()
            os.close(fd)
            raise OutputExistsError(
                f'{what} {path} is in use by another timm-tract process' + (f' (pid {holder})' if holder else '')
                + ': wait for it to finish, or pick another --experiment / --output.') from None
        except OSError:  # ENOLCK and the like: this file system cannot lock
            break
        try:  # the holder may have released (removed) the file between our open and flock: claim the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    return DirClaim(lock, fd)
