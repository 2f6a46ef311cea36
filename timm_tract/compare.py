""" `timm-tract compare`: train a recipe with and without TrAct over epoch budgets and seeds, and say how sure it is.

For every epoch budget and seed the same recipe is trained twice through `timm_tract.train.train` (the engine of
`timm-tract train`): the baseline, and its TrAct twin — either the `<arch>_tract` model (``--tract-via model``) or the
`tract-<opt>` optimizer (``--tract-via opt``). Both runs of a pair use the same seed, hence the same initial weights
and the same data order; only the first layer's weight gradient differs.

Runs are independent, so ``--jobs N`` trains N of them at a time in worker processes (CPU: one torch thread per run,
default N = the number of cores; CUDA: default 1, runs share the device). Every run uses one torch thread on CPU
whatever N is, so the results do not depend on ``--jobs``.

Outputs in the compare directory: ``report.json`` (every run's per-epoch history and times, the tables, the
statistics, the machine), ``report.md``, ``compare.png`` (accuracy vs budget, and accuracy vs epoch with seed bands),
``runs/<method>-e<budget>-s<seed>/`` train.py-layout run directories with ``runs/<run>.log`` beside them; checkpoints
are kept only for the TrAct run of the largest budget and first seed (``publish_dir`` in the report), ready to publish.

Top-1 of a run is its final-epoch validation top-1 (no best-epoch selection). Statistics:
- per budget, the paired difference TrAct − baseline over seeds (a seed fixes both runs' initial weights and data
  order): mean, 95% Student-t interval, verdict (TrAct better / worse / not distinguishable at this number of seeds);
- speed-up (as in the paper): the baseline's best budget B is the one with the highest mean top-1 (smallest on
  ties); T is the smallest TrAct budget whose mean top-1 reaches it; speed-up = B / T in epochs (a lower bound when T
  is the smallest budget tried) and mean time of the baseline's B runs / mean time of TrAct's T runs; the uncertainty
  of both comes from a seeded bootstrap over seeds, "not determined" when TrAct fails to reach the baseline's best
  in more than 2.5% of the resamples (or with fewer than 3 seeds).
"""
import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import CompareError, OutputExistsError
from .naming import TRACT_OPT_PREFIX, is_tract_optimizer, tract_base_arch, twin_name
from .rundir import remove_checkpoints

__all__ = [
    'build_compare_parser', 'compare', 'aggregate', 'speedup', 'paired_differences', 't_quantile', 'bootstrap_speedup',
    'epoch_times', 'build_report', 'plot_report', 'format_markdown', 'write_report', 'rebuild_report',
]

_logger = logging.getLogger(__name__)

METHODS = ('baseline', 'tract')


# ---------------------------------------------------------------------------------------------------------------
# pure parts: aggregation, statistics, speed-up, Markdown, plot

def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and Bessel-corrected standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.
    return mean, std


def _final(run: dict) -> float:
    return float(run['history'][-1]['eval_top1'])

# Student's t 0.975 quantiles (two-sided 95%) for 1..30 degrees of freedom
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959963984540054


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the 95% two-sided interval's factor).

    A table for df ≤ 30 (4 decimals), the Cornish–Fisher expansion in 1/df above (error below 1e-7 there)."""
    if df < 1:
        raise ValueError(f'degrees of freedom must be >= 1, got {df}')
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))


def _cells(runs: Sequence[dict]) -> Dict[Tuple[str, int], Dict[int, dict]]:
    """{(method, budget): {seed: run}}."""
    cells: Dict[Tuple[str, int], Dict[int, dict]] = {}
    for run in runs:
        cells.setdefault((run['method'], int(run['epochs'])), {})[int(run['seed'])] = run
    return cells


_VERDICTS = {'better': 'TrAct better', 'worse': 'TrAct worse', 'not distinguishable': 'not distinguishable',
             'not determined': 'not determined (one seed)'}


def paired_differences(runs: Sequence[dict]) -> List[dict]:
    """Per budget, TrAct − baseline final top-1 (points) over the seeds both methods ran.

    Returns [{'epochs', 'n', 'mean', 'std', 'ci_low', 'ci_high', 'verdict', 'per_seed'}] sorted by budget; the
    interval is the 95% Student-t interval of the mean (None with one pair), the verdict 'better' / 'worse' when it
    excludes 0, else 'not distinguishable' ('not determined' with one pair).
    """
    cells = _cells(runs)
    rows = []
    for budget in sorted({b for (_, b) in cells}):
        base, tract = cells.get(('baseline', budget), {}), cells.get(('tract', budget), {})
        seeds = sorted(set(base) & set(tract))
        if not seeds:
            continue
        diffs = [_final(tract[s]) - _final(base[s]) for s in seeds]
        mean, std = _mean_std(diffs)
        row = {'epochs': budget, 'n': len(diffs), 'mean': mean, 'std': std, 'ci_low': None, 'ci_high': None,
               'verdict': 'not determined', 'per_seed': {str(s): d for s, d in zip(seeds, diffs)}}
        if len(diffs) > 1:
            half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
            row.update(ci_low=mean - half, ci_high=mean + half)
            row['verdict'] = 'better' if mean - half > 0 else 'worse' if mean + half < 0 else 'not distinguishable'
        rows.append(row)
    return rows


def _reach(base_means: np.ndarray, tract_means: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The speed-up rule on budget-sorted means (..., n_budgets): index of the baseline's best budget (first = smallest
    on ties) and of the smallest TrAct budget reaching it (-1 where none does)."""
    best = base_means.argmax(-1)
    target = np.take_along_axis(base_means, best[..., None], -1)
    reached = tract_means >= target
    return best, np.where(reached.any(-1), reached.argmax(-1), -1)


