""" Publishing, hardened: nothing reached through a link out of the run is read, copied or quoted; no local path
reaches a published file at any depth; every Hub request has a timeout and a 429's Retry-After is honoured; label
names and the data set come from what training recorded in the run; revisions, NaN metrics and unencodable label
names are handled before anything is written; evaluation results round-trip through `.eval_results/`. Real files,
real symbolic links, the loopback Hub (tests/_fake_hub.py) with the real huggingface_hub client. """
import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from timm_tract import rundir
from timm_tract.cards import public_args, training_command
from timm_tract.errors import PublishError
from timm_tract.hub import TIMEOUT_ENV, PublishOptions, build_repo_folder, publish

from _tract_runs import REPO_ROOT, checkpoint_weights, copy_run, make_run, run_python, subprocess_env

TOKEN = 'hf_hardening_token'
TIMM_TRACT = str(Path(sys.executable).parent / 'timm-tract')


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'dir')
            for p in sorted(root.rglob('*')) if not p.is_symlink() or p.exists()}


def published_text(folder: Path) -> str:
    return '\n'.join(p.read_bytes().decode('utf-8', 'replace') for p in sorted(folder.rglob('*'))
                     if p.is_file() and p.suffix != '.safetensors')


def _link_out(run: Path, name: str, outside: Path) -> Path:
    """Move `run/name` to `outside/name` and leave a symbolic link to it in the run."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / name
    shutil.move(str(run / name), str(target))
    (run / name).symlink_to(target)
    return target


def _refused_naming(e: pytest.ExceptionInfo, link: Path) -> str:
    message = str(e.value)
    assert '\n' not in message and str(link) in message and 'symbolic link' in message, message
    return message


# --- 1. links out of the run ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['summary.csv', 'args.yaml', 'model_best.pth.tar', 'data_facts.json'])
def test_a_file_linked_out_of_the_run_is_refused_naming_the_link(run_dir, tmp_path, name):
    run = copy_run(run_dir, tmp_path / 'run')
    _link_out(run, name, tmp_path / 'outside')
    before = tree(tmp_path)
    with pytest.raises(PublishError) as e:
        publish(run, 'me/x', dry_run=True)
    _refused_naming(e, run / name)
    assert tree(tmp_path) == before and not (run / 'hub').exists()


def test_summary_linked_to_etc_passwd_is_neither_published_nor_quoted(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'summary.csv').unlink()
    (run / 'summary.csv').symlink_to('/etc/passwd')
    with pytest.raises(PublishError) as e:
        build_repo_folder(run, 'me/x', tmp_path / 'repo')
    message = _refused_naming(e, run / 'summary.csv')
    assert 'root:' not in message and not (tmp_path / 'repo').exists()


def test_the_content_of_a_linked_csv_is_never_quoted(run_dir, tmp_path):
    """Before: a link to a CSV with a bad value had that value quoted in the error line."""
    run = copy_run(run_dir, tmp_path / 'run')
    target = _link_out(run, 'summary.csv', tmp_path / 'private')
    target.write_text('epoch,train_loss,eval_top1\n0,1.0,SECRET-SALARY-123\n')
    with pytest.raises(PublishError) as e:
        publish(run, 'me/x', dry_run=True)
    assert 'SECRET' not in str(e.value)
    _refused_naming(e, run / 'summary.csv')


def test_a_folder_linked_out_of_the_run_is_refused(run_dir, tmp_path):
    """`--checkpoint ckpts/best.pth.tar` where the run's ckpts/ is a link to a folder elsewhere."""
    run = copy_run(run_dir, tmp_path / 'run')
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    shutil.copyfile(run / 'model_best.pth.tar', elsewhere / 'best.pth.tar')
    (run / 'ckpts').symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(PublishError) as e:
        build_repo_folder(run, 'me/x', tmp_path / 'repo', checkpoint='ckpts/best.pth.tar')
    _refused_naming(e, run / 'ckpts')


