""" `timm-tract compare`: train a recipe with and without TrAct over epoch budgets and seeds, measure the speed-up.

For every epoch budget and seed the same recipe is trained twice through `timm_tract.train.train` (the engine of
`timm-tract train`): the baseline, and its TrAct twin — either the `<arch>_tract` model (``--tract-via model``) or the
`tract-<opt>` optimizer (``--tract-via opt``). Both runs of a pair use the same seed, hence the same initial weights
and the same data order; only the first layer's weight gradient differs.

Outputs in the compare directory: ``report.json`` (every run's per-epoch history, the table, the speed-up, the
machine and wall-clock time), ``report.md``, ``compare.png`` (accuracy vs budget, and accuracy vs epoch with seed
bands), and ``runs/<method>-e<budget>-s<seed>/`` train.py-layout run directories; checkpoints are kept only for the
TrAct run of the largest budget and first seed (``publish_dir`` in the report), ready to publish.

Speed-up (as in the paper): the baseline's best budget B is the one with the highest mean top-1 (smallest on ties);
T is the smallest TrAct budget whose mean top-1 reaches that accuracy; speed-up = B / T. If T is the smallest budget
tried, the factor is a lower bound. Top-1 of a run is its final-epoch validation top-1 (no best-epoch selection).
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ['build_compare_parser', 'compare', 'aggregate', 'speedup', 'plot_report', 'format_markdown', 'write_report']

METHODS = ('baseline', 'tract')
_CHECKPOINTS = ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-*.pth.tar')


# ---------------------------------------------------------------------------------------------------------------
# pure parts: aggregation, speed-up, Markdown, plot

def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and Bessel-corrected standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.
    return mean, std


def aggregate(runs: Sequence[dict]) -> Dict[str, list]:
    """Aggregate runs over seeds.

    Args:
        runs: dicts with 'method' ('baseline'/'tract'), 'epochs' (budget), 'seed' and 'history' (train() history:
            per-epoch dicts with 'epoch' and 'eval_top1' in %).
    Returns:
        {'table': [{'method', 'epochs', 'n', 'mean', 'std', 'per_seed'}],   # final-epoch top-1 in %
         'curves': [{'method', 'epochs', 'n', 'mean', 'std'}]}              # per-epoch top-1 lists in %
        sorted by method then budget.
    """
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault((run['method'], int(run['epochs'])), []).append(run)
    table, curves = [], []
    for (method, epochs) in sorted(groups, key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else 9, k)):
        group = sorted(groups[(method, epochs)], key=lambda r: r['seed'])
        finals = [float(r['history'][-1]['eval_top1']) for r in group]
        mean, std = _mean_std(finals)
        table.append({'method': method, 'epochs': epochs, 'n': len(group), 'mean': mean, 'std': std,
                      'per_seed': {str(r['seed']): f for r, f in zip(group, finals)}})
        length = min(len(r['history']) for r in group)
        per_epoch = [_mean_std([float(r['history'][i]['eval_top1']) for r in group]) for i in range(length)]
        curves.append({'method': method, 'epochs': epochs, 'n': len(group),
                       'mean': [m for m, _ in per_epoch], 'std': [s for _, s in per_epoch]})
    return {'table': table, 'curves': curves}


def speedup(table: Sequence[dict]) -> dict:
    """Speed-up of TrAct over the baseline from an `aggregate` table.

    Returns {'baseline_epochs', 'baseline_top1', 'tract_epochs' (None if never reached), 'factor' (B / T or None),
    'lower_bound' (True if T is the smallest TrAct budget, so fewer epochs might also do), 'text'}.
    """
    base = sorted((r for r in table if r['method'] == 'baseline'), key=lambda r: r['epochs'])
    tract = sorted((r for r in table if r['method'] == 'tract'), key=lambda r: r['epochs'])
    if not base or not tract:
        raise ValueError('speed-up needs both baseline and tract rows in the table')
    best = max(base, key=lambda r: (r['mean'], -r['epochs']))  # highest mean; smallest budget on ties
    reached = next((r for r in tract if r['mean'] >= best['mean']), None)
    out = {'baseline_epochs': best['epochs'], 'baseline_top1': best['mean'], 'tract_epochs': None, 'factor': None,
           'lower_bound': False}
    common = sorted({r['epochs'] for r in base} & {r['epochs'] for r in tract})
    gain = ''
    if common:  # the accuracy difference at the largest budget both methods ran
        b, t = (next(r for r in rows if r['epochs'] == common[-1]) for rows in (base, tract))
        out['gain_at_largest'] = t['mean'] - b['mean']
        gain = (f" At {common[-1]} epochs: TrAct {t['mean']:.2f}% vs baseline {b['mean']:.2f}% "
                f"({t['mean'] - b['mean']:+.2f} points).")
    if reached is None:
        out['text'] = (f"TrAct did not reach the baseline's best mean top-1 ({best['mean']:.2f}% at {best['epochs']} "
                       f"epochs) within {tract[-1]['epochs']} epochs: no speed-up measured." + gain)
        return out
    factor = best['epochs'] / reached['epochs']
    lower = reached['epochs'] == tract[0]['epochs']
    out.update(tract_epochs=reached['epochs'], factor=factor, lower_bound=lower)
    out['text'] = (f"Speed-up {'≥ ' if lower else ''}{factor:.2f}x: TrAct reaches the baseline's best mean top-1 "
                   f"({best['mean']:.2f}% at {best['epochs']} epochs) after {reached['epochs']} epochs "
                   f"({reached['mean']:.2f}%)" + (' (the smallest budget tried, so the factor is a lower bound).'
                                                  if lower else '.') + gain)
    return out


def format_markdown(report: dict) -> str:
    """The Markdown report: setup, top-1 table (mean ± std over seeds), speed-up, machine, wall-clock."""
    budgets = sorted({r['epochs'] for r in report['table']})
    cell = {(r['method'], r['epochs']): r for r in report['table']}
    names = {'baseline': report['baseline_label'], 'tract': report['tract_label']}
    lines = [
        f"# timm-tract compare: {report['baseline_label']} vs {report['tract_label']}",
        '',
        f"Data: {report['data']}. Seeds: {', '.join(str(s) for s in report['seeds'])}. "
        f"Recipe: {report['recipe']}.",
        '',
        'Validation top-1 (%) after the last epoch, mean ± std over seeds:',
        '',
        '| method | ' + ' | '.join(f'{b} epochs' for b in budgets) + ' |',
        '|---|' + '---|' * len(budgets),
    ]
    for method in METHODS:
        row = [f"{cell[(method, b)]['mean']:.2f} ± {cell[(method, b)]['std']:.2f}" if (method, b) in cell else '–'
               for b in budgets]
        lines.append(f'| {names[method]} | ' + ' | '.join(row) + ' |')
    m = report['machine']
    lines += [
        '',
        report['speedup']['text'],
        '',
        '![validation accuracy](compare.png)',
        '',
        f"Machine: {m['device']}; {m['platform']}; torch {m['torch']}, timm {m['timm']}. "
        f"Wall-clock: {_duration(report['wall_clock_s'])} for {len(report['runs'])} runs "
        f"(baseline {_duration(report['method_s']['baseline'])}, TrAct {_duration(report['method_s']['tract'])}).",
    ]
    if report.get('publish_dir'):
        lines += ['', f"TrAct run kept for publishing: `{report['publish_dir']}`"]
    return '\n'.join(lines) + '\n'


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 60} min {seconds % 60:02d} s' if seconds >= 60 else f'{seconds} s'


_COLORS = {'baseline': '#1f77b4', 'tract': '#d62728'}


def plot_report(report: dict, path: str) -> None:
    """PNG: left, final top-1 vs epoch budget (mean ± std band); right, top-1 vs epoch per budget (seed bands)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_budget, ax_epoch = fig.subplots(1, 2)
    names = {'baseline': report['baseline_label'], 'tract': report['tract_label']}
    budgets = sorted({r['epochs'] for r in report['table']})
    for method in METHODS:
        rows = sorted((r for r in report['table'] if r['method'] == method), key=lambda r: r['epochs'])
        if not rows:
            continue
        x = [r['epochs'] for r in rows]
        mean = [r['mean'] for r in rows]
        std = [r['std'] for r in rows]
        ax_budget.plot(x, mean, 'o-', color=_COLORS[method], label=names[method])
        ax_budget.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                               color=_COLORS[method], alpha=0.2, linewidth=0)
        curves = sorted((c for c in report['curves'] if c['method'] == method), key=lambda c: c['epochs'])
        for i, c in enumerate(curves):
            epochs = list(range(1, len(c['mean']) + 1))
            alpha = 0.35 + 0.65 * (i + 1) / len(curves)
            ax_epoch.plot(epochs, c['mean'], color=_COLORS[method], alpha=alpha,
                          label=f"{names[method]}, {c['epochs']} ep")
            ax_epoch.fill_between(epochs, [m - s for m, s in zip(c['mean'], c['std'])],
                                  [m + s for m, s in zip(c['mean'], c['std'])],
                                  color=_COLORS[method], alpha=0.12 * alpha, linewidth=0)
    best = report['speedup']
    ax_budget.axhline(best['baseline_top1'], color='grey', linestyle='--', linewidth=1, label="baseline's best")
    if len(budgets) > 1 and all(b > 0 for b in budgets) and budgets[-1] / budgets[0] >= 4:
        ax_budget.set_xscale('log', base=2)
    ax_budget.set_xticks(budgets, [str(b) for b in budgets])
    ax_budget.set(xlabel='epoch budget', ylabel='validation top-1 (%)',
                  title='final top-1 vs budget (mean ± std over seeds)')
    ax_epoch.set(xlabel='epoch', ylabel='validation top-1 (%)', title='top-1 during training (seed bands)')
    for ax in (ax_budget, ax_epoch):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n = len(report['seeds'])
    fig.suptitle(f"{report['baseline_label']} vs {report['tract_label']} on {report['data']} ({n} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict, out_dir: str) -> Dict[str, str]:
    """Write report.json, report.md and compare.png into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'json': str(out / 'report.json'), 'markdown': str(out / 'report.md'), 'plot': str(out / 'compare.png')}
    plot_report(report, paths['plot'])
    Path(paths['json']).write_text(json.dumps(report, indent=1) + '\n')
    Path(paths['markdown']).write_text(format_markdown(report))
    return paths


def _machine() -> dict:
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), cpu)
    except OSError:
        pass
    device = f'CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)'
    if torch.cuda.is_available():
        device = f'GPU {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()}x); ' + device
    return {'device': device, 'platform': platform.platform(), 'python': platform.python_version(),
            'torch': torch.__version__, 'timm': timm.__version__}


def build_report(
        runs: Sequence[dict],
        *,
        baseline_label: str,
        tract_label: str,
        data: str,
        recipe: str,
        seeds: Sequence[int],
        wall_clock_s: float,
        machine: Optional[dict] = None,
        publish_dir: Optional[str] = None,
        **extra,
) -> dict:
    """The report dict (JSON-serialisable) from finished runs (see `aggregate` for the run dict keys; a run may also
    carry 'wall_s' and 'cpu_s')."""
    agg = aggregate(runs)
    method_s = {m: sum(r.get('wall_s', 0.) for r in runs if r['method'] == m) for m in METHODS}
    return {
        'baseline_label': baseline_label, 'tract_label': tract_label, 'data': data, 'recipe': recipe,
        'seeds': list(seeds), 'budgets': sorted({int(r['epochs']) for r in runs}),
        'table': agg['table'], 'curves': agg['curves'], 'speedup': speedup(agg['table']),
        'machine': machine or _machine(), 'wall_clock_s': wall_clock_s, 'method_s': method_s,
        'cpu_s': sum(r.get('cpu_s', 0.) for r in runs), 'publish_dir': publish_dir,
        'runs': list(runs), **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# arguments and the runs

# Defaults of the no-argument run (embedded data, ~6 min on 2 CPU cores), measured: see README "timm-tract compare".
DEFAULT_MODEL = 'resnet18'
DEFAULT_MODEL_KWARGS = {'channels': (16, 32, 64, 128), 'stem_width': 32}  # a narrow ResNet-18 (only for DEFAULT_MODEL)
DEFAULT_BUDGETS = (12, 16)
DEFAULT_SEEDS = (0, 1, 2)
_COMPARE_DEFAULTS = dict(
    model=DEFAULT_MODEL, model_kwargs=DEFAULT_MODEL_KWARGS, opt='sgd', lr=0.1, batch_size=32, weight_decay=5e-4,
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
    from .train import build_train_parser

    p = argparse.ArgumentParser(
        prog='timm-tract compare', parents=[build_train_parser()], conflict_handler='resolve', add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Train a recipe with and without TrAct for several epoch budgets and seeds; report top-1 '
                    '(mean ± std), the speed-up, a plot, JSON + Markdown. No arguments: the embedded data.')
    g = p.add_argument_group('Comparison')
    g.add_argument('--budgets', type=int, nargs='+', default=list(DEFAULT_BUDGETS), metavar='EPOCHS',
                   help='epoch budgets; every budget is a separate run with its own full schedule')
    g.add_argument('--seeds', type=int, nargs='+', default=list(DEFAULT_SEEDS), metavar='S',
                   help='seeds (model init and data order); each seed trains both methods')
    g.add_argument('--tract-via', choices=('model', 'opt'), default='model',
                   help="TrAct twin: 'model' = the <model>_tract architecture, 'opt' = the tract-<opt> optimizer")
    g.add_argument('--keep-checkpoints', action='store_true', default=False,
                   help='keep every run\'s checkpoints (default: only the TrAct run of the largest budget, first seed)')
    g.add_argument('--epochs', action=_Refuse, hint='give the epoch budgets with --budgets', nargs='+')
    g.add_argument('--seed', action=_Refuse, hint='give the seeds with --seeds', nargs='+')
    g.add_argument('--output', default='', metavar='PATH', help='output root (default: ./output/compare)')
    g.add_argument('--experiment', default='', metavar='NAME', help='subfolder of --output (default: date-model)')
    p.set_defaults(**_COMPARE_DEFAULTS, data_dir=None)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not args.budgets or any(b < 1 for b in args.budgets):
        raise ValueError(f'--budgets must be positive epoch counts, got {args.budgets}.')
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.budgets)) != len(args.budgets):
        raise ValueError('--budgets and --seeds must not repeat values.')
    if args.model.split('.')[0].endswith('_tract') or args.opt.lower().split('_')[-1].startswith('tract-'):
        raise ValueError(f'give the baseline (--model {args.model} --opt {args.opt}); compare trains its TrAct twin '
                         f'itself (--tract-via model: <model>_tract, --tract-via opt: tract-<opt>).')


def _twin(args: argparse.Namespace) -> Dict[str, dict]:
    """Per method, the train flags that differ: model/opt and λ (only the TrAct run may carry --tract-lambda)."""
    import timm
    from . import models  # noqa: F401  (registers the *_tract twins)

    base = {'model': args.model, 'opt': args.opt, 'tract_lambda': None}
    if args.tract_via == 'model':
        name, _, tag = args.model.partition('.')
        twin = f'{name}_tract' + (f'.{tag}' if tag else '')
        if not timm.is_model(f'{name}_tract'):
            raise ValueError(f'{args.model!r} has no registered TrAct twin {name}_tract (timm_tract covers the ResNet, '
                             f'ConvNeXt, ViT and DeiT families); use --tract-via opt (tract-{args.opt}) instead.')
        tract = {'model': twin, 'opt': args.opt, 'tract_lambda': args.tract_lambda}
    else:
        tract = {'model': args.model, 'opt': f'tract-{args.opt}', 'tract_lambda': args.tract_lambda}
    return {'baseline': base, 'tract': tract}


def _resolve_data(args: argparse.Namespace) -> str:
    """Fill in the embedded data set when no data is given, and --num-classes from an ImageFolder's class folders;
    returns a label for the report."""
    if args.data_dir or args.dataset:
        train_dir = Path(args.data_dir or '') / args.train_split
        if args.num_classes is None and not args.dataset and train_dir.is_dir():
            args.num_classes = sum(1 for p in train_dir.iterdir() if p.is_dir())
        return args.dataset or args.data_dir
    from .data import ensure_data, read_manifest

    root = ensure_data()
    manifest = read_manifest(root)
    args.data_dir = str(root)
    if args.num_classes is None:
        args.num_classes = manifest['num_classes']
    for key, value in _EMBEDDED_DATA_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mean is None and args.std is None:
        args.mean, args.std = manifest['mean'], manifest['std']  # standardise inputs, as the paper does
    counts = manifest['counts']
    return (f"embedded {manifest['name']} ({sum(counts['train'].values())} train / "
            f"{sum(counts['validation'].values())} validation, {manifest['num_classes']} classes, 32x32)")


def _run_args(args: argparse.Namespace, train_keys: Sequence[str], flags: dict, budget: int, seed: int,
              runs_dir: Path, name: str) -> argparse.Namespace:
    ns = argparse.Namespace(**{k: getattr(args, k) for k in train_keys})
    for key, value in flags.items():
        setattr(ns, key, value)
    ns.epochs, ns.seed, ns.output, ns.experiment = budget, seed, str(runs_dir), name
    return ns


def _remove_checkpoints(run_dir: str) -> None:
    for pattern in _CHECKPOINTS:
        for path in Path(run_dir).glob(pattern):
            path.unlink()


def _cpu_seconds() -> float:
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compare(args: argparse.Namespace, argv: Optional[List[str]] = None) -> dict:
    """Run the comparison configured by `build_compare_parser()` arguments; write and return the report."""
    from .train import build_train_parser, train

    args = argparse.Namespace(**vars(args))
    if args.model_kwargs is DEFAULT_MODEL_KWARGS:  # --model-kwargs not given: the narrow widths fit DEFAULT_MODEL only
        args.model_kwargs = dict(DEFAULT_MODEL_KWARGS) if args.model == DEFAULT_MODEL else {}
    _check_args(args)
    flags = _twin(args)
    data_label = _resolve_data(args)
    train_keys = [a.dest for a in build_train_parser()._actions if a.dest != 'help']

    name = args.experiment or f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.model.replace('/', '_')}"
    out_dir = Path(args.output or os.path.join('.', 'output', 'compare')) / name
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f'compare output {out_dir} exists and is not empty; pick another --experiment or '
                              f'--output (nothing was overwritten).')
    runs_dir = out_dir / 'runs'
    budgets, seeds = sorted(args.budgets), list(args.seeds)
    keep = ('tract', budgets[-1], seeds[0])
    jobs = [(b, s, m) for b in budgets for s in seeds for m in METHODS]
    runs, publish_dir = [], None
    start = time.time()
    for i, (budget, seed, method) in enumerate(jobs, 1):
        run_name = f'{method}-e{budget}-s{seed}'
        ns = _run_args(args, train_keys, flags[method], budget, seed, runs_dir, run_name)
        t0, c0 = time.time(), _cpu_seconds()
        result = train(ns)
        wall, cpu = time.time() - t0, _cpu_seconds() - c0
        history = result['history']
        if not history or history[-1].get('eval_top1') is None:
            raise ValueError('compare needs validation accuracy: give a --val-split that exists.')
        runs.append({'method': method, 'epochs': budget, 'seed': seed, 'model': ns.model, 'opt': ns.opt,
                     'top1': history[-1]['eval_top1'], 'best_top1': result['best_metric'],
                     'best_epoch': result['best_epoch'], 'wall_s': wall, 'cpu_s': cpu,
                     'output_dir': result['output_dir'], 'history': history})
        if (method, budget, seed) == keep:
            publish_dir = result['output_dir']
        elif not args.keep_checkpoints:
            _remove_checkpoints(result['output_dir'])
        print(f'[{i}/{len(jobs)}] {run_name} ({ns.model}, {ns.opt}): top-1 {history[-1]["eval_top1"]:.2f}% '
              f'in {wall:.1f} s', file=sys.stderr, flush=True)

    recipe = (f"{f'model kwargs {args.model_kwargs}, ' if args.model_kwargs else ''}"
              f"{args.opt} lr {args.lr}, batch {args.batch_size}, weight decay {args.weight_decay}, {args.sched} "
              f"schedule{' per update' if args.sched_on_updates else ''}, warmup {args.warmup_epochs} epochs, "
              f"label smoothing {args.smoothing}, {'no augmentation' if args.no_aug else 'timm augmentation'}, "
              f"TrAct λ {args.tract_lambda} via {args.tract_via}")
    report = build_report(
        runs, baseline_label=flags['baseline']['model'] if args.tract_via == 'model' else f'{args.model} + {args.opt}',
        tract_label=flags['tract']['model'] if args.tract_via == 'model' else f"{args.model} + {flags['tract']['opt']}",
        data=data_label, recipe=recipe, seeds=seeds, wall_clock_s=time.time() - start, publish_dir=publish_dir,
        created=datetime.datetime.now().isoformat(timespec='seconds'), num_classes=args.num_classes,
        command=' '.join(['timm-tract compare', *argv] if argv is not None else ['timm-tract', *sys.argv[1:]]))
    report['paths'] = write_report(report, str(out_dir))
    return report
