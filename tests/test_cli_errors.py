""" Bad `timm-tract` command lines: each is one line on stderr and exit 2, no traceback, nothing left on disk; a
programming error keeps its traceback. The command lines run in one real subprocess (`cli.main` per command line,
stderr captured each), so many cases cost one interpreter start. """
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_BAD_TRAIN_FLAGS = {
    'lr': ['--lr', '-1'],
    'sched': ['--sched', 'bogus'],
    'eval-metric': ['--eval-metric', 'bogus'],
    'checkpoint-hist': ['--checkpoint-hist', '0'],
    'device': ['--device', 'bogus'],
    'cuda': ['--device', 'cuda:7'] if not os.environ.get('CUDA_VISIBLE_DEVICES') else ['--device', 'nonsense:0'],
    'opt-kwargs': ['--opt-kwargs', 'bogus=1'],
    'opt': ['--opt', 'bogus'],
    'momentum': ['--momentum', '-1'],
    'weight-decay': ['--weight-decay', '-1'],
    'opt-betas': ['--opt', 'adamw', '--opt-betas', '2', '2'],
    'mean': ['--mean', '0.5', '0.5'],
    'std': ['--std', '0.5', '0.5', '0.5', '0.5'],
    'class-map': ['--class-map', '/nonexistent'],
    'initial-checkpoint': ['--initial-checkpoint', '/nonexistent.pth'],
    'in-chans': ['--in-chans', '2'],
    'input-img-mode': ['--input-img-mode', 'bogus'],
    'model-kwargs': ['--model-kwargs', 'use_naflex=True'],
    'model': ['--model', 'no_such_model'],
    'experiment-long': ['--experiment', 'x' * 300],
    'experiment-dotdot': ['--experiment', '../escape'],
    'experiment-absolute': ['--experiment', '/tmp/escape'],
    'tract-lambda': ['--tract-lambda', '-1', '--model', 'test_resnet_tract'],
    'tract-lambda-plain': ['--tract-lambda', '0.1'],
    'val-batch': ['--validation-batch-size', '0'],
    'grad-accum': ['--grad-accum-steps', '0'],
    'batch-too-large': ['-b', '1000'],
    'val-split': ['--val-split', 'nope'],
    'resume': ['--resume', '/nonexistent/last.pth.tar'],
    'warmup': ['--warmup-epochs', '1', '--warmup-lr', '-1'],
    'interpolation': ['--interpolation', 'bogus'],
    'train-interpolation': ['--train-interpolation', 'bogus'],
    'crop-pct': ['--crop-pct', '-1'],
    'input-size': ['--input-size', '3', '0', '0'],
    'gp': ['--gp', 'bogus'],
    'drop': ['--drop', '2'],
    'drop-path': ['--drop-path', '2'],
    'smoothing': ['--smoothing', '1.5'],
    'clip-mode': ['--clip-grad', '1', '--clip-mode', 'bogus'],
    'torchcompile': ['--torchcompile', 'no_such_backend'],
    'dataset': ['--dataset', 'torch/bogus'],
    'opt-eps': ['--opt', 'adamw', '--opt-eps', '-1'],
    'pretrained-offline': ['--pretrained'],  # HF_HUB_OFFLINE=1: the weights are not in the cache
}
if os.geteuid() == 0:  # root may "write" anywhere os.access asks about, /proc refuses the mkdir itself
    _BAD_TRAIN_FLAGS['output-proc'] = ['--output', '/proc/timm-tract-test']

_DRIVER = textwrap.dedent('''
    import io, json, sys, traceback
    import timm_tract.cli as cli
    results = {}
    for name, argv in json.loads(sys.argv[1]).items():
        err, saved = io.StringIO(), sys.stderr
        sys.stderr = err
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = 'raised', traceback.print_exc(file=err)
        finally:
            sys.stderr = saved
        results[name] = {'code': code, 'stderr': err.getvalue()}
    print(json.dumps(results))
''')


