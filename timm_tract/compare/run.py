""" `timm-tract compare`: the command. Builds the runs of every (budget, seed, method), checks each one's arguments
with train's own checks (before anything trains or the folder is created), trains them through `compare.runner`, and
writes the report of `compare.report` with the statistics of `compare.stats`.

The folder is claimed for the process (`rundir.claim_dir`). `runs/plan.json` holds every run's train arguments and
`runs/<run>.json` each finished run's record; a compare stopped by Ctrl-C, SIGTERM or a failing run writes a partial
report (marked `partial` in report.json) and the same command resumes it: finished runs are reused, unfinished ones
are removed and trained again. A folder with a finished report, other settings, or foreign content is refused.
"""
import argparse
import datetime
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import CompareError, OutputExistsError, TimmTractError
from ..flags import HelpFormatter, build_train_parser, train_flags
from ..train import check_experiment, check_train_args
from ..naming import TRACT_OPT_PREFIX, is_tract_optimizer, tract_base_arch, twin_model_name
from .. import rundir
from .report import build_report, format_duration, load_average, write_report
from .runner import execute, resolve_jobs, stop_on_signals
from .stats import METHODS

__all__ = ['build_compare_parser', 'compare', 'COMPARE_DESCRIPTION']

_logger = logging.getLogger('timm_tract.compare')


# Defaults of the no-argument run (embedded data); what it measures: docs/compare.md.
DEFAULT_MODEL = 'resnet18'
DEFAULT_MODEL_KWARGS = {'channels': (16, 32, 64, 128)}  # a narrow ResNet-18 (only for DEFAULT_MODEL); stem stays 64
DEFAULT_BUDGETS = (12, 16)
DEFAULT_SEEDS = (0, 1, 2)
_COMPARE_DEFAULTS = dict(
    model=DEFAULT_MODEL, model_kwargs=None, opt='sgd', lr=0.1, batch_size=32, weight_decay=5e-4,
    sched='cosine', sched_on_updates=True, warmup_epochs=0, smoothing=0., no_aug=True, workers=0, checkpoint_hist=1,
    log_interval=10 ** 6, tract_lambda=0.1,
)
# only when the embedded data is used (a user's own data keeps the model's crop and normalisation)
_EMBEDDED_DATA_DEFAULTS = dict(img_size=32, crop_pct=1.0)


class _Refuse(argparse.Action):
    def __init__(self, option_strings, dest, hint: str = '', **kwargs):
        self.hint = hint
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f'{option_string} is not a compare option: {self.hint}')


def build_compare_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """`timm-tract train`'s parser (every train.py flag applies to both methods) plus the comparison's flags."""
    p = argparse.ArgumentParser(
        prog='timm-tract compare', parents=[build_train_parser()], conflict_handler='resolve', add_help=add_help,
        formatter_class=HelpFormatter, description=COMPARE_DESCRIPTION)
    g = p.add_argument_group('Comparison')
    g.add_argument('--budgets', type=int, nargs='+', default=list(DEFAULT_BUDGETS), metavar='EPOCHS',
                   help='epoch budgets; every budget is a separate run with its own full schedule')
    g.add_argument('--seeds', type=int, nargs='+', default=list(DEFAULT_SEEDS), metavar='S',
                   help='seeds (model init and data order); each seed trains both methods')
    g.add_argument('--tract-via', choices=('model', 'opt'), default='model',
                   help="TrAct twin: 'model' = the <model>_tract architecture, 'opt' = the tract-<opt> optimizer")
    g.add_argument('--tract-lambda', type=float, default=0.1, metavar='LAMBDA', help='TrAct λ of the TrAct runs')
    g.add_argument('--jobs', type=int, default=None, metavar='N',
                   help='runs trained at a time, each in its own worker process (default: CPU, the number of cores, '
                        'one torch thread per run; CUDA, 1, runs share --device). Results do not depend on it.')
    g.add_argument('--keep-checkpoints', action='store_true', default=False,
                   help='keep every run\'s checkpoints (default: only the TrAct run of the largest budget, first seed)')
    g.add_argument('--epochs', action=_Refuse, hint='give the epoch budgets with --budgets', nargs='+',
                   metavar='N', help='not a compare option: compare trains every --budgets value')
    g.add_argument('--seed', action=_Refuse, hint='give the seeds with --seeds', nargs='+', metavar='S',
                   help='not a compare option: compare trains every --seeds value')
    g.add_argument('--output', default='', metavar='PATH', help='output root (default: ./output/compare)')
    g.add_argument('--experiment', default='', metavar='NAME', help='subfolder of --output (default: date-model)')
    p.set_defaults(**_COMPARE_DEFAULTS, data_dir=None)
    return p