def test_a_hub_folder_linked_out_of_the_run_is_not_written_through(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (tmp_path / 'victim').mkdir()
    (run / 'hub').symlink_to(tmp_path / 'victim', target_is_directory=True)
    with pytest.raises(PublishError) as e:
        publish(run, 'me/x', dry_run=True)
    _refused_naming(e, run / 'hub')
    assert list((tmp_path / 'victim').iterdir()) == []


def test_a_compare_report_linked_out_of_its_directory_is_refused(run_dir, tmp_path):
    cmp_dir = tmp_path / 'cmp'
    run = copy_run(run_dir, cmp_dir / 'runs' / 'tract-e4-s0')
    report = {'runs': [{'output_dir': str(run)}], 'table': [
        {'method': 'baseline', 'epochs': 4, 'n': 1, 'mean': 40.0, 'std': 0.0},
        {'method': 'tract', 'epochs': 4, 'n': 1, 'mean': 50.0, 'std': 0.0}]}
    (tmp_path / 'report.json').write_text(json.dumps(report))
    (cmp_dir / 'report.json').symlink_to(tmp_path / 'report.json')
    with pytest.raises(PublishError) as e:
        build_repo_folder(run, 'me/x', tmp_path / 'repo')
    _refused_naming(e, cmp_dir / 'report.json')


def test_links_inside_the_run_and_a_linked_run_directory_publish(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'model_best.pth.tar').unlink()
    (run / 'model_best.pth.tar').symlink_to('checkpoint-1.pth.tar')  # relative, inside the run
    (tmp_path / 'alias').symlink_to(run, target_is_directory=True)
    folder = build_repo_folder(tmp_path / 'alias', 'me/x', tmp_path / 'repo').folder
    from safetensors.torch import load_file
    weights = load_file(str(folder / 'model.safetensors'))
    expected = checkpoint_weights(run, 'checkpoint-1.pth.tar')
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


# --- 2. local paths at every depth, public names in text and pictures ---------------------------------------------

LOCAL = '/home/u/private'


def test_nested_paths_are_scrubbed_in_command_hparams_and_config(tmp_path):
    overlay = {'file': f'{LOCAL}/w.safetensors'}
    run = make_run(tmp_path / 'run', epochs=1, model_kwargs={'pretrained_cfg_overlay': overlay}, extra_args=dict(
        tract_lambda=0.1, opt_kwargs={'extra': [f'{LOCAL}/a.txt', {'deep': ['~/b.txt', 'keep/me']}]}))
    folder = build_repo_folder(run, 'me/test_resnet_tract.scrub', tmp_path / 'repo').folder
    text = published_text(folder)
    assert LOCAL not in text and '~/b.txt' not in text and str(tmp_path) not in text
    hparams = yaml.safe_load((folder / 'train_hparams.yaml').read_text())
    assert hparams['model_kwargs'] == {'pretrained_cfg_overlay': {'file': '<PATH>'}}
    assert hparams['opt_kwargs'] == {'extra': ['<PATH>', {'deep': ['<PATH>', 'keep/me']}]}
    readme = (folder / 'README.md').read_text()
    command = re.search(r'```bash\n(.*?)```', readme, re.S).group(1)
    assert "pretrained_cfg_overlay={'file': '<PATH>'}" in shlex.split(command.replace('\\\n', ' '))
    cfg = json.loads((folder / 'config.json').read_text())
    assert 'pretrained_cfg_overlay' not in cfg.get('model_args', {})  # where weights were, not what the model is


def test_public_args_keep_names_urls_and_placeholders():
    args = {'dataset': 'torch/cifar10', 'model': 'hf-hub:timm/resnet18.a1_in1k', 'data_dir': '/data/x',
            'model_kwargs': {'url': 'https://huggingface.co/timm/x', 'rel': './w.pth', 'mixed': f'file={LOCAL}/w'},
            'resume': '', 'initial_checkpoint': 'local-dir:/m', 'list': ['a/b', '../up', 'C:\\Users\\u']}
    public = public_args(args)
    assert public['dataset'] == 'torch/cifar10' and public['model'] == 'hf-hub:timm/resnet18.a1_in1k'
    assert public['data_dir'] == '<DATA_DIR>' and public['initial_checkpoint'] == '<CHECKPOINT>'
    assert public['model_kwargs'] == {'url': 'https://huggingface.co/timm/x', 'rel': '<PATH>', 'mixed': 'file=<PATH>'}
    assert public['list'] == ['a/b', '<PATH>', '<PATH>']
    assert LOCAL not in training_command(dict(args, tract_lambda=0.1))


def test_compare_data_label_is_a_public_name(tmp_path, image_folder):
    from timm_tract.compare.run import _resolve_data
    data = image_folder(tmp_path / 'secret_home' / 'my_photos', 2, 1)
    ns = argparse.Namespace(data_dir=str(data), dataset='', train_split='train', num_classes=None)
    label = _resolve_data(ns)
    assert label == 'my_photos' and str(tmp_path) not in label and ns.num_classes == 2
    ns = argparse.Namespace(data_dir=str(data), dataset='torch/cifar10', train_split='train', num_classes=10)
    assert _resolve_data(ns) == 'CIFAR-10'


def test_published_plot_and_card_are_rendered_from_public_names_only(run_dir, tmp_path, monkeypatch):
    """An old report whose data label is the raw --data-dir and whose label is a local model path: the published plot
    is rendered with the card's public names; its compare.png (with the path in its title) is never copied."""
    import timm_tract.compare.report as report_module
    cmp_dir = tmp_path / 'cmp'
    run = copy_run(run_dir, cmp_dir / 'runs' / 'tract-e4-s0')
    report = {'runs': [{'output_dir': str(run)}], 'data': f'{LOCAL}/data', 'seeds': [0],
              'baseline_label': f'local-dir:{LOCAL}/m', 'tract_label': f'{LOCAL}/twin',
              'table': [{'method': 'baseline', 'epochs': 4, 'n': 1, 'mean': 40.0, 'std': 0.0},
                        {'method': 'tract', 'epochs': 4, 'n': 1, 'mean': 50.0, 'std': 0.0}],
              'curves': [{'method': 'tract', 'epochs': 4, 'mean': [30., 40., 45., 50.], 'std': [0., 0., 0., 0.]},
                         {'method': 'baseline', 'epochs': 4, 'mean': ['x'], 'std': [0.]}]}
    (cmp_dir / 'report.json').write_text(json.dumps(report))
    (cmp_dir / 'compare.png').write_bytes(b'\x89PNG\r\n\x1a\n' + LOCAL.encode() * 10)
    drawn = []
    real = report_module.plot_report
    monkeypatch.setattr(report_module, 'plot_report', lambda r, path: (drawn.append(r), real(r, path)))
    folder = build_repo_folder(run, 'me/x', tmp_path / 'repo').folder
    (plotted,) = drawn
    assert LOCAL not in json.dumps(plotted) and plotted['data'] == 'data'  # the run's data folder name
    assert plotted['baseline_label'] == 'baseline' and plotted['tract_label'] == 'TrAct'
    assert [c['method'] for c in plotted['curves']] == ['tract']  # the malformed curve is left out
    assert LOCAL.encode() not in (folder / 'accuracy.png').read_bytes()
    assert LOCAL not in published_text(folder)


# --- 3. timeouts and Retry-After --------------------------------------------------------------------------------------

def test_a_hub_that_never_answers_fails_the_stage_with_retries_0(run_dir, hub, no_xet):
    from huggingface_hub.utils import _http
    factory = _http._GLOBAL_CLIENT_FACTORY
    hub.reset()
    hub.hang_next('POST', '/api/repos/create')
    start = time.monotonic()
    with pytest.raises(PublishError, match=r'^create_repo failed after 1 attempts \(\w*Timeout') as e:
        publish(run_dir, 'me/hang', endpoint=hub.url, token=TOKEN, retries=0, timeout=0.5)
    assert time.monotonic() - start < 30 and '\n' not in str(e.value)
    assert ('POST', '/api/repos/create', 0) in hub.requests  # it was accepted, and never answered
    assert _http._GLOBAL_CLIENT_FACTORY is factory  # huggingface_hub's client factory is restored


def test_a_hanging_commit_is_retried_then_reported(run_dir, hub, no_xet):
    hub.reset()
    hub.hang_next('POST', '/commit/', count=2)
    with pytest.raises(PublishError, match=r'^upload_folder .* failed after 2 attempts \(\w*Timeout'):
        publish(run_dir, 'me/hang-commit', endpoint=hub.url, token=TOKEN, retries=1, backoff=0.01, timeout=0.5)
    hub.hang_next('POST', '/commit/', count=1)
    publish(run_dir, 'me/hang-once', endpoint=hub.url, token=TOKEN, retries=1, backoff=0.01, timeout=0.5)
    assert 'model.safetensors' in hub.files('me/hang-once')


def test_429_retry_after_is_honoured(run_dir, hub, no_xet, monkeypatch, caplog):
    waits = []
    monkeypatch.setattr(time, 'sleep', waits.append)
    hub.reset()
    hub.fail_next('POST', '/api/repos/create', 429, headers={'Retry-After': '7'})
    publish(run_dir, 'me/limited', endpoint=hub.url, token=TOKEN, retries=2, backoff=0.01)
    assert waits == [7.0] and 'retrying in 7.0s (Retry-After)' in caplog.text
    assert 'model.safetensors' in hub.files('me/limited')
    hub.fail_next('POST', '/api/repos/create', 429, headers={'Retry-After': '86400'})
    with pytest.raises(PublishError, match=r'HTTP 429.*asks to wait 86400 s \(Retry-After\); run the command again'):
        publish(run_dir, 'me/limited2', endpoint=hub.url, token=TOKEN, retries=2, backoff=0.01)
    assert waits == [7.0]


def test_timeout_option_and_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, '0.25')
    assert PublishOptions().timeout == 0.25
    monkeypatch.setenv(TIMEOUT_ENV, 'soon')
    with pytest.raises(PublishError, match=f'{TIMEOUT_ENV}=.soon. is not a number of seconds'):
        PublishOptions()
    monkeypatch.delenv(TIMEOUT_ENV)
    assert PublishOptions().timeout == 60.0
    for bad in (0, -1, float('inf'), 'x'):
        with pytest.raises(PublishError, match='timeout must be a number of seconds > 0'):
            PublishOptions(timeout=bad)