def _run_time(run: dict, key: str) -> float:
    return float(run.get(key) or 0.)


def bootstrap_speedup(runs: Sequence[dict], n_boot: int = 2000, seed: int = 0, time_key: str = 'cpu_s') -> dict:
    """Uncertainty of the speed-up over seeds: resample the seeds with replacement (a resampled seed brings both
    methods' runs at every budget, keeping the pairs), apply the speed-up rule to each resample's means.

    Uses the budgets both methods ran and the seeds present in all of them. Returns {'n_boot', 'seed', 'n_seeds',
    'epochs': [low, high] (2.5/97.5 percentiles of B/T), 'time': [low, high] (of the time ratio, `time_key` per
    run), 'not_reached_share', 'lower_bound_share' (resamples where T is the smallest budget), 'determined',
    'text'}; 'determined' is False with fewer than 3 seeds or when TrAct misses the baseline's best in more than
    2.5% of the resamples (then the intervals are None).
    """
    cells = _cells(runs)
    budgets = sorted({b for (m, b) in cells if m == 'baseline'} & {b for (m, b) in cells if m == 'tract'})
    seed_sets = [set(cells[(m, b)]) for m in METHODS for b in budgets]
    seeds = sorted(set.intersection(*seed_sets)) if seed_sets else []
    out = {'n_boot': n_boot, 'seed': seed, 'n_seeds': len(seeds), 'time_key': time_key, 'epochs': None,
           'time': None, 'not_reached_share': None, 'lower_bound_share': None, 'determined': False}
    if len(seeds) < 3 or not budgets:
        out['text'] = (f'Speed-up interval not determined: {len(seeds)} seed(s) in every cell, the bootstrap '
                       f'needs ≥ 3.')
        return out
    acc = np.array([[[_final(cells[(m, b)][s]) for s in seeds] for b in budgets] for m in METHODS])
    sec = np.array([[[_run_time(cells[(m, b)][s], time_key) for s in seeds] for b in budgets] for m in METHODS])
    idx = np.random.default_rng(seed).integers(0, len(seeds), size=(n_boot, len(seeds)))
    acc_m, sec_m = acc[:, :, idx].mean(-1), sec[:, :, idx].mean(-1)  # (method, budget, n_boot)
    best, reach = _reach(acc_m[0].T, acc_m[1].T)
    ok = reach >= 0
    b_arr = np.asarray(budgets, dtype=float)
    epochs = np.where(ok, b_arr[best] / b_arr[np.maximum(reach, 0)], 0.)
    rows = np.arange(n_boot)
    t_base, t_tract = sec_m[0].T[rows, best], sec_m[1].T[rows, np.maximum(reach, 0)]
    times = np.where(ok & (t_tract > 0), t_base / np.where(t_tract > 0, t_tract, 1.), 0.)
    out['not_reached_share'] = float(1. - ok.mean())
    out['lower_bound_share'] = float((ok & (reach == 0)).mean())
    if out['not_reached_share'] > 0.025:
        out['text'] = (f"Speed-up not determined: in {100 * out['not_reached_share']:.0f}% of {n_boot} bootstrap "
                       f"resamples of the {len(seeds)} seeds TrAct does not reach the baseline's best mean top-1.")
        return out
    out['epochs'] = [float(np.percentile(epochs, 2.5)), float(np.percentile(epochs, 97.5))]
    if sec.min() > 0:
        out['time'] = [float(np.percentile(times, 2.5)), float(np.percentile(times, 97.5))]
    out['determined'] = True
    lb = ' (upper end a lower bound: T is the smallest budget tried)' if out['lower_bound_share'] > 0.025 else ''
    time_text = (f", in {'CPU' if time_key == 'cpu_s' else 'wall-clock'} time {out['time'][0]:.2f}–"
                 f"{out['time'][1]:.2f}x" if out['time'] else '')
    out['text'] = (f"95% bootstrap interval over seeds ({n_boot} resamples of {len(seeds)} seeds): speed-up in "
                   f"epochs {out['epochs'][0]:.2f}–{out['epochs'][1]:.2f}x{lb}{time_text}.")
    return out


