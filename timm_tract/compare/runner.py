""" Running the comparison's trainings: each run in-process or in a spawned worker process, `--jobs` at a time, its
console output sent to its own log file.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..errors import CompareError
from ..flags import cpu_count
from ..rundir import remove_checkpoints

__all__ = ['run_one', 'execute', 'resolve_jobs']


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


def run_one(ns: argparse.Namespace, method: str, keep: bool, log_path: str, threads: Optional[int]) -> dict:
    """Train one run of the comparison (in a worker process or in-process) and return its run dict."""
    import torch
    from ..train import train

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
    history = result.history
    if not history or history[-1].get('eval_top1') is None:
        raise CompareError('compare needs validation accuracy: give a --val-split that exists.')
    if not keep:
        remove_checkpoints(result.output_dir)
    return {'method': method, 'epochs': ns.epochs, 'seed': ns.seed, 'model': ns.model, 'opt': ns.opt,
            'top1': history[-1]['eval_top1'], 'best_top1': result.best_metric, 'best_epoch': result.best_epoch,
            'wall_s': wall, 'cpu_s': cpu, 'output_dir': result.output_dir, 'log': log_path,
            'history': history}


def _init_worker(threads: Optional[int]) -> None:
    if threads:  # before torch is imported in this process
        for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
            os.environ[var] = str(threads)


def resolve_jobs(jobs: Optional[int], device: str, n_runs: int) -> Tuple[int, Optional[int]]:
    """(parallel runs, torch threads per run; None = leave torch's setting) for the device."""
    if str(device).startswith('cuda'):
        return min(jobs or 1, n_runs), None
    return min(jobs or cpu_count(), n_runs), 1


def execute(tasks: List[dict], jobs: int, threads: Optional[int], done: Callable[[dict, dict], None],
             fn: Callable[..., dict] = run_one) -> None:
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