# --- 4. publishing reads only the run: data facts recorded at training time -------------------------------------------

_WATCHED = []  # (event, path) while a test records; one audit hook per process (hooks cannot be removed)
_HOOKED = []


def _audit(event, args):
    if _WATCHED and event in ('open', 'os.listdir', 'os.scandir') and args and isinstance(args[0], (str, Path)):
        _WATCHED.append((event, str(args[0])))


def _watch_file_access() -> None:
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(True)
    _WATCHED[:] = [('start', '')]


def test_train_records_data_facts_and_publish_reads_nothing_outside_the_run(tmp_path, image_folder):
    from timm_tract.flags import build_train_parser
    from timm_tract.train import train
    data = image_folder(tmp_path / 'data', 4, 2)
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('class1\nclass0\n')  # index order differs from the folder order
    args = build_train_parser().parse_args([
        '--data-dir', str(data), '--model', 'resnet10t', '--num-classes', '2', '--img-size', '16', '-b', '4', '-j', '0',
        '--epochs', '1', '--opt', 'tract-sgd', '--lr', '0.05', '--warmup-epochs', '0', '--no-aug', '--device', 'cpu',
        '--class-map', str(class_map), '--output', str(tmp_path / 'out'), '--experiment', 'run'])
    run = Path(train(args).output_dir)
    assert rundir.read_data_facts(run) == rundir.DataFacts(label_names=('class1', 'class0'))
    _watch_file_access()
    try:
        folder = build_repo_folder(run, 'me/resnet10t_tract.facts', tmp_path / 'repo').folder
    finally:
        seen, _WATCHED[:] = list(_WATCHED[1:]), []
    assert json.loads((folder / 'config.json').read_text())['label_names'] == ['class1', 'class0']
    outside = [(e, p) for e, p in seen if Path(p).is_absolute() and str(tmp_path) in str(Path(p).resolve())
               and not any(Path(p).resolve().is_relative_to(d) for d in (run.resolve(), (tmp_path / 'repo').parent))]
    assert seen and [p for p in seen if str(data) in p[1] or str(class_map) in p[1]] == [] and outside == []