def epoch_times(runs: Sequence[dict]) -> dict:
    """Time per epoch (training + validation) per method: median over runs of CPU and wall seconds / epochs, and the
    median over pairs (same budget and seed) of TrAct's CPU time per epoch over the baseline's."""
    out: Dict[str, object] = {}
    for method in METHODS:
        mine = [r for r in runs if r['method'] == method and r.get('wall_s')]
        out[method] = {
            'runs': len(mine),
            'cpu_per_epoch': float(np.median([r['cpu_s'] / r['epochs'] for r in mine])) if mine else None,
            'wall_per_epoch': float(np.median([r['wall_s'] / r['epochs'] for r in mine])) if mine else None,
        }
    cells = _cells(runs)
    ratios = [cells[('tract', b)][s]['cpu_s'] / cells[('baseline', b)][s]['cpu_s']
              for (m, b), by_seed in cells.items() if m == 'tract' for s in by_seed
              if s in cells.get(('baseline', b), {}) and cells[('baseline', b)][s].get('cpu_s')
              and by_seed[s].get('cpu_s')]
    out['cpu_ratio_median'] = float(np.median(ratios)) if ratios else None
    out['pairs'] = len(ratios)
    return out


def _time_to_accuracy(runs: Sequence[dict], sp: dict) -> dict:
    """Mean CPU and wall time of the baseline's runs at budget B over TrAct's runs at budget T (None if not reached)."""
    out = {'cpu': None, 'wall': None}
    if sp.get('tract_epochs') is None:
        return out
    cells = _cells(runs)
    for key, name in (('cpu_s', 'cpu'), ('wall_s', 'wall')):
        base = [_run_time(r, key) for r in cells[('baseline', sp['baseline_epochs'])].values()]
        tract = [_run_time(r, key) for r in cells[('tract', sp['tract_epochs'])].values()]
        if min(base + tract) > 0:
            out[name] = (sum(base) / len(base)) / (sum(tract) / len(tract))
    return out


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
        raise CompareError('speed-up needs both baseline and tract rows in the table')
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


def _fmt_range(values: Optional[Sequence[float]], unit: str = 'x') -> str:
    return f'{values[0]:.2f}–{values[1]:.2f}{unit}' if values else 'not determined'


