""" `timm-tract compare --jobs N` stopped by SIGTERM / Ctrl-C: every worker stopped (none left to PID 1), no run
started after the signal, exit 143 / 130, a partial report, and the same command resumes. Real processes, real
signals, a tiny model on a tiny ImageFolder. """
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _descendants(pid: int) -> set:
    """Every living process below `pid` (from /proc: psutil is not a dependency)."""
    parents = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                stat = Path(f'/proc/{entry}/stat').read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(')', 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    """Whether `pid` is a living process (a zombie waiting to be reaped is not)."""
    try:
        os.kill(pid, 0)
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != 'Z'


@pytest.fixture(scope='module')
def data(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp('data'), 10, 4)


def _command(data: Path, out: Path) -> list:
    return [sys.executable, '-m', 'timm_tract.cli', 'compare', '--data-dir', str(data), '--model', 'test_resnet',
            '--img-size', '16', '--crop-pct', '1', '-b', '4', '--lr', '0.05', '--budgets', '1', '2',
            '--seeds', '0', '1', '--jobs', '2', '--output', str(out), '--experiment', 'cmp']


def _start_and_stop(command: list, runs: Path, signum: int, group: bool):
    """Start the compare, wait until a run has finished, record its processes, send `signum` (to the whole process
    group, as a terminal's Ctrl-C does, when `group`). Returns (process, stderr, its processes, the run logs at the
    signal, seconds from the signal to its exit)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, seen = time.time() + 240, set()
    # until a run has finished and both workers are training again. The compare creates a run's log when it hands the
    # run out, so while both workers are busy the logs are every run started so far and no other can start until a
    # run finishes (taking the logs right at a finish instead, with the worker creating its log, missed one in CI)
    while time.time() < deadline and proc.poll() is None:
        seen |= _descendants(proc.pid)
        if runs.is_dir():
            finished = [p for p in runs.glob('*-s*.json')]
            if finished and len(list(runs.glob('*.log'))) == len(finished) + 2:
                break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    seen |= _descendants(proc.pid)
    started = {p.name for p in runs.glob('*.log')}
    t0 = time.time()
    (os.killpg if group else os.kill)(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    return proc, err, seen, started, time.time() - t0


def _assert_stopped(proc, err, seen, started, runs: Path, code: int, word: str):
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert lines[-1] == f'timm-tract compare: {word}', err
    assert 'run the same command to resume' in lines[-2] and 'Traceback' not in err, err
    assert len(seen) >= 2  # the workers (and multiprocessing's resource tracker)
    time.sleep(1.)
    assert [p for p in seen if _running(p)] == []  # every worker stopped, none reparented to PID 1
    assert {p.name for p in runs.glob('*.log')} <= started  # no run started after the signal
    finished = sorted(p.stem for p in runs.glob('*-s*.json'))
    assert finished and len(finished) < 8
    return finished


@pytest.mark.slow
def test_sigterm_stops_every_worker_writes_a_partial_report_and_the_same_command_resumes(data, tmp_path):
    out, runs = tmp_path / 'out', tmp_path / 'out' / 'cmp' / 'runs'
    command = _command(data, out)
    proc, err, seen, started, took = _start_and_stop(command, runs, signal.SIGTERM, group=False)
    finished = _assert_stopped(proc, err, seen, started, runs, 143, 'stopped by SIGTERM')
    assert took < 30, took  # promptly: the running runs are killed, not waited for
    report = json.loads((out / 'cmp' / 'report.json').read_text())
    assert report['partial']['finished'] == len(finished) and report['partial']['planned'] == 8
    assert report['partial']['reason'] == 'stopped by SIGTERM'
    assert sorted(Path(r['output_dir']).name for r in report['runs']) == finished
    assert (out / 'cmp' / 'report.md').read_text().startswith(f'> **Partial report**: {len(finished)} of 8 runs')
    before = {name: (runs / f'{name}.json').read_text() for name in finished}
    summaries = {name: (runs / name / 'summary.csv').read_text() for name in finished}

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f'resuming: {len(finished)} finished runs reused, {8 - len(finished)} to train' in again.stderr
    report = json.loads((out / 'cmp' / 'report.json').read_text())
    assert 'partial' not in report and len(report['runs']) == 8
    by_name = {Path(r['output_dir']).name: r for r in report['runs']}
    for name in finished:  # reused as they were, not trained again
        assert by_name[name] == json.loads(before[name])
        assert (runs / name / 'summary.csv').read_text() == summaries[name]
    assert all(len(r['history']) == r['epochs'] for r in report['runs'])  # the unfinished ones redone in full
    assert not (out / 'cmp' / '.timm-tract.lock').exists()

    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)  # a finished comparison
    assert refused.returncode == 2 and 'holds a finished comparison' in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_every_worker_and_exits_130(data, tmp_path):
    out, runs = tmp_path / 'out', tmp_path / 'out' / 'cmp' / 'runs'
    proc, err, seen, started, took = _start_and_stop(_command(data, out), runs, signal.SIGINT, group=True)
    _assert_stopped(proc, err, seen, started, runs, 130, 'interrupted')
    assert took < 30, took
    assert json.loads((out / 'cmp' / 'report.json').read_text())['partial']['reason'] == 'interrupted (Ctrl-C)'


@pytest.mark.slow
def test_a_running_compare_folder_is_refused_and_other_settings_do_not_resume(data, tmp_path):
    out = tmp_path / 'out'
    command = _command(data, out)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / 'cmp' / '.timm-tract.lock').exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert 'is in use by another timm-tract process' in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode in (0, 143)
    if first.returncode == 143:  # stopped: the same folder with other settings is not resumed
        other = subprocess.run(command[:-4] + ['--lr', '0.01'] + command[-4:], capture_output=True, text=True,
                               timeout=120)
        assert other.returncode == 2 and 'stopped comparison with other settings' in other.stderr, other.stderr


def test_a_claim_is_exclusive_across_processes_and_dies_with_its_process(tmp_path):
    """`rundir.claim_dir`: a second process is refused (naming the holder's pid) while the first holds the claim; a
    holder killed by SIGKILL leaves no stale claim (the kernel drops the lock); release removes the lock file."""
    from timm_tract.errors import OutputExistsError
    from timm_tract.rundir import LOCK_FILE, claim_dir

    hold = ('import sys, time\nfrom timm_tract.rundir import claim_dir\nclaim_dir(sys.argv[1])\nprint("held", '
            'flush=True)\ntime.sleep(60)\n')
    holder = subprocess.Popen([sys.executable, '-c', hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(OutputExistsError, match=rf'in use by another timm-tract process \(pid {holder.pid}\)'):
            claim_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).exists()  # left behind by the killed holder ...
    claim = claim_dir(tmp_path)  # ... but not held by anyone
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    claim.release()
    assert not (tmp_path / LOCK_FILE).exists()
