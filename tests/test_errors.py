""" Bad input and injected faults: every one is a TimmTractError (also the built-in it replaces) whose message names
the fix, and nothing changes on disk or in the model. CLI cases run the real console script in a subprocess. """
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask
from timm.utils import load_checkpoint_metadata

import timm_tract
from timm_tract.errors import PublishError, RunDirError, TimmTractError, TrainError
from timm_tract.hub import PublishOptions, build_repo_folder, publish, read_label_names, read_run
from timm_tract.published import load_manifest, published_cfgs
from timm_tract.flags import build_train_parser
from timm_tract.train import train

from _tract_runs import REPO_ROOT, copy_run, make_run

pytestmark = pytest.mark.usefixtures('one_thread')
TIMM_TRACT = str(Path(sys.executable).parent / 'timm-tract')


def tree(root: Path) -> dict:
    """Every file and folder under root with its content hash: compared before and after a failed call."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir')
            for p in sorted(root.rglob('*'))}


def parameters(model: torch.nn.Module) -> list:
    """Identity, class and value of every module and parameter: compared before and after a failed call."""
    return [(name, type(m), [(id(p), p.detach().clone()) for p in m.parameters(recurse=False)])
            for name, m in model.named_modules()]


def same_model(before: list, model: torch.nn.Module) -> bool:
    after = parameters(model)
    return len(before) == len(after) and all(
        a[0] == b[0] and a[1] is b[1] and [i for i, _ in a[2]] == [i for i, _ in b[2]]
        and all(torch.equal(x, y) for (_, x), (_, y) in zip(a[2], b[2])) for a, b in zip(before, after))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_folder) -> Path:
    return image_folder(tmp_path_factory.mktemp('data'), 6, 2)


def train_args(data_dir, out, name='run', **kw) -> argparse.Namespace:
    base = dict(data_dir=str(data_dir), model='resnet10t', num_classes=2, img_size=16, batch_size=4, workers=0,
                epochs=1, opt='sgd', lr=0.05, warmup_epochs=0, no_aug=True, output=str(out), experiment=name,
                device='cpu', seed=7)
    base.update(kw)
    args = build_train_parser().parse_args([])
    for k, v in base.items():
        setattr(args, k, v)
    return args


# --- training: bad input, refused before anything is built or written ----------------------------------------------

@pytest.mark.parametrize('change,match', [
    (dict(tract_lambda=-1.0, opt='tract-sgd'), r'--tract-lambda: .*paper default 0\.1'),
    (dict(tract_lambda=float('nan'), opt='tract-sgd'), r'--tract-lambda: .*finite'),
    (dict(opt='tract-sgd', opt_kwargs={'tract_lambda': 'abc'}), r'--opt-kwargs tract_lambda: .*real number > 0.*0\.1'),
    (dict(model='resnet10t_tract', model_kwargs={'tract_lambda': 0}), r'--model-kwargs tract_lambda: .*> 0'),
    (dict(num_classes=1), r'the data has 2 classes .* pass --num-classes 2'),
    (dict(num_classes=0), r'--num-classes must be >= 1'),
    (dict(grad_accum_steps=0), r'--grad-accum-steps must be >= 1'),
    (dict(amp_dtype='float8'), r'--amp-dtype must be float16 or bfloat16'),
    (dict(workers=-1), r'--workers must be >= 0'),
    (dict(model_kwargs={'no_such_kwarg': 1}), r'--model-kwargs: resnet10t does not take'),
    (dict(model='test_vit', img_size=None), r'takes a fixed .* pass --img-size 160'),
    (dict(dataset='', train_split='nowhere'), r"no 'nowhere' split folder.*--train-split"),
])
def test_train_bad_input(data_dir, tmp_path, change, match):
    before = tree(tmp_path)
    with pytest.raises(TrainError, match=match) as e:
        train(train_args(data_dir, tmp_path, **change))
    assert isinstance(e.value, (TimmTractError, ValueError))
    assert tree(tmp_path) == before


def test_train_empty_split_folder(tmp_path, image_folder):
    data = image_folder(tmp_path / 'data', 6, 2)
    for f in (data / 'validation').rglob('*.png'):
        f.unlink()
    before = tree(tmp_path)
    with pytest.raises(TrainError, match=r"'validation' split .* holds no images; put images in <split>/<class>/"):
        train(train_args(data, tmp_path / 'out'))
    assert tree(tmp_path) == before


def test_train_output_that_is_a_file(data_dir, tmp_path):
    (tmp_path / 'taken').write_text('a user file')
    before = tree(tmp_path)
    for output in (tmp_path / 'taken', tmp_path / 'taken' / 'below'):
        with pytest.raises(TrainError, match=r'is a file, not a directory; pick another --output'):
            train(train_args(data_dir, output))
    assert tree(tmp_path) == before


def test_resume_from_garbage_or_another_architecture(data_dir, tmp_path):
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'\xff\xfe not a checkpoint \x00' * 50)
    other = tmp_path / 'other.pth.tar'
    state = timm.create_model('resnet18', num_classes=2).state_dict()
    torch.save({'epoch': 0, 'arch': 'resnet18', 'state_dict': state}, other)
    before = tree(tmp_path)
    with pytest.raises(TrainError, match=r'is not a readable timm checkpoint .*give the last.pth.tar of a run'):
        train(train_args(data_dir, tmp_path / 'out', resume=str(garbage)))
    with pytest.raises(TrainError, match=r'saved from resnet18, which does not match .* resume with the --model'):
        train(train_args(data_dir, tmp_path / 'out', resume=str(other)))
    assert tree(tmp_path) == before


# --- training: faults while writing checkpoints ----------------------------------------------------------------------

def _failing_save(monkeypatch, fail_on_call: int):
    """torch.save that writes part of the file on its n-th call, then raises 'No space left on device'."""
    import timm.utils.checkpoint_saver as cs
    real_save, calls = torch.save, {'n': 0}

    def save(obj, path, *a, **k):
        calls['n'] += 1
        if calls['n'] == fail_on_call:
            with open(path, 'wb') as f:
                f.write(b'\x80\x02partial')
            raise OSError(28, 'No space left on device')
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(cs.torch, 'save', save)


@pytest.mark.slow
def test_disk_full_mid_run_keeps_last_checkpoint_and_says_resume(data_dir, tmp_path, monkeypatch):
    _failing_save(monkeypatch, fail_on_call=2)  # epoch 2's checkpoint
    with pytest.raises(TrainError,
                       match=r'epoch 2 .*No space left.* last.pth.tar holds epoch 1: .*resume with --resume'):
        train(train_args(data_dir, tmp_path, epochs=2))
    monkeypatch.undo()
    run = tmp_path / 'run'
    assert not (run / 'tmp.pth.tar').exists()
    assert load_checkpoint_metadata(str(run / 'last.pth.tar'))['epoch'] == 0
    assert [r.split(',')[0] for r in (run / 'summary.csv').read_text().splitlines()[1:]] == ['0']  # no epoch-2 row
    with pytest.raises(TrainError, match='already holds a run; resume it with --resume'):
        train(train_args(data_dir, tmp_path, epochs=2))  # a re-run is refused and says how to resume ...
    resumed = train(train_args(data_dir, tmp_path, epochs=2, resume=str(run / 'last.pth.tar')))  # ... which works
    assert [h['epoch'] for h in resumed.history] == [0, 1]


@pytest.mark.slow
def test_disk_full_at_first_checkpoint_leaves_nothing_that_blocks_a_rerun(data_dir, tmp_path, monkeypatch):
    _failing_save(monkeypatch, fail_on_call=1)
    with pytest.raises(TrainError, match=r'no checkpoint is on disk: .*run the same command again'):
        train(train_args(data_dir, tmp_path))
    monkeypatch.undo()
    assert not (tmp_path / 'run').exists()
    assert train(train_args(data_dir, tmp_path)).history[0]['epoch'] == 0  # the same command now runs


@pytest.mark.slow
def test_run_dir_without_checkpoint_can_be_rerun(data_dir, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'summary.csv').write_text('epoch,train_loss\n0,1.0\n')  # an earlier attempt that never checkpointed
    result = train(train_args(data_dir, tmp_path))
    assert [h['epoch'] for h in result.history] == [0]


# --- the tract-* optimizer hook: validate first, convert last ------------------------------------------------------

def _resnet():
    torch.manual_seed(0)
    return timm.create_model('resnet18', num_classes=3, channels=(8, 8, 8, 8), stem_width=8)


def test_head_only_optimizer_never_makes_the_head_tract():
    model = _resnet()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith('fc.'))
    before = parameters(model)
    with pytest.raises(ValueError,
                       match=r'first layer of ResNet \(Conv2d\) is not trained by this optimizer.*Use "sgd"'):
        create_optimizer_v2(model.fc, 'tract-sgd', lr=0.1)
    with pytest.raises(ValueError, match='not trained by this optimizer'):
        create_optimizer_v2([p for p in model.parameters() if p.requires_grad], 'tract-sgd', lr=0.1)
    assert same_model(before, model) and not any(timm_tract.is_tract_layer(m) for m in model.modules())


def test_frozen_stem_inside_a_task_wrapper():
    task = ClassificationTask(_resnet(), device=torch.device('cpu'), verbose=False)
    model = task.get_trainable_module()
    model.conv1.weight.requires_grad_(False)
    before = parameters(model)
    with pytest.raises(ValueError, match='not trained by this optimizer'):
        create_optimizer_v2([p for p in task.parameters() if p.requires_grad], 'tract-adamw', lr=1e-3)
    assert same_model(before, model)


def test_parameter_subset_with_the_stem_gets_tract_on_the_stem_only():
    model = _resnet()
    opt = create_optimizer_v2([model.conv1.weight, model.fc.weight], 'tract-sgd', lr=0.1)
    assert type(model.conv1) is timm_tract.TrActConv2d and type(model.fc) is torch.nn.Linear
    assert isinstance(opt, torch.optim.SGD)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(lr=-1.0), ValueError, 'Invalid learning rate'),
    (dict(lr=0.1, tract_lambda=-0.5), ValueError, 'tract_lambda must be finite and > 0'),
    (dict(lr=0.1, tract_lambda='x'), TypeError, 'tract_lambda must be a real number'),
    (dict(lr=0.1, no_such_option=1), TypeError, 'no_such_option'),
])
def test_failed_optimizer_creation_leaves_the_model_unconverted(kwargs, error, match):
    model = _resnet()
    before = parameters(model)
    with pytest.raises(error, match=match):
        create_optimizer_v2(model, 'tract-sgd', **kwargs)
    assert same_model(before, model) and not any(timm_tract.is_tract_layer(m) for m in model.modules())


def test_malformed_published_manifest_is_skipped_not_fatal(tmp_path, caplog):
    manifest = tmp_path / 'published.json'
    manifest.write_text(json.dumps([{'model': 'resnet18_tract.ok', 'hf_hub_id': 'me/ok', 'num_classes': 3},
                                    {'model': 'resnet18.no_twin', 'hf_hub_id': 'me/x', 'num_classes': 3},
                                    'not an entry']))
    assert list(published_cfgs(manifest)) == ['resnet18_tract'] and 'skipping' in caplog.text
    manifest.write_text('{ not json')
    assert published_cfgs(manifest) == {}
    with pytest.raises(ValueError, match='not a valid published-weights manifest'):
        load_manifest(manifest)  # the strict reader (what `timm-tract publish` users check their entry with)


# --- publishing: bad input, hostile files, faults --------------------------------------------------------------------

@pytest.mark.parametrize('repo_id,match', [
    ('me/..', 'not a valid Hub repo id'), ('me/bad name', 'not a valid Hub repo id'),
    ('noslash', 'must be ORG/NAME'), ('a/b/c', 'must be ORG/NAME'), ('me/-x', 'not a valid Hub repo id'),
])
def test_publish_bad_repo_id_is_refused_before_anything(run_dir, tmp_path, repo_id, match):
    before = tree(run_dir)
    with pytest.raises(PublishError, match=match):
        publish(run_dir, repo_id, dry_run=True)
    assert tree(run_dir) == before and not (run_dir / 'hub').exists()


@pytest.mark.parametrize('options,match', [
    (dict(retries=-1), 'retries must be an integer >= 0'),
    (dict(backoff=-1.0), 'backoff must be a number of seconds >= 0'),
    (dict(label_names=['a', '']), 'label names must be non-empty'),
])
def test_publish_bad_options(options, match):
    with pytest.raises(PublishError, match=match):
        PublishOptions(**options)


def test_label_names_file_missing_or_empty(tmp_path):
    with pytest.raises(PublishError, match=r'cannot read the label names file .*one class name per line'):
        read_label_names(tmp_path / 'missing.txt')
    (tmp_path / 'empty.txt').write_text('\n \n')
    with pytest.raises(PublishError, match='is empty; give one class name per line'):
        read_label_names(tmp_path / 'empty.txt')


@pytest.mark.parametrize('args_text,match', [
    ('model: [unclosed\n', r'args.yaml is not valid YAML .*line'),
    ('- just\n- a list\n', 'is not a mapping of argument names'),
    ('epochs: 3\n', 'does not name a model'),
])
def test_publish_bad_args_yaml(run_dir, tmp_path, args_text, match):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'args.yaml').write_text(args_text)
    before = tree(tmp_path)
    with pytest.raises(PublishError, match=match) as e:
        publish(run, 'me/x', dry_run=True)
    assert isinstance(e.value, RuntimeError) and tree(tmp_path) == before  # also: no empty RUN_DIR/hub/ left


def test_publish_bad_summary_csv(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'summary.csv').write_text('epoch,train_loss,eval_top1\n0,1.0,forty\n')
    before = tree(tmp_path)
    with pytest.raises(PublishError, match=r"summary.csv line 2: 'forty' is not a number"):
        publish(run, 'me/x', dry_run=True)
    assert tree(tmp_path) == before


class _Evil:
    def __reduce__(self):
        return (os.system, ('touch /tmp/timm_tract_pwned',))


@pytest.mark.parametrize('content', ['garbage', 'pickle'])
def test_publish_never_unpickles_a_checkpoint(run_dir, tmp_path, content):
    run = copy_run(run_dir, tmp_path / 'run')
    marker = Path('/tmp/timm_tract_pwned')
    marker.unlink(missing_ok=True)
    if content == 'garbage':
        (run / 'model_best.pth.tar').write_bytes(os.urandom(256))
    else:
        torch.save({'state_dict': {}, 'payload': _Evil()}, run / 'model_best.pth.tar')
    before = tree(tmp_path)
    with pytest.raises(PublishError, match=r'cannot read checkpoint .* safely .*weights_only'):
        publish(run, 'me/x', dry_run=True)
    assert not marker.exists() and tree(tmp_path) == before


_TABLE = [{'method': 'baseline', 'epochs': 4, 'n': 1, 'mean': 40.0, 'std': 0.0},
          {'method': 'tract', 'epochs': 4, 'n': 1, 'mean': 50.0, 'std': 0.0}]


@pytest.mark.parametrize('lists_run', [False, True])
def test_publish_uses_a_compare_report_only_when_it_lists_the_run(run_dir, tmp_path, lists_run):
    """A report.json above the run with a real table: used (comparison section, plot) only when its runs name this
    run; a report of other runs is not read into the card, and its `plot` key pointing out of the tree never is."""
    secret = tmp_path / 'secret.png'
    secret.write_bytes(b'\x89PNG\r\n\x1a\n' + b'SECRET' * 10)
    cmp_dir = tmp_path / 'cmp'
    run = copy_run(run_dir, cmp_dir / 'runs' / 'tract-e4-s0')
    listed = 'elsewhere/runs/tract-e4-s0' if lists_run else 'elsewhere/runs/other'
    report = {'plot': '../secret.png', 'runs': [{'output_dir': listed}], 'seeds': [0],
              'baseline_label': 'test_resnet', 'tract_label': 'test_resnet_tract', 'table': _TABLE}
    (cmp_dir / 'report.json').write_text(json.dumps(report))
    folder = build_repo_folder(run, 'me/x', tmp_path / 'repo').folder
    card = (folder / 'README.md').read_text()
    assert ('| test_resnet_tract | 4 | 1 | 50.00 ± 0.00 |' in card) is lists_run
    assert ('Baseline comparison' in card) is lists_run and (folder / 'accuracy.png').exists() is lists_run
    assert not any(b'SECRET' in p.read_bytes() for p in folder.rglob('*') if p.is_file())


def test_publish_report_text_is_rendered_from_numbers_and_plot_must_be_png(run_dir, tmp_path):
    cmp_dir = tmp_path / 'cmp'
    run = copy_run(run_dir, cmp_dir / 'runs' / 'tract-e4-s0')
    (cmp_dir / 'compare.png').write_bytes(b'<html>not a png</html>')
    report = {
        'runs': [{'output_dir': str(run)}], 'seeds': [0, '1; rm -rf /'],
        'baseline_label': '<img src=x onerror=alert(1)>', 'tract_label': 'test_resnet_tract',
        'speedup': {'text': '**Speed-up 100x** (made up)'},
        'table': [{'method': 'baseline', 'epochs': 4, 'n': 1, 'mean': 40.0, 'std': 0.0},
                  {'method': 'tract', 'epochs': 4, 'n': 1, 'mean': 50.0, 'std': 0.0},
                  {'method': 'tract', 'epochs': '8', 'n': 1, 'mean': 'ninety', 'std': 0.0},
                  {'method': '<b>evil</b>', 'epochs': 2, 'n': 1, 'mean': 99.0, 'std': 0.0}],
    }
    (cmp_dir / 'report.json').write_text(json.dumps(report))
    folder = build_repo_folder(run, 'me/x', tmp_path / 'repo').folder
    card = (folder / 'README.md').read_text()
    assert 'Speed-up ≥ 1.00x' in card and '100x' not in card  # recomputed from the table's numbers
    assert '| test_resnet_tract | 4 | 1 | 50.00 ± 0.00 |' in card and '| baseline | 4 | 1 | 40.00 ± 0.00 |' in card
    assert 'onerror' not in card and 'ninety' not in card and 'evil' not in card and 'rm -rf' not in card
    plot = (folder / 'accuracy.png').read_bytes()  # rendered from the table's numbers, the file never copied
    assert plot.startswith(b'\x89PNG\r\n\x1a\n') and b'<html>' not in plot


def test_publish_invalid_report_json(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'report.json').write_text('{"table": [')
    before = tree(tmp_path)
    with pytest.raises(PublishError, match='is not valid JSON .*fix or remove it'):
        publish(run, 'me/x', dry_run=True)
    assert tree(tmp_path) == before


def test_publish_a_run_without_tract_leaves_no_hub_folder(tmp_path):
    plain = make_run(tmp_path / 'plain', opt='sgd', epochs=1)
    before = tree(tmp_path)
    with pytest.raises(PublishError, match=r"did not train with TrAct .*push_to_hf_hub"):
        publish(plain, 'me/x', dry_run=True)
    assert tree(tmp_path) == before and not (plain / 'hub').exists()


def test_publish_run_of_a_published_twin_tag(tmp_path, monkeypatch):
    """A run started from a published `<arch>_tract.<tag>` (its cfg is the twin's, no base tag) publishes."""
    import timm.models
    run = make_run(tmp_path / 'run', opt='tract-sgd', extra_args=dict(pretrained=True))
    args = yaml.safe_load((run / 'args.yaml').read_text())
    args['model'] = 'test_resnet_tract.tract_x'
    (run / 'args.yaml').write_text(yaml.safe_dump(args))
    real = timm.models.get_pretrained_cfg

    def cfg(name, *a, **k):
        if name == 'test_resnet_tract.tract_x':
            return timm.models.PretrainedCfg(hf_hub_id='org/test_resnet_tract.tract_x')
        if name.startswith('test_resnet.tract_x'):
            raise RuntimeError(f'Invalid pretrained tag ({name}).')
        return real(name, *a, **k)
    monkeypatch.setattr(timm.models, 'get_pretrained_cfg', cfg)
    folder = build_repo_folder(run, 'me/test_resnet_tract.again', tmp_path / 'repo').folder
    assert 'base_model: org/test_resnet_tract.tract_x' in (folder / 'README.md').read_text()


def test_lfs_upload_failures_are_retried_then_reported_with_the_stage(run_dir, hub, no_xet, monkeypatch):
    import time
    monkeypatch.setattr(time, 'sleep', lambda s: None)  # huggingface_hub's own backoff and ours, without waiting
    hub.reset()
    hub.fail_next('PUT', '/lfs-upload/', 503, count=7)  # more than huggingface_hub's own 6 tries of one upload
    result = publish(run_dir, 'me/flaky-lfs', endpoint=hub.url, token='hf_x', retries=2, backoff=0.01)
    assert result.commit_url and 'model.safetensors' in hub.files('me/flaky-lfs')
    hub.reset()
    hub.fail_next('PUT', '/lfs-upload/', 503, count=1000)
    with pytest.raises(PublishError, match=r'upload_folder \(LFS upload of model.safetensors.*failed after 2 attempts'
                                           r' \(HTTP 503\)\. Check the network'):
        publish(run_dir, 'me/dead-lfs', endpoint=hub.url, token='hf_x', retries=1, backoff=0.01)
    assert 'me/dead-lfs' not in hub.repos or not hub.files('me/dead-lfs').get('model.safetensors')
    hub.reset()
    hub.fail_next('PUT', '/lfs-upload/', 400, count=1)
    with pytest.raises(PublishError, match=r'upload_folder .* failed \(HTTP 400\)'):
        publish(run_dir, 'me/bad-lfs', endpoint=hub.url, token='hf_x', retries=3, backoff=0.01)


def test_read_run_errors_are_publish_errors(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'last.pth.tar').unlink()
    with pytest.raises(PublishError, match=r'has no last.pth.tar; available checkpoints: .*use --checkpoint'):
        read_run(run, 'last')
    assert issubclass(PublishError, TimmTractError) and issubclass(RunDirError, ValueError)


# --- the command line: one line on stderr, exit code 2, no traceback -------------------------------------------------

def cli(*argv: str, env: dict = None, cwd: Path = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != 'TIMM_TRACT_DEBUG'}, 'OMP_NUM_THREADS': '1', **(env or {})}
    return subprocess.run([TIMM_TRACT, *argv], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(cwd or REPO_ROOT))