def format_markdown(report: dict) -> str:
    """The Markdown report: setup, top-1 table, paired differences with verdicts, speed-up in epochs and time with
    intervals, time per epoch, every run's final top-1 and time, machine and load."""
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
        '| method | ' + ' | '.join(_epochs(b) for b in budgets) + ' |',
        '|---|' + '---|' * len(budgets),
    ]
    for method in METHODS:
        row = [f"{cell[(method, b)]['mean']:.2f} ± {cell[(method, b)]['std']:.2f}" if (method, b) in cell else '–'
               for b in budgets]
        lines.append(f'| {names[method]} | ' + ' | '.join(row) + ' |')
    lines += ['', 'Paired difference TrAct − baseline (same seed: same initial weights and data order), top-1 '
                  'points, mean and 95% t-interval over seeds:', '',
              '| budget | pairs | mean difference | 95% interval | verdict |', '|---|---|---|---|---|']
    for row in report.get('paired') or []:
        ci = f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]" if row['ci_low'] is not None else '–'
        lines.append(f"| {_epochs(row['epochs'])} | {row['n']} | {row['mean']:+.2f} | {ci} | "
                     f"{_VERDICTS[row['verdict']]} |")
    sp = report['speedup']
    lines += ['', sp['text']]
    tta = report.get('time_to_accuracy') or {}
    if tta.get('cpu') is not None or tta.get('wall') is not None:
        lines += ['', f"Speed-up in time to the baseline's best mean top-1: {tta['cpu']:.2f}x in CPU time, "
                      f"{tta['wall']:.2f}x in wall-clock time (mean time of the baseline's {sp['baseline_epochs']}-"
                      f"epoch runs over TrAct's {sp['tract_epochs']}-epoch runs)."]
    if report.get('bootstrap'):
        lines += ['', report['bootstrap']['text']]
    et = report.get('epoch_times')
    if et and et['baseline']['cpu_per_epoch'] is not None and et['tract']['cpu_per_epoch'] is not None:
        ratio = (f"; TrAct / baseline CPU time per epoch, median over {et['pairs']} pairs: "
                 f"{et['cpu_ratio_median']:.2f}" if et.get('cpu_ratio_median') else '')
        lines += ['', 'Time per epoch (training + validation), median over runs: ' + ', '.join(
            f"{names[m]} {et[m]['cpu_per_epoch']:.1f} s CPU / {et[m]['wall_per_epoch']:.1f} s wall" for m in METHODS)
            + ratio + '.']
    m = report['machine']
    load = report.get('load_avg') or {}
    load_text = (f" Load average (1 min) at start {load['start']:.2f}, at end {load['end']:.2f}."
                 if load.get('start') is not None else '')
    jobs = (f", {report['jobs']} parallel job(s)" + (f", {report['threads_per_run']} torch thread(s) per run"
                                                     if report.get('threads_per_run') else '')
            if report.get('jobs') else '')
    lines += [
        '',
        '![validation accuracy](compare.png)',
        '',
        f"Machine: {m['device']}; {m['platform']}; torch {m['torch']}, timm {m['timm']}. "
        f"Wall-clock: {_duration(report['wall_clock_s'])} for {len(report['runs'])} runs{jobs} "
        f"(run time summed: baseline {_duration(report['method_s']['baseline'])}, TrAct "
        f"{_duration(report['method_s']['tract'])}; CPU time {_duration(report.get('cpu_s', 0.))}).{load_text}",
    ]
    if report.get('publish_dir'):
        lines += ['', f"TrAct run kept for publishing: `{report['publish_dir']}`"]
    lines += ['', 'Runs (final-epoch top-1, time of the run):', '', '| run | method | budget | seed | top-1 (%) | '
              'wall | CPU |', '|---|---|---|---|---|---|---|']
    order = sorted(report['runs'], key=lambda r: (int(r['epochs']), int(r['seed']), METHODS.index(r['method'])))
    for r in order:
        lines.append(f"| {r['method']}-e{r['epochs']}-s{r['seed']} | {names[r['method']]} | {r['epochs']} | "
                     f"{r['seed']} | {_final(r):.2f} | {_duration(_run_time(r, 'wall_s'))} | "
                     f"{_duration(_run_time(r, 'cpu_s'))} |")
    return '\n'.join(lines) + '\n'


def _epochs(budget: int) -> str:
    return f"{budget} epoch{'' if budget == 1 else 's'}"


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
    device = f'CPU {cpu}, {_cpu_count()} cores'
    if torch.cuda.is_available():
        device = f'GPU {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()}x); ' + device
    return {'device': device, 'platform': platform.platform(), 'python': platform.python_version(),
            'torch': torch.__version__, 'timm': timm.__version__}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def _load_avg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


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
        n_boot: int = 2000,
        **extra,
) -> dict:
    """The report dict (JSON-serialisable) from finished runs (see `aggregate` for the run dict keys; a run may also
    carry 'wall_s' and 'cpu_s'). Everything derived from the runs is recomputed here, so `rebuild_report` can
    refresh an old report."""
    agg = aggregate(runs)
    method_s = {m: sum(r.get('wall_s', 0.) for r in runs if r['method'] == m) for m in METHODS}
    machine = machine or _machine()
    sp = speedup(agg['table'])
    time_key = 'wall_s' if machine.get('device', '').startswith('GPU') else 'cpu_s'
    return {
        'baseline_label': baseline_label, 'tract_label': tract_label, 'data': data, 'recipe': recipe,
        'seeds': list(seeds), 'budgets': sorted({int(r['epochs']) for r in runs}),
        'table': agg['table'], 'curves': agg['curves'], 'speedup': sp,
        'paired': paired_differences(runs), 'bootstrap': bootstrap_speedup(runs, n_boot=n_boot, time_key=time_key),
        'time_to_accuracy': _time_to_accuracy(runs, sp), 'epoch_times': epoch_times(runs),
        'machine': machine, 'wall_clock_s': wall_clock_s, 'method_s': method_s,
        'cpu_s': sum(r.get('cpu_s', 0.) for r in runs), 'publish_dir': publish_dir,
        **extra, 'runs': list(runs),
    }


