""" The comparison's report: the JSON-serialisable dict (`build_report`), its Markdown (`format_markdown`) and plot
(`plot_report`, matplotlib imported only there), written into the compare directory (`write_report`).
"""
import json
import os
import platform
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..flags import cpu_count
from ..rundir import COMPARE_PLOT, COMPARE_REPORT, COMPARE_REPORT_MD
from ..errors import CompareError
from .stats import (METHODS, _VERDICTS, _final, _run_time, _time_to_accuracy, aggregate, bootstrap_speedup,
                    epoch_times, paired_differences, speedup)

__all__ = ['build_report', 'format_markdown', 'plot_report', 'write_report', 'rebuild_report', 'format_duration',
           'load_average']


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
        f"**Conclusion:** {_conclusion(report)}",
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
        lines += ['', f"Speed-up in time to the baseline's best mean top-1: {tta['cpu']:.2f}x in CPU time (mean time "
                      f"of the baseline's {sp['baseline_epochs']}-epoch runs over TrAct's {sp['tract_epochs']}-epoch "
                      f"runs); in wall-clock time {tta['wall']:.2f}x, which also depends on what else ran on the "
                      f"machine (load average below)."]
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
        f'![validation accuracy]({COMPARE_PLOT})',
        '',
        f"Machine: {m['device']}; {m['platform']}; torch {m['torch']}, timm {m['timm']}. "
        f"Wall-clock: {format_duration(report['wall_clock_s'])} for {len(report['runs'])} runs{jobs} "
        f"(run time summed: baseline {format_duration(report['method_s']['baseline'])}, TrAct "
        f"{format_duration(report['method_s']['tract'])}; CPU time {format_duration(report.get('cpu_s', 0.))})."
        f"{load_text}",
    ]
    if report.get('publish_dir'):
        lines += ['', f"TrAct run kept for publishing: `{report['publish_dir']}`"]
    lines += ['', 'Runs (final-epoch top-1, time of the run):', '', '| run | method | budget | seed | top-1 (%) | '
              'wall | CPU |', '|---|---|---|---|---|---|---|']
    order = sorted(report['runs'], key=lambda r: (int(r['epochs']), int(r['seed']), METHODS.index(r['method'])))
    for r in order:
        lines.append(f"| {r['method']}-e{r['epochs']}-s{r['seed']} | {names[r['method']]} | {r['epochs']} | "
                     f"{r['seed']} | {_final(r):.2f} | {format_duration(_run_time(r, 'wall_s'))} | "
                     f"{format_duration(_run_time(r, 'cpu_s'))} |")
    return '\n'.join(lines) + '\n'


def _conclusion(report: dict) -> str:
    """One line: did TrAct reach the baseline's best in fewer epochs, and the paired verdict at the largest budget."""
    sp = report['speedup']
    if sp.get('factor') is None:
        text = (f"TrAct did not reach the baseline's best mean top-1 ({sp['baseline_top1']:.2f}%) within the budgets "
                f"tried")
    else:
        cpu = (report.get('time_to_accuracy') or {}).get('cpu')
        text = (f"TrAct reached the baseline's best mean top-1 ({sp['baseline_top1']:.2f}%) in {sp['tract_epochs']} "
                f"instead of {sp['baseline_epochs']} epochs: {'≥ ' if sp['lower_bound'] else ''}{sp['factor']:.2f}x in "
                f"epochs" + (f", {cpu:.2f}x in CPU time" if cpu is not None else ''))
    paired = report.get('paired') or []
    if paired:
        last = paired[-1]
        ci = (f", 95% interval [{last['ci_low']:+.2f}, {last['ci_high']:+.2f}]" if last['ci_low'] is not None else '')
        text += (f"; at {_epochs(last['epochs'])} TrAct − baseline = {last['mean']:+.2f} points over {last['n']} "
                 f"seed(s){ci}: {_VERDICTS[last['verdict']]}")
    return text + '.'


def _epochs(budget: int) -> str:
    return f"{budget} epoch{'' if budget == 1 else 's'}"


def format_duration(seconds: float) -> str:
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
    paths = {'json': str(out / COMPARE_REPORT), 'markdown': str(out / COMPARE_REPORT_MD),
             'plot': str(out / COMPARE_PLOT)}
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
    device = f'CPU {cpu}, {cpu_count()} cores'
    if torch.cuda.is_available():
        device = f'GPU {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()}x); ' + device
    return {'device': device, 'platform': platform.platform(), 'python': platform.python_version(),
            'torch': torch.__version__, 'timm': timm.__version__}


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
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
    path = Path(out_dir) / COMPARE_REPORT
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f'{path} cannot be read as a compare report ({e}).') from None
    keep = {k: v for k, v in old.items() if k not in _DERIVED}
    report = build_report(old['runs'], **keep)
    report['paths'] = write_report(report, out_dir)
    return report