def one_line_error(proc: subprocess.CompletedProcess, command: str, match: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f'timm-tract {command}') and 'error:' in lines[0], lines[0]
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.slow
def test_cli_user_errors_are_one_line_exit_2(data_dir, tmp_path, run_dir):
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'\xff\xfe' * 100)
    not_ours = tmp_path / 'mine'
    not_ours.mkdir()
    (not_ours / 'notes.txt').write_text('keep')
    base = ['--data-dir', str(data_dir), '--model', 'resnet10t', '--num-classes', '2', '--img-size', '16', '-b', '4',
            '-j', '0', '--epochs', '1', '--device', 'cpu', '--output', str(tmp_path / 'out')]
    cases = [
        (['train', *base, '--opt', 'tract-sgd', '--tract-lambda', '-1'], 'train', r'--tract-lambda: .*0\.1'),
        (['train', *base, '--opt', 'tract-sgd', '--opt-kwargs', 'tract_lambda=abc'], 'train', 'tract_lambda'),
        (['train', *base, '--resume', str(garbage)], 'train', 'not a readable timm checkpoint'),
        (['train', *base[:-2], '--output', str(not_ours / 'notes.txt')], 'train', 'is a file'),
        (['publish', str(run_dir), '--repo-id', 'me/..', '--dry-run'], 'publish', 'not a valid Hub repo id'),
        (['publish', str(run_dir), '--repo-id', 'me/x', '--retries', '-1'], 'publish', 'must be >= 0'),
        (['publish', str(run_dir), '--repo-id', 'me/x', '--dry-run', '--label-names', str(tmp_path / 'none.txt')],
         'publish', 'label names file'),
        (['data', '--root', str(not_ours)], 'data', 'not a timm-tract'),
        (['compare', '--budgets', '0', '--output', str(tmp_path / 'cmp')], 'compare', 'budgets'),
    ]
    before = tree(tmp_path)
    for argv, command, match in cases:
        one_line_error(cli(*argv), command, match)
    assert tree(tmp_path) == before and not (run_dir / 'hub').exists()


@pytest.mark.slow
def test_cli_debug_switch_shows_the_traceback(run_dir):
    plain = cli('publish', str(run_dir), '--repo-id', 'me/..', '--dry-run')
    debug = cli('--debug', 'publish', str(run_dir), '--repo-id', 'me/..', '--dry-run')
    env = cli('publish', str(run_dir), '--repo-id', 'me/..', '--dry-run', env={'TIMM_TRACT_DEBUG': '1'})
    assert plain.returncode == debug.returncode == env.returncode == 2
    assert 'Traceback' not in plain.stderr and 'Traceback' in debug.stderr and 'Traceback' in env.stderr