_DERIVED = ('budgets', 'table', 'curves', 'speedup', 'paired', 'bootstrap', 'time_to_accuracy', 'epoch_times',
            'method_s', 'cpu_s', 'runs', 'paths')


def rebuild_report(out_dir: str) -> dict:
    """Recompute the tables and statistics of a compare directory's report.json from its runs (e.g. after an upgrade)
    and rewrite report.json, report.md and compare.png. Returns the new report."""
    path = Path(out_dir) / 'report.json'
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f'{path} cannot be read as a compare report ({e}).') from None
    keep = {k: v for k, v in old.items() if k not in _DERIVED}
    report = build_report(old['runs'], **keep)
    report['paths'] = write_report(report, out_dir)
    return report


# ---------------------------------------------------------------------------------------------------------------
# arguments and the runs

# Defaults of the no-argument run (embedded data), measured: see README "timm-tract compare".
DEFAULT_MODEL = 'resnet18'
DEFAULT_MODEL_KWARGS = {'channels': (16, 32, 64, 128)}  # a narrow ResNet-18 (only for DEFAULT_MODEL); stem stays 64
DEFAULT_BUDGETS = (12, 16)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_RUN_MEASURED = ('12 runs; measured with the default --jobs on 2 AMD EPYC cores: 2 min 59 s wall-clock '
                        'when idle, 6 min 17 s with other jobs on them')
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
    from .train import HelpFormatter, build_train_parser

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
    'paired differences with 95%% intervals and verdicts, speed-up in epochs and time with a bootstrap interval, '
    'time per epoch, a plot, JSON + Markdown. No arguments: the embedded data set (%s).' % DEFAULT_RUN_MEASURED)


def _check_args(args: argparse.Namespace) -> None:
    if not args.budgets or any(b < 1 for b in args.budgets):
        raise CompareError(f'--budgets must be positive epoch counts, got {args.budgets}.')
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.budgets)) != len(args.budgets):
        raise CompareError('--budgets and --seeds must not repeat values.')
    if args.jobs is not None and args.jobs < 1:
        raise CompareError(f'--jobs must be >= 1, got {args.jobs}.')
    if tract_base_arch(args.model) is not None or is_tract_optimizer(args.opt):
        raise CompareError(f'give the baseline (--model {args.model} --opt {args.opt}); compare trains its TrAct twin '
                           f'itself (--tract-via model: <model>_tract, --tract-via opt: tract-<opt>).')


def _twin(args: argparse.Namespace) -> Dict[str, dict]:
    """Per method, the train flags that differ: model/opt and λ (only the TrAct run may carry --tract-lambda)."""
    import timm
    from . import models  # noqa: F401  (registers the *_tract twins)

    base = {'model': args.model, 'opt': args.opt, 'tract_lambda': None}
    if args.tract_via == 'model':
        name, _, tag = args.model.partition('.')
        twin = twin_name(name)
        if not timm.is_model(twin):
            raise CompareError(f'{args.model!r} has no registered TrAct twin {twin} (timm_tract covers the '
                               f'ResNet, ConvNeXt, ViT and DeiT families); use --tract-via opt '
                               f'({TRACT_OPT_PREFIX}{args.opt}).')
        tract = {'model': twin + (f'.{tag}' if tag else ''), 'opt': args.opt, 'tract_lambda': args.tract_lambda}
    else:
        tract = {'model': args.model, 'opt': TRACT_OPT_PREFIX + args.opt, 'tract_lambda': args.tract_lambda}
    return {'baseline': base, 'tract': tract}