COMPARE_DESCRIPTION = (
    'Train a recipe with and without TrAct (<model>_tract or tract-<opt>) for several epoch budgets and seeds, '
    '--jobs runs at a time; every `timm-tract train` flag applies to both. Report: top-1 per method and budget, '
    'paired differences with 95% intervals and verdicts, speed-up in epochs and time with a bootstrap interval, '
    'time per epoch, a plot, JSON + Markdown. No arguments: a narrow ResNet-18 on the embedded data set, budgets '
    f'{" and ".join(map(str, DEFAULT_BUDGETS))} epochs x seeds {", ".join(map(str, DEFAULT_SEEDS))} '
    f'({2 * len(DEFAULT_BUDGETS) * len(DEFAULT_SEEDS)} runs).')


def _check_args(args: argparse.Namespace) -> None:
    if not args.budgets or any(b < 1 for b in args.budgets):
        raise CompareError(f'--budgets must be positive epoch counts, got {args.budgets}.')
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.budgets)) != len(args.budgets):
        raise CompareError('--budgets and --seeds must not repeat values.')
    if args.jobs is not None and args.jobs < 1:
        raise CompareError(f'--jobs must be >= 1, got {args.jobs}.')
    if not args.val_split:
        raise CompareError('compare measures validation accuracy: give a --val-split (default validation), not "".')
    if tract_base_arch(args.model) is not None or is_tract_optimizer(args.opt):
        raise CompareError(f'give the baseline (--model {args.model} --opt {args.opt}); compare trains its TrAct twin '
                           f'itself (--tract-via model: <model>_tract, --tract-via opt: tract-<opt>).')


def _twin(args: argparse.Namespace) -> Dict[str, dict]:
    """Per method, the train flags that differ: model/opt and λ (only the TrAct run carries --tract-lambda and
    --tract-lambda-mode)."""
    import timm
    from .. import models  # noqa: F401  (registers the *_tract twins)

    base = {'model': args.model, 'opt': args.opt, 'tract_lambda': None, 'tract_lambda_mode': None}
    tract_settings = {'tract_lambda': args.tract_lambda, 'tract_lambda_mode': args.tract_lambda_mode}
    if args.tract_via == 'model':
        twin = twin_model_name(args.model)
        if not timm.is_model(twin):
            raise CompareError(f'{args.model!r} has no registered TrAct twin {twin} (timm_tract covers the '
                               f'ResNet, ConvNeXt, ViT and DeiT families); use --tract-via opt '
                               f'({TRACT_OPT_PREFIX}{args.opt}).')
        tract = {'model': twin, 'opt': args.opt, **tract_settings}
    else:
        tract = {'model': args.model, 'opt': TRACT_OPT_PREFIX + args.opt, **tract_settings}
    return {'baseline': base, 'tract': tract}


