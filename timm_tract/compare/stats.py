""" Statistics of a comparison (pure numpy): aggregation over seeds, paired differences with Student-t intervals,
the speed-up rule and its bootstrap interval, time per epoch.

A run is a dict with 'method' ('baseline'/'tract'), 'epochs' (its budget), 'seed', 'history' (per-epoch dicts with
'eval_top1' in %) and optionally 'wall_s'/'cpu_s'. Top-1 of a run is its final-epoch validation top-1.

The speed-up rule (as in the paper), in one place (`_reach`, used by `speedup` and `bootstrap_speedup`): the
baseline's best budget B is the one with the highest mean top-1 (smallest on ties); T is the smallest TrAct budget
whose mean top-1 reaches it; speed-up = B / T in epochs (a lower bound when T is the smallest budget tried).
"""
import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CompareError

__all__ = ['METHODS', 'aggregate', 'speedup', 'paired_differences', 't_quantile', 'bootstrap_speedup', 'epoch_times',
           'TableRow', 'table_rows']


METHODS = ('baseline', 'tract')


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


def speedup(table: Sequence[Mapping[str, Any]]) -> dict:
    """Speed-up of TrAct over the baseline from an `aggregate` table (rows with 'method', 'epochs', 'mean').

    Returns {'baseline_epochs', 'baseline_top1', 'tract_epochs' (None if never reached), 'factor' (B / T or None),
    'lower_bound' (True if T is the smallest TrAct budget, so fewer epochs might also do), 'text'}.
    """
    base = sorted((r for r in table if r['method'] == 'baseline'), key=lambda r: r['epochs'])
    tract = sorted((r for r in table if r['method'] == 'tract'), key=lambda r: r['epochs'])
    if not base or not tract:
        raise CompareError('speed-up needs both baseline and tract rows in the table')
    best_i, reach_i = _reach(np.array([r['mean'] for r in base]), np.array([r['mean'] for r in tract]))
    best = base[int(best_i)]
    reached = tract[int(reach_i)] if reach_i >= 0 else None
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One row of a report's top-1 table: `method` ('baseline'/'tract'), budget `epochs` (> 0), `n` seeds, `mean` and
    `std` of the final top-1 over seeds (%)."""
    method: str
    epochs: int
    n: int
    mean: float
    std: float

    @classmethod
    def from_json(cls, row: Any) -> Optional['TableRow']:
        """The row from a report.json entry, None when any field is missing or of the wrong type or range (a report
        read from disk is not trusted)."""
        if not isinstance(row, dict):
            return None
        method, epochs, n, mean, std = (row.get('method'), row.get('epochs'), row.get('n', 0), row.get('mean'),
                                        row.get('std', 0.))
        if (method in METHODS and _is_int(epochs) and epochs > 0 and _is_int(n) and _is_real(mean) and 0 <= mean <= 100
                and _is_real(std) and std >= 0):
            return cls(method, epochs, n, float(mean), float(std))
        return None


def table_rows(report: Mapping[str, Any]) -> List[TableRow]:
    """The well-formed rows of a report's 'table' (see `TableRow.from_json`), in the report's order."""
    table = report.get('table')
    rows = (TableRow.from_json(r) for r in (table if isinstance(table, list) else []))
    return [r for r in rows if r is not None]