def _resolve_data(args: argparse.Namespace) -> str:
    """Fill in the embedded data set when no data is given, and --num-classes from an ImageFolder's class folders;
    returns a label for the report."""
    from .data import describe_data

    if args.data_dir or args.dataset:
        train_dir = Path(args.data_dir or '') / args.train_split
        if args.num_classes is None and not args.dataset and train_dir.is_dir():
            args.num_classes = sum(1 for p in train_dir.iterdir() if p.is_dir())
        known = describe_data(args.data_dir)
        if known is not None:
            return known['name'] + (f" (subset: train = {known['subset']['train']}, validation = "
                                    f"{known['subset']['validation']})" if known.get('subset') else '')
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
    ns = argparse.Namespace(**{k: getattr(args, k) for k in train_keys if hasattr(args, k)})
    for key, value in flags.items():
        setattr(ns, key, value)
    ns.epochs, ns.seed, ns.output, ns.experiment = budget, seed, str(runs_dir), name
    return ns




def _cpu_seconds() -> float:
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Quiet:
    """Send a run's console output (stdout, stderr, the timm / timm_tract loggers) to its log file."""

    _LOGGERS = ('timm', 'timm_tract')

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import logging
        self.file = open(self.path, 'w', buffering=1)
        self.streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.file
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s'))
        self.saved = []
        for name in self._LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level, logger.propagate))
            logger.addHandler(self.handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        return self

    def __exit__(self, *exc):
        for logger, level, propagate in self.saved:
            logger.removeHandler(self.handler)
            logger.setLevel(level)
            logger.propagate = propagate
        sys.stdout, sys.stderr = self.streams
        self.file.close()
        return False


def _run_one(ns: argparse.Namespace, method: str, keep: bool, log_path: str, threads: Optional[int]) -> dict:
    """Train one run of the comparison (in a worker process or in-process) and return its run dict."""
    import torch
    from .train import train

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0, c0 = time.time(), _cpu_seconds()
        with _Quiet(Path(log_path)):
            result = train(ns)
        wall, cpu = time.time() - t0, _cpu_seconds() - c0
    finally:
        torch.set_num_threads(before)
    history = result['history']
    if not history or history[-1].get('eval_top1') is None:
        raise CompareError('compare needs validation accuracy: give a --val-split that exists.')
    if not keep:
        remove_checkpoints(result['output_dir'])
    return {'method': method, 'epochs': ns.epochs, 'seed': ns.seed, 'model': ns.model, 'opt': ns.opt,
            'top1': history[-1]['eval_top1'], 'best_top1': result['best_metric'], 'best_epoch': result['best_epoch'],
            'wall_s': wall, 'cpu_s': cpu, 'output_dir': result['output_dir'], 'log': log_path,
            'history': history}


def _init_worker(threads: Optional[int]) -> None:
    if threads:  # before torch is imported in this process
        for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
            os.environ[var] = str(threads)


def _resolve_jobs(jobs: Optional[int], device: str, n_runs: int) -> Tuple[int, Optional[int]]:
    """(parallel runs, torch threads per run; None = leave torch's setting) for the device."""
    if str(device).startswith('cuda'):
        return min(jobs or 1, n_runs), None
    return min(jobs or _cpu_count(), n_runs), 1


def _execute(tasks: List[dict], jobs: int, threads: Optional[int], done: Callable[[dict, dict], None],
             fn: Callable[..., dict] = _run_one) -> None:
    """Run `fn(**task['kwargs'], threads=threads)` for every task, `jobs` at a time in spawned worker processes
    (in this process when jobs == 1); call `done(task, result)` as each one finishes. Workers take the most
    expensive tasks ('cost') first, so they finish close together. A failing task cancels the ones not started and
    re-raises here."""
    if jobs == 1:
        for task in tasks:
            done(task, fn(**task['kwargs'], threads=threads))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    order = sorted(tasks, key=lambda t: (-t.get('cost', 0.), t['index']))
    ctx = multiprocessing.get_context('spawn')  # a fresh interpreter per worker: no forked torch/OpenMP state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {pool.submit(fn, **t['kwargs'], threads=threads): t for t in order}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    done(task, future.result())  # re-raises the task's exception here
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _print(msg: str) -> None:
    """Progress for people (the plan, one line per finished run, the summary): logged, shown on stderr by the CLI."""
    _logger.info(msg)


def compare(args: argparse.Namespace, argv: Optional[List[str]] = None) -> dict:
    """Run the comparison configured by `build_compare_parser()` arguments; write and return the report."""
    from .train import train_flags

    args = argparse.Namespace(**vars(args))
    if args.model_kwargs is None:  # --model-kwargs not given: the narrow widths fit DEFAULT_MODEL only
        args.model_kwargs = dict(DEFAULT_MODEL_KWARGS) if args.model == DEFAULT_MODEL else {}
    _check_args(args)
    flags = _twin(args)
    data_label = _resolve_data(args)
    train_keys = list(train_flags())

    name = args.experiment or f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{args.model.replace('/', '_')}"
    out_dir = Path(args.output or os.path.join('.', 'output', 'compare')) / name
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OutputExistsError(f'compare output {out_dir} exists and is not empty; pick another --experiment or '
                                f'--output (nothing was overwritten).')
    runs_dir = out_dir / 'runs'
    runs_dir.mkdir(parents=True, exist_ok=True)
    budgets, seeds = sorted(args.budgets), list(args.seeds)
    keep = ('tract', budgets[-1], seeds[0])
    specs = [(b, s, m) for b in budgets for s in seeds for m in METHODS]
    tasks = []
    for index, (budget, seed, method) in enumerate(specs):
        run_name = f'{method}-e{budget}-s{seed}'
        ns = _run_args(args, train_keys, flags[method], budget, seed, runs_dir, run_name)
        tasks.append({'index': index, 'name': run_name, 'cost': budget * (1.2 if method == 'tract' else 1.),
                      'kwargs': dict(
            ns=ns, method=method, keep=args.keep_checkpoints or (method, budget, seed) == keep,
            log_path=str(runs_dir / f'{run_name}.log'))})
    jobs, threads = _resolve_jobs(args.jobs, args.device, len(tasks))
    labels = {m: flags[m]['model'] if args.tract_via == 'model' else f"{args.model} + {flags[m]['opt']}"
              for m in METHODS}
    _print(f"timm-tract compare: {labels['baseline']} vs {labels['tract']} on {data_label}\n"
           f"  {len(tasks)} runs = 2 methods x budgets {budgets} epochs x seeds {seeds}; {jobs} at a time"
           + (f", {threads} torch thread each" if threads else f" on {args.device}") + '\n'
           f"  output: {out_dir} (one log per run: runs/<run>.log)")

    results: Dict[int, dict] = {}
    start = time.time()
    load_start = _load_avg()

    name_width = max(len(t['name']) for t in tasks)

    def done(task: dict, run: dict) -> None:
        results[task['index']] = run
        _print(f"[{len(results):>{len(str(len(tasks)))}}/{len(tasks)}] {task['name']:<{name_width}}"
               f"  top-1 {run['top1']:6.2f}%  {run['wall_s']:7.1f} s (CPU {run['cpu_s']:.1f} s)"
               f"  elapsed {_duration(time.time() - start)}")

    _execute(tasks, jobs, threads, done)
    runs = [results[i] for i in range(len(tasks))]
    publish_dir = next(r['output_dir'] for r in runs if (r['method'], r['epochs'], r['seed']) == keep)

    recipe = (f"{f'model kwargs {args.model_kwargs}, ' if args.model_kwargs else ''}"
              f"{args.opt} lr {args.lr}, batch {args.batch_size}, weight decay {args.weight_decay}, {args.sched} "
              f"schedule{' per update' if args.sched_on_updates else ''}, warmup {args.warmup_epochs} epochs, "
              f"label smoothing {args.smoothing}, {'no augmentation' if args.no_aug else 'timm augmentation'}, "
              f"TrAct λ {args.tract_lambda} via {args.tract_via}")
    report = build_report(
        runs, baseline_label=labels['baseline'], tract_label=labels['tract'], data=data_label, recipe=recipe,
        seeds=seeds, wall_clock_s=time.time() - start, publish_dir=publish_dir, jobs=jobs, threads_per_run=threads,
        load_avg={'start': load_start, 'end': _load_avg()},
        created=datetime.datetime.now().isoformat(timespec='seconds'), num_classes=args.num_classes,
        command=' '.join(['timm-tract compare', *argv] if argv is not None else ['timm-tract', *sys.argv[1:]]))
    report['paths'] = write_report(report, str(out_dir))
    _print(f"done: {len(runs)} runs in {_duration(report['wall_clock_s'])} wall-clock, CPU time "
           f"{_duration(report['cpu_s'])}, {jobs} at a time. {report['speedup']['text']}\n"
           f"report: {report['paths']['markdown']}")
    return report
