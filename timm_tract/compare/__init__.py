""" `timm-tract compare`: train a recipe with and without TrAct over epoch budgets and seeds, and say how sure it is.

For every epoch budget and seed the same recipe is trained twice through `timm_tract.train.train` (the engine of
`timm-tract train`): the baseline, and its TrAct twin — either the `<arch>_tract` model (``--tract-via model``) or the
`tract-<opt>` optimizer (``--tract-via opt``). Both runs of a pair use the same seed, hence the same initial weights
and the same data order; only the first layer's weight gradient differs.

Runs are independent, so ``--jobs N`` trains N of them at a time in worker processes (CPU: one torch thread per run,
default N = the number of cores; CUDA: default 1, runs share the device). Every run uses one torch thread on CPU
whatever N is, so the results do not depend on ``--jobs``.

Outputs in the compare directory (layout: `timm_tract.rundir`): ``report.json`` (every run's per-epoch history and
times, the tables, the statistics, the machine), ``report.md``, ``compare.png`` (accuracy vs budget, and accuracy vs
epoch with seed bands), ``runs/<method>-e<budget>-s<seed>/`` train.py-layout run directories with ``runs/<run>.log``
beside them; checkpoints are kept only for the TrAct run of the largest budget and first seed (``publish_dir`` in the
report), ready to publish.

Statistics (`compare.stats`): per budget, the paired difference TrAct − baseline over seeds (a seed fixes both runs'
initial weights and data order): mean, 95% Student-t interval, verdict (TrAct better / worse / not distinguishable
at this number of seeds); the speed-up in epochs and time, with a seeded bootstrap over seeds ("not determined" when
TrAct fails to reach the baseline's best in more than 2.5% of the resamples, or with fewer than 3 seeds).

Modules: `stats` (pure numpy), `report` (JSON, Markdown, plot; matplotlib only when plotting), `runner` (worker
processes), `run` (the command and its parser). Importing this package imports `stats` and `report` only.
"""
from .stats import (METHODS, TableRow, aggregate, bootstrap_speedup, epoch_times, paired_differences, speedup,
                    t_quantile)
from .report import build_report, format_markdown, plot_report, rebuild_report, write_report

__all__ = [
    'build_compare_parser', 'compare', 'aggregate', 'speedup', 'paired_differences', 't_quantile', 'bootstrap_speedup',
    'epoch_times', 'build_report', 'plot_report', 'format_markdown', 'write_report', 'rebuild_report', 'METHODS',
    'TableRow',
]


def __getattr__(name: str):
    """`compare` and `build_compare_parser` come from `compare.run`, imported on first use (argparse, the engine)."""
    if name in ('compare', 'build_compare_parser', 'COMPARE_DESCRIPTION'):
        from . import run
        return getattr(run, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