def _resolve_data(args: argparse.Namespace) -> str:
    """Fill in the embedded data set when no data is given, and --num-classes from an ImageFolder's class folders;
    returns a label for the report."""
    from ..data import describe_data, known_dataset

    if args.data_dir or args.dataset:
        train_dir = Path(args.data_dir or '') / args.train_split
        if args.num_classes is None and not args.dataset and train_dir.is_dir():
            args.num_classes = sum(1 for p in train_dir.iterdir() if p.is_dir())
        known = describe_data(args.data_dir)
        if known is not None:
            return known['name'] + (f" (subset: train = {known['subset']['train']}, validation = "
                                    f"{known['subset']['validation']})" if known.get('subset') else '')
        facts = known_dataset(args.dataset) if args.dataset else None
        # a public name only (it titles the plot that publish shows): never the --data-dir path
        return facts.display_name if facts else args.dataset or Path(args.data_dir).name
    from ..data import ensure_data, read_manifest

    root = ensure_data()
    manifest = read_manifest(root)
    args.data_dir = str(root)
    if args.num_classes is None:
        args.num_classes = manifest['num_classes']
    for key, value in _EMBEDDED_DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    counts = manifest['counts']
    return (f"embedded {manifest['name']} ({sum(counts['train'].values())} train / "
            f"{sum(counts['validation'].values())} validation, {manifest['num_classes']} classes, 32x32)")


def _run_args(args: argparse.Namespace, train_keys: Sequence[str], flags: dict, budget: int, seed: int,
              runs_dir: Path, name: str) -> argparse.Namespace:
    ns = argparse.Namespace(**{k: getattr(args, k) for k in train_keys if hasattr(args, k)})
    for key, value in flags.items():
        setattr(ns, key, value)
    ns.epochs, ns.seed, ns.output, ns.experiment = budget, seed, str(runs_dir), name
    return ns


def _print(msg: str) -> None:
    """Progress for people (the plan, one line per finished run, the summary): logged, shown on stderr by the CLI."""
    _logger.info(msg)




def _check_runs(tasks: List[dict]) -> None:
    """Every run's arguments through train's own checks (model, optimizer and scheduler built on the meta device),
    before the first run trains or the folder is created."""
    for task in tasks:
        try:
            check_train_args(task['kwargs']['ns'], build=True)
        except TimmTractError as e:
            raise CompareError(f"run {task['name']}: {e}") from e


def _plan(tasks: List[dict]) -> dict:
    """The plan of the runs as JSON values (what a resumed compare must match)."""
    return json.loads(json.dumps({t['name']: {**vars(t['kwargs']['ns']), 'keep': t['kwargs']['keep']}
                                  for t in tasks}, default=str))