@pytest.fixture(scope='module')
def results(tmp_path_factory, image_folder):
    data = image_folder(tmp_path_factory.mktemp('data'), 4, 2)
    out = tmp_path_factory.mktemp('out')
    base = ['train', '--data-dir', str(data), '--model', 'test_resnet', '--img-size', '16', '-b', '4', '--epochs', '1',
            '--workers', '0', '--device', 'cpu', '--no-aug', '--output', str(out / 'runs')]
    cases = {name: base + ['--experiment', name] + flags for name, flags in _BAD_TRAIN_FLAGS.items()}
    cases['compare-lr'] = ['compare', *base[1:-2], '--output', str(out / 'cmp'), '--lr', '-1', '--budgets', '1',
                           '--seeds', '0', '--experiment', 'c1']
    cases['compare-val-split'] = ['compare', *base[1:-2], '--output', str(out / 'cmp'), '--val-split', '',
                                  '--budgets', '1', '--seeds', '0', '--experiment', 'c2']
    cases['compare-sched'] = ['compare', *base[1:-2], '--output', str(out / 'cmp'), '--sched', 'bogus',
                              '--budgets', '1', '--seeds', '0', '--experiment', 'c3']
    cases['compare-tract-lambda'] = ['compare', *base[1:-2], '--output', str(out / 'cmp'), '--tract-lambda', '-1',
                                     '--budgets', '1', '--seeds', '0', '--experiment', 'c4']
    cases['compare-experiment'] = ['compare', *base[1:-2], '--output', str(out / 'cmp'), '--budgets', '1',
                                   '--seeds', '0', '--experiment', '../escape']
    cases['data-source'] = ['data', '--source', '/nonexistent']  # a TimmTractError raised inside the subcommand
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TIMM_TRACT_DEBUG': '0'}
    proc = subprocess.run([sys.executable, '-c', _DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


@pytest.mark.parametrize('name', [*_BAD_TRAIN_FLAGS, 'compare-lr', 'compare-val-split', 'compare-sched',
                                  'compare-tract-lambda', 'compare-experiment', 'data-source'])
def test_bad_command_line_is_one_line_and_exit_2(results, name):
    seen, out = results
    result = seen[name]
    lines = result['stderr'].strip().splitlines()
    if name == 'pretrained-offline':  # timm logs what it tries to load before it finds nothing
        lines = [ln for ln in lines if not ln.startswith('Loading pretrained weights from Hugging Face hub')]
    assert result['code'] == 2 and len(lines) == 1, result
    assert ': error: ' in lines[0] and 'Traceback' not in result['stderr']
    command = 'compare' if name.startswith('compare') else 'data' if name == 'data-source' else 'train'
    assert lines[0].startswith(f'timm-tract {command}: error: ')
    # nothing left behind that blocks the corrected command (no run dir, no compare folder)
    assert not (out / 'runs' / name).exists() and not (out / 'cmp').exists()
    assert not Path('/tmp/escape').exists() and not (out / 'escape').exists()


def test_a_programming_error_keeps_its_traceback(tmp_path):
    code = textwrap.dedent('''
        import sys
        import timm_tract.cli as cli
        def broken(args):
            raise ValueError('a bug, not a user error')
        cli._run_data = broken  # what `data` runs: a bug inside a subcommand
        sys.exit(cli.main(['data']))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'Traceback' in proc.stderr and 'a bug, not a user error' in proc.stderr


def test_stdout_closed_early_is_one_line_exit_2(tmp_path):
    """`timm-tract data | true`: the reader is gone before the path is printed (real pipe, read end closed)."""
    proc = subprocess.Popen([sys.executable, '-m', 'timm_tract.cli', 'data', '--root', str(tmp_path / 'd')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    lines = [ln for ln in err.strip().splitlines() if 'error' in ln]
    assert proc.returncode == 2 and 'Traceback' not in err, err
    assert len(lines) == 1 and 'broken pipe' in lines[0]