def test_a_run_without_data_facts_publishes_without_label_names_and_says_so(tmp_path, caplog):
    run = make_run(tmp_path / 'old', epochs=1, data_facts=False)
    folder = build_repo_folder(run, 'me/x', tmp_path / 'repo').folder
    assert 'label_names' not in json.loads((folder / 'config.json').read_text())
    assert 'has no data_facts.json' in caplog.text and '--label-names FILE' in caplog.text
    given = build_repo_folder(run, 'me/x', tmp_path / 'repo2', label_names=['a', 'b', 'c']).folder
    assert json.loads((given / 'config.json').read_text())['label_names'] == ['a', 'b', 'c']


def test_the_recorded_data_set_names_the_card_without_reading_the_data(tmp_path):
    run = make_run(tmp_path / 'fm', epochs=1)
    shutil.rmtree(run / 'data')  # the data folder is gone: nothing of it is needed
    rundir.write_data_facts(run, ['cat', 'dog', 'fish'], {'name': 'Fashion-MNIST', 'hub_id': 'zalando-datasets/'
                            'fashion_mnist', 'subset': {'train': 'first 100', 'validation': 'next 50'}})
    readme = (build_repo_folder(run, 'me/x', tmp_path / 'repo').folder / 'README.md').read_text()
    assert 'trained on Fashion-MNIST (a development split of its training set)' in readme
    assert 'zalando-datasets/fashion_mnist' in readme and 'train (held-out part)' in readme