def _create_log(task: dict) -> None:
    """The run's log exists from the moment the run is handed out (the worker writes into it once it starts), so the
    logs in runs/ are exactly the runs started so far."""
    Path(task['kwargs']['log_path']).write_text('')


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path):
    """The JSON value in `path`, None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _finished_runs(out_dir: Path, plan: dict) -> Dict[str, dict]:
    """Runs a stopped compare in `out_dir` finished (to reuse); removes what its unfinished runs left (to redo).
    Empty for a new folder; OutputExistsError for a folder that holds anything else, a finished comparison, or a
    stopped one of other settings."""
    runs_dir = out_dir / rundir.COMPARE_RUNS
    if not set(os.listdir(out_dir)) - {rundir.LOCK_FILE}:
        return {}
    plan_path = runs_dir / rundir.COMPARE_PLAN
    if not plan_path.is_file():
        raise OutputExistsError(f'compare output {out_dir} exists and is not empty; pick another --experiment or '
                                f'--output (nothing was overwritten).')
    report_path = out_dir / rundir.COMPARE_REPORT
    if report_path.is_file() and not (_read_json(report_path) or {}).get('partial'):
        raise OutputExistsError(f'compare output {out_dir} holds a finished comparison ({report_path}); pick another '
                                f'--experiment or --output (nothing was overwritten).')
    if _read_json(plan_path) != plan:
        raise OutputExistsError(f'compare output {out_dir} holds a stopped comparison with other settings; resume it '
                                f'with its own command (see {report_path.name}), or pick another --experiment '
                                f'(nothing was overwritten).')
    finished = {}
    for name in plan:
        record = _read_json(rundir.compare_run_record(runs_dir, name))
        if isinstance(record, dict) and record.get('history'):
            finished[name] = record
            continue
        (rundir.compare_run_record(runs_dir, name)).unlink(missing_ok=True)
        shutil.rmtree(runs_dir / name, ignore_errors=True)
        rundir.compare_run_log(runs_dir, name).unlink(missing_ok=True)
    return finished


def _stop_reason(error: BaseException) -> str:
    signum = getattr(error, 'signum', None)
    if signum is not None:
        return f'stopped by {signal.Signals(signum).name}'
    if isinstance(error, KeyboardInterrupt):
        return 'interrupted (Ctrl-C)'
    return f'stopped by an error ({type(error).__name__})'


def _write_partial(out_dir: Path, runs: List[dict], planned: int, reason: str, command: str,
                   report_kwargs: dict) -> Path:
    """report.json / report.md of the runs that finished, marked partial: the full statistics where both methods
    have runs, else a list of the finished runs. Returns the Markdown path."""
    partial = {'finished': len(runs), 'planned': planned, 'reason': reason, 'resume': command}
    note = (f'> **Partial report**: {len(runs)} of {planned} runs finished ({reason}). Run `{command}` again to '
            f'resume: finished runs are reused, the others trained.\n\n')
    md = out_dir / rundir.COMPARE_REPORT_MD
    try:
        report = build_report(runs, **report_kwargs, partial=partial)
    except ValueError:  # CompareError: not both methods yet; no statistics, the list of finished runs
        _write_json(out_dir / rundir.COMPARE_REPORT, {'partial': partial, 'runs': runs})
        rows = [f"| {Path(r['output_dir']).name} | {r['top1']:.2f} | {r['wall_s']:.1f} |" for r in runs]
        md.write_text(note + '\n'.join(['| run | top-1 % | wall-clock s |', '|---|---|---|', *rows]) + '\n')
        return md
    write_report(report, str(out_dir))
    md.write_text(note + md.read_text())
    return md


def compare(args: argparse.Namespace, argv: Optional[List[str]] = None) -> dict:
    """Run the comparison configured by `build_compare_parser()` arguments; write and return the report."""
    args = argparse.Namespace(**vars(args))
    if args.model_kwargs is None:  # --model-kwargs not given: the narrow widths fit DEFAULT_MODEL only
        args.model_kwargs = dict(DEFAULT_MODEL_KWARGS) if args.model == DEFAULT_MODEL else {}
    _check_args(args)
    flags = _twin(args)
    data_label = _resolve_data(args)
    train_keys = list(train_flags())

    name = args.experiment or f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.model.replace('/', '_')}"
    root = args.output or os.path.join('.', 'output', 'compare')
    check_experiment(name, root)
    out_dir = Path(root) / name
    runs_dir = out_dir / rundir.COMPARE_RUNS
    budgets, seeds = sorted(args.budgets), list(args.seeds)
    keep = ('tract', budgets[-1], seeds[0])
    specs = [(b, s, m) for b in budgets for s in seeds for m in METHODS]
    tasks = []
    for index, (budget, seed, method) in enumerate(specs):
        run_name = rundir.compare_run_name(method, budget, seed)
        ns = _run_args(args, train_keys, flags[method], budget, seed, runs_dir, run_name)
        tasks.append({'index': index, 'name': run_name, 'cost': budget * (1.2 if method == 'tract' else 1.),
                      'kwargs': dict(
            ns=ns, method=method, keep=args.keep_checkpoints or (method, budget, seed) == keep,
            log_path=str(rundir.compare_run_log(runs_dir, run_name)))})
    _check_runs(tasks)
    command = ' '.join(['timm-tract compare', *argv] if argv is not None else ['timm-tract', *sys.argv[1:]])
    if not args.experiment:
        command += f' --experiment {name}'
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f'cannot create the compare output {out_dir} ({e.strerror or e}); pick another --output.'
                           ) from None
    claim = rundir.claim_dir(out_dir, 'compare output')
    try:
        return _run_comparison(args, out_dir, tasks, flags, data_label, keep, command)
    finally:
        claim.release()


def _run_comparison(args: argparse.Namespace, out_dir: Path, tasks: List[dict], flags: Dict[str, dict],
                    data_label: str, keep: tuple, command: str) -> dict:
    """Train the runs not finished yet in the claimed `out_dir` (reusing those a stopped compare finished), then
    write the report; when stopped (Ctrl-C, SIGTERM, a failing run), write the partial report and re-raise."""
    runs_dir = out_dir / rundir.COMPARE_RUNS
    budgets, seeds = sorted(args.budgets), list(args.seeds)
    plan = _plan(tasks)
    reused = _finished_runs(out_dir, plan)
    runs_dir.mkdir(parents=True, exist_ok=True)
    _write_json(runs_dir / rundir.COMPARE_PLAN, plan)
    todo = [t for t in tasks if t['name'] not in reused]
    jobs, threads = resolve_jobs(args.jobs, args.device, max(len(todo), 1))
    labels = {m: flags[m]['model'] if args.tract_via == 'model' else f"{args.model} + {flags[m]['opt']}"
              for m in METHODS}
    _print(f"timm-tract compare: {labels['baseline']} vs {labels['tract']} on {data_label}\n"
           f"  {len(tasks)} runs = 2 methods x budgets {budgets} epochs x seeds {seeds}; {jobs} at a time"
           + (f", {threads} torch thread each" if threads else f" on {args.device}") + '\n'
           f"  output: {out_dir} (one log per run: runs/<run>.log)"
           + (f"\n  resuming: {len(reused)} finished runs reused, {len(todo)} to train" if reused else ''))

    results: Dict[int, dict] = {t['index']: reused[t['name']] for t in tasks if t['name'] in reused}
    start = time.time()
    load_start = load_average()
    name_width = max(len(t['name']) for t in tasks)

    def done(task: dict, run: dict) -> None:
        _write_json(rundir.compare_run_record(runs_dir, task['name']), run)
        results[task['index']] = run
        _print(f"[{len(results):>{len(str(len(tasks)))}}/{len(tasks)}] {task['name']:<{name_width}}"
               f"  top-1 {run['top1']:6.2f}%  {run['wall_s']:7.1f} s (CPU {run['cpu_s']:.1f} s)"
               f"  elapsed {format_duration(time.time() - start)}")

    recipe = (f"{f'model kwargs {args.model_kwargs}, ' if args.model_kwargs else ''}"
              f"{args.opt} lr {args.lr}, batch {args.batch_size}, weight decay {args.weight_decay}, {args.sched} "
              f"schedule{' per update' if args.sched_on_updates else ''}, warmup {args.warmup_epochs} epochs, "
              f"label smoothing {args.smoothing}, {'no augmentation' if args.no_aug else 'timm augmentation'}, "
              f"TrAct λ {args.tract_lambda}{' (relative)' if args.tract_lambda_mode == 'relative' else ''} via "
              f"{args.tract_via}")

    def report_kwargs(runs: List[dict]) -> dict:
        publish_dir = next((r['output_dir'] for r in runs if (r['method'], r['epochs'], r['seed']) == keep), None)
        return dict(
            baseline_label=labels['baseline'], tract_label=labels['tract'], data=data_label, recipe=recipe,
            seeds=seeds, wall_clock_s=time.time() - start, publish_dir=publish_dir, jobs=jobs,
            threads_per_run=threads, load_avg={'start': load_start, 'end': load_average()},
            created=datetime.datetime.now().isoformat(timespec='seconds'), num_classes=args.num_classes,
            command=command)

    try:
        with stop_on_signals():
            if todo:
                execute(todo, jobs, threads, done, started=_create_log)
    except BaseException as error:
        runs = [results[i] for i in sorted(results)]
        reason = _stop_reason(error)
        md = _write_partial(out_dir, runs, len(tasks), reason, command, report_kwargs(runs)) if runs else None
        _print(f"{reason}: {len(runs)} of {len(tasks)} runs finished"
               + (f"; partial report: {md}" if md else '') + f"; run the same command to resume: {command}")
        raise
    runs = [results[i] for i in range(len(tasks))]
    report = build_report(runs, **report_kwargs(runs))
    report['paths'] = write_report(report, str(out_dir))
    _print(f"done: {len(runs)} runs in {format_duration(report['wall_clock_s'])} wall-clock, CPU time "
           f"{format_duration(report['cpu_s'])}, {jobs} at a time. {report['speedup']['text']}\n"
           f"report: {report['paths']['markdown']}")
    return report
