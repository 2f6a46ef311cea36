""" Running the comparison's trainings: each run in-process or in a spawned worker process, `--jobs` at a time, its
console output sent to its own log file. Ctrl-C, SIGTERM, a failing run or a dying worker stop every worker at once.
"""
import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from ..errors import CompareError, Terminated
from ..flags import cpu_count
from ..rundir import remove_checkpoints

__all__ = ['run_one', 'execute', 'resolve_jobs', 'stop_on_signals', 'WorkerFailed']


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


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the compare process dies, even by SIGKILL (no orphan keeps
    training); elsewhere the worker leaves when it finds its task connection closed."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn, threads: Optional[int], fn: Callable[..., dict]) -> None:
    """A worker process: run the tasks sent over `conn` one at a time, send each result (or exception) back.

    The worker has its own process group (so the compare process can stop it with its data-loader children at
    once) and ignores SIGINT: a Ctrl-C in the terminal reaches the compare process, which stops the workers."""
    _init_worker(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.setpgid(0, 0)
    _die_with_parent()
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:
            return
        if kwargs is None:
            return
        try:
            reply = ('ok', fn(**kwargs, threads=threads))
        except Exception as e:  # noqa: BLE001  (sent back and re-raised in the compare process)
            reply = ('error', e, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # an exception that does not pickle: send its text
            conn.send(('error', RuntimeError(f'{type(reply[1]).__name__}: {reply[1]}'), reply[2]))


class _Worker:
    """One spawned worker process and the connection its tasks go over."""

    def __init__(self, ctx, threads: Optional[int], fn: Callable[..., dict]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, threads, fn))  # not daemonic: data loader workers
        with _sigint_ignored():  # inherited through exec: a Ctrl-C while the worker still imports does not reach it
            self.process.start()
        child.close()
        self.task: Optional[dict] = None

    def stop(self, kill: bool, grace_s: float = 3.) -> None:
        """Ask the worker to leave after its task (kill=False), or kill it and its process group now."""
        if self.process.is_alive():
            if kill:
                self._signal_group(signal.SIGTERM)
            else:
                try:
                    self.conn.send(None)
                except OSError:
                    pass
            self.process.join(grace_s)
            if self.process.is_alive():
                self._signal_group(signal.SIGKILL)
                self.process.join()
        self.conn.close()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):  # not (yet) its own group leader: the process alone
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass


class WorkerFailed(RuntimeError):
    """A worker process died without reporting its run's result (killed, out of memory, a crash in native code)."""


@contextmanager
def stop_on_signals():
    """While inside: SIGTERM raises `errors.Terminated` in this process (Ctrl-C raises KeyboardInterrupt as always),
    so `execute` stops its workers and the caller can write what finished. Only in the main thread (elsewhere the
    process keeps its handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated(signum)
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_ignored(signals: Tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
    """A second Ctrl-C / SIGTERM while the workers are being stopped must not cut the stopping short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _sigint_ignored():
    return _signals_ignored((signal.SIGINT,))


def resolve_jobs(jobs: Optional[int], device: str, n_runs: int) -> Tuple[int, Optional[int]]:
    """(parallel runs, torch threads per run; None = leave torch's setting) for the device."""
    if str(device).startswith('cuda'):
        return min(jobs or 1, n_runs), None
    return min(jobs or cpu_count(), n_runs), 1


def execute(tasks: List[dict], jobs: int, threads: Optional[int], done: Callable[[dict, dict], None],
            fn: Callable[..., dict] = run_one, started: Optional[Callable[[dict], None]] = None) -> None:
    """Run `fn(**task['kwargs'], threads=threads)` for every task, `jobs` at a time in spawned worker processes
    (in this process when jobs == 1); call `started(task)` in this process right before a task is handed out and
    `done(task, result)` as each one finishes. Workers take the most
    expensive tasks ('cost') first, so they finish close together; a task is handed out only when a worker is free,
    so nothing is queued inside a worker.

    A failing task, a dying worker, Ctrl-C (KeyboardInterrupt) or SIGTERM (`errors.Terminated`, inside
    `stop_on_signals`) stop every worker at once (their runs are not finished), start no other task, and re-raise
    here; `done` has been called for exactly the tasks that finished."""
    if jobs == 1:
        for task in tasks:
            if started is not None:
                started(task)
            done(task, fn(**task['kwargs'], threads=threads))
        return
    import multiprocessing
    from multiprocessing.connection import wait

    queue = sorted(tasks, key=lambda t: (-t.get('cost', 0.), t['index']))[::-1]  # pop() takes the costliest
    ctx = multiprocessing.get_context('spawn')  # a fresh interpreter per worker: no forked torch/OpenMP state
    workers: List[_Worker] = []
    finished = False
    try:
        workers = [_Worker(ctx, threads, fn) for _ in range(min(jobs, len(tasks)))]
        for worker in workers:
            _hand_out(worker, queue, started)
        while any(w.task is not None for w in workers):
            busy = {w.conn: w for w in workers if w.task is not None}
            sentinels = {w.process.sentinel: w for w in busy.values()}
            for ready in wait(list(busy) + list(sentinels)):
                worker = busy.get(ready) or sentinels[ready]
                if worker.task is None:
                    continue  # its result and its sentinel were both ready: handled already
                task, result = worker.task, _receive(worker)
                worker.task = None
                done(task, result)
                _hand_out(worker, queue, started)
        finished = True
    finally:
        with _signals_ignored():
            for worker in workers:
                worker.stop(kill=not finished)


def _hand_out(worker: _Worker, queue: List[dict], started: Optional[Callable[[dict], None]]) -> None:
    if queue:
        worker.task = queue.pop()
        if started is not None:
            started(worker.task)
        worker.conn.send(worker.task['kwargs'])


def _receive(worker: _Worker) -> dict:
    """The result of the worker's task; its exception re-raised here (with the worker's traceback as the cause)."""
    try:
        reply = worker.conn.recv()
    except (EOFError, OSError):
        worker.process.join(1.)
        raise WorkerFailed(f"the worker process of run {worker.task.get('name', worker.task['index'])} died "
                           f'(exit code {worker.process.exitcode}) without finishing it.') from None
    if reply[0] == 'ok':
        return reply[1]
    error, text = reply[1], reply[2]
    raise error from _RemoteTraceback(text)


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process (shown as the cause of the re-raised one)."""

    def __str__(self) -> str:
        return '\n' + self.args[0]