def test_damaged_data_facts_are_one_line_errors(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    for text, match in (('{not json', 'is not valid JSON'), ('{"label_names": [1, 2]}', 'not a timm-tract data facts'),
                        ('{"label_names": null, "dataset": {"name": 5}}', 'dataset.name must be a string')):
        (run / 'data_facts.json').write_text(text)
        with pytest.raises(PublishError, match=match):
            build_repo_folder(run, 'me/x', tmp_path / 'repo')
    assert not (tmp_path / 'repo').exists()


# --- 5. revision, load line, NaN, unencodable names -------------------------------------------------------------------

@pytest.mark.parametrize('revision', ['bad name', '..', 'a..b', '-x', 'x.lock', 'a:b', '', 'a//b', 'end/', 'x\x01'])
def test_a_bad_revision_is_refused_before_anything(run_dir, hub, revision):
    n = len(hub.requests)
    with pytest.raises(PublishError, match='is not a valid branch name'):
        publish(run_dir, 'me/x', endpoint=hub.url, token=TOKEN, revision=revision)
    assert len(hub.requests) == n and not (run_dir / 'hub').exists()


@pytest.mark.parametrize('revision', ['dev', 'v1.0', 'feature/x', 'refs/pr/1', 'a-b_c'])
def test_good_revisions_pass(revision):
    assert PublishOptions(revision=revision).revision == revision


def test_load_name_includes_the_revision(run_dir, hub, no_xet, tmp_path):
    hub.reset()
    repo = 'me/test_resnet_tract.rev'
    main = publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0)
    dev = publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, revision='dev')
    pr = publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, create_pr=True)
    dry = publish(run_dir, repo, output_dir=tmp_path / 'dry')
    assert (main.load_name, dev.load_name, pr.load_name) == (
        f'hf-hub:{repo}', f'hf-hub:{repo}@dev', f'hf-hub:{repo}@refs/pr/1')
    assert dev.revision == 'dev' and pr.revision == 'refs/pr/1' and dry.load_name == f'local-dir:{tmp_path / "dry"}'
    # the card's snippets load what its branch holds; a pull request's card names main (what it becomes once merged)
    cards = {rev: hub.files(repo, rev)['README.md'].decode() for rev in ('main', 'dev', 'refs/pr/1')}
    assert f"'hf-hub:{repo}@dev'" in cards['dev'] and f"hf_hub_id='{repo}@dev'" in cards['dev']
    assert f"'hf-hub:{repo}'" not in cards['dev']
    for rev in ('main', 'refs/pr/1'):
        assert f"'hf-hub:{repo}'" in cards[rev] and f'{repo}@' not in cards[rev]


@pytest.mark.slow
def test_the_load_names_load_with_timm(run_dir, hub, no_xet, tmp_path):
    """timm's `hf-hub:ORG/NAME@REVISION`: the printed names load, from the branch and from the pull request."""
    hub.reset()
    repo = 'me/test_resnet_tract.revload'
    names = [publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, revision='dev').load_name,
             publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, create_pr=True).load_name]
    assert 'main' in hub.repos[repo].refs and sorted(hub.files(repo)) == ['.gitattributes']  # only on dev and the PR
    proc = run_python(f'''
        import timm
        for name in {names!r}:
            model = timm.create_model(name, pretrained=True)
            print('LOADED', name, model.num_classes)
    ''', subprocess_env(hub.url, tmp_path / 'hf_home'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split('\n')[-3:-1] == [f'LOADED {n} 3' for n in names]


def test_nan_metrics_are_never_published(tmp_path):
    run = make_run(tmp_path / 'nan', epochs=2, extra_args=dict(dataset='torch/cifar10'), num_classes=10)
    summary = (run / 'summary.csv').read_text().splitlines()
    fields = summary[-1].split(',')
    fields[3:5] = ['nan', 'nan']  # eval_top1, eval_top5 of the last (= best) epoch
    (run / 'summary.csv').write_text('\n'.join(summary[:-1] + [','.join(fields)]) + '\n')
    folder = build_repo_folder(run, 'me/x', tmp_path / 'repo').folder
    readme = (folder / 'README.md').read_text()
    front = yaml.safe_load(re.match(r'---\n(.*?)\n---\n', readme, re.S).group(1))
    assert '.nan' not in readme and 'model-index' not in front
    assert 'recorded no validation accuracy' in readme and not (folder / '.eval_results').exists()


def test_unencodable_label_names_are_refused_before_writing(run_dir, tmp_path):
    with pytest.raises(PublishError, match=r"label name 1 of the given label names \('b\\udcff'\) is not valid"):
        PublishOptions(label_names=['a', 'b\udcff', 'c'])
    run = copy_run(run_dir, tmp_path / 'run')
    rundir.write_data_facts(run, ['cat', 'd\udcffg', 'fish'])  # a class folder whose name is not UTF-8
    with pytest.raises(PublishError, match=r'label name 1 of .*data_facts.json .*--label-names FILE'):
        build_repo_folder(run, 'me/x', tmp_path / 'repo')
    assert not (tmp_path / 'repo').exists()
    folder = build_repo_folder(run, 'me/x', tmp_path / 'repo', label_names=['cat', 'dog', 'fish']).folder
    assert json.loads((folder / 'config.json').read_text())['label_names'] == ['cat', 'dog', 'fish']


# --- 6. .eval_results round trip --------------------------------------------------------------------------------

def test_eval_results_round_trip_on_the_hub(tmp_path, hub, no_xet):
    from huggingface_hub import ModelCard, hf_hub_download, parse_eval_result_entries
    from huggingface_hub.constants import EVAL_RESULTS_FOLDER
    run = make_run(tmp_path / 'c10', num_classes=10, epochs=2, extra_args=dict(dataset='torch/cifar10'))
    repo = 'me/test_resnet_tract.evals'
    publish(run, repo, endpoint=hub.url, token=TOKEN, retries=0)
    path = f'{EVAL_RESULTS_FOLDER}/cifar10.yaml'
    assert path in hub.files(repo)
    local = hf_hub_download(repo, path, endpoint=hub.url, cache_dir=str(tmp_path / 'cache'))
    (entry,) = parse_eval_result_entries(yaml.safe_load(Path(local).read_text()))
    assert (entry.dataset_id, entry.task_id, entry.value) == ('uoft-cs/cifar10', 'default', 50.0)  # last epoch top-1
    assert 'top-1 accuracy (%) on the test split' in entry.notes
    card = ModelCard(hub.files(repo)['README.md'].decode())
    (top1, _) = card.data.eval_results
    assert (top1.dataset_type, top1.metric_type, top1.metric_value) == ('uoft-cs/cifar10', 'accuracy', 50.0)


# --- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_refusals_are_one_line_exit_2(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / 'run')
    (run / 'summary.csv').unlink()
    (run / 'summary.csv').symlink_to('/etc/passwd')
    env = {**{k: v for k, v in os.environ.items() if k != 'TIMM_TRACT_DEBUG'}, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': str(REPO_ROOT)}
    for argv, match in (([str(run), '--repo-id', 'me/x', '--dry-run'], 'summary.csv is a symbolic link'),
                        ([str(run_dir), '--repo-id', 'me/x', '--revision', 'bad name'], 'not a valid branch name')):
        proc = subprocess.run([TIMM_TRACT, 'publish', *argv], capture_output=True, text=True, timeout=120, env=env,
                              cwd=str(REPO_ROOT))
        errors = [line for line in proc.stderr.splitlines() if 'error:' in line]  # besides the progress log
        assert proc.returncode == 2 and len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
        assert errors[0] == proc.stderr.strip().splitlines()[-1] and errors[0].startswith('timm-tract publish: error:')
        assert match in errors[0] and 'root:' not in proc.stderr
