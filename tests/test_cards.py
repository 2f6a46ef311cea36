""" Model cards: front matter parses and states the run, stats are computed, the training command reproduces the
args, the compare report appears, and every usage snippet runs against the published repository. """
import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch.nn as nn
import timm
import yaml
from huggingface_hub import ModelCard

from timm_tract.cards import model_stats, training_command
from timm_tract.hub import build_repo_folder, publish
from timm_tract.flags import build_train_parser

from _tract_runs import IMG, make_run, run_python, subprocess_env


def front_matter(readme: str) -> dict:
    m = re.match(r'---\n(.*?)\n---\n', readme, re.S)
    assert m, 'no YAML front matter'
    return yaml.safe_load(m.group(1))


def python_blocks(readme: str) -> list:
    return re.findall(r'```python\n(.*?)```', readme, re.S)


@pytest.fixture(scope='module')
def cifar_run(tmp_path_factory) -> Path:
    """A fine-tuning run from timm's Hub weights on a known Hub data set (10 classes: CIFAR-10 names)."""
    return make_run(tmp_path_factory.mktemp('cards') / 'cifar', num_classes=10,
                    model_name='test_resnet_tract.r160_in1k', opt='sgd',
                    extra_args=dict(dataset='torch/cifar10', pretrained=True, tract_lambda=0.2))


def test_front_matter_model_index_and_stats(cifar_run, tmp_path):
    folder = build_repo_folder(cifar_run, 'me/test_resnet_tract.c10', tmp_path / 'repo').folder
    readme = (folder / 'README.md').read_text()
    meta = front_matter(readme)
    card = ModelCard(readme)  # huggingface_hub's own parser accepts it
    assert card.data.library_name == 'timm' == meta['library_name']
    assert {'image-classification', 'timm', 'tract'} <= set(meta['tags'])
    assert meta['license'] == 'apache-2.0'
    assert meta['datasets'] == ['uoft-cs/cifar10']
    assert meta['base_model'] == timm.models.get_pretrained_cfg('test_resnet.r160_in1k').hf_hub_id

    with open(cifar_run / 'summary.csv') as f:
        best = list(csv.DictReader(f))[-1]  # model_best = last epoch here
    (result,) = meta['model-index'][0]['results']
    # timm: torch/* data sets evaluate on the test split
    assert result['dataset'] == dict(result['dataset'], type='uoft-cs/cifar10', split='test')
    metrics = {m['type']: m['value'] for m in result['metrics']}
    assert metrics == {'accuracy': float(best['eval_top1']), 'top_5_accuracy': float(best['eval_top5'])}

    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['label_names'][:2] == ['airplane', 'automobile'] and len(cfg['label_names']) == 10
    assert cfg['tract']['lambda'] == 0.2 and 'λ = 0.2' in readme

    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    stats = model_stats(model, (3, IMG, IMG))
    for label, key in (('Params (M)', 'params_m'), ('GMACs', 'gmacs'), ('Activations (M)', 'activations_m')):
        assert f'{label}: {stats[key]}' in readme
    assert f'Image size: {IMG} x {IMG}' in readme
    assert '@inproceedings{petersen2024tract' in readme and '@misc{rw2019timm' in readme


def test_relative_lambda_mode_is_published(tmp_path):
    """A run with --tract-lambda-mode relative: config.json's tract block, the card's formula and its continue-training
    snippet all say so (an absolute run's card keeps the paper's formula, tested above)."""
    run = make_run(tmp_path / 'rel', epochs=1, extra_args=dict(tract_lambda=0.1, tract_lambda_mode='relative'))
    folder = build_repo_folder(run, 'me/test_resnet_tract.rel', tmp_path / 'repo').folder
    readme = (folder / 'README.md').read_text()
    assert json.loads((folder / 'config.json').read_text())['tract']['lambda_mode'] == 'relative'
    assert 'XᵀX / N + λ·s I' in readme and 'relative λ mode' in readme
    assert "tract_lambda_mode='relative'" in python_blocks(readme)[-1]


def test_model_stats_are_computed():
    """MACs and activations against the closed form for a conv + linear net, and timm's published resnet50 card."""
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10))
    h = w = 224
    macs = h * w * 64 * 3 * 3 * 3 + 64 * 10
    params = 64 * 27 + 64 + 640 + 10
    stats = model_stats(net, (3, h, w))
    assert stats == pytest.approx({'params_m': params / 1e6, 'gmacs': macs / 1e9,
                                   'activations_m': (64 * h * w + 10) / 1e6}, rel=5e-3)
    # timm's card for resnet50.a1_in1k states 25.6 M params, 4.1 GMACs, 11.1 M activations at 224 x 224
    r50 = model_stats(timm.create_model('resnet50', device='meta'), (3, 224, 224))
    assert (round(r50['params_m'], 1), round(r50['gmacs'], 1), round(r50['activations_m'], 1)) == (25.6, 4.1, 11.1)


def test_training_command_reproduces_the_args(cifar_run):
    args = yaml.safe_load((cifar_run / 'args.yaml').read_text())
    cmd = training_command(args)
    argv = shlex.split(cmd.replace('\\\n', ' '))
    assert argv[:2] == ['timm-tract', 'train'] and argv[2:4] == ['--model', 'test_resnet_tract.r160_in1k']
    parsed = vars(build_train_parser().parse_args(argv[2:]))
    assert parsed['data_dir'] == '<DATA_DIR>' and args['data_dir'] not in cmd  # no local path in a published file
    for key in parsed:
        if key in args and key not in ('output', 'experiment', 'data_dir'):
            assert parsed[key] == args[key] or list(parsed[key]) == list(args[key]), key
    # a timm train.py run (no tract_lambda): train.py with its own flags, plugin import included
    train_py = dict(args, device_modules=['timm_tract'], opt='tract-sgd', bce_loss=True)
    del train_py['tract_lambda']
    cmd = training_command(train_py)
    assert cmd.startswith('python train.py') and '--device-modules timm_tract' in cmd and '--bce-loss' in cmd


def test_comparison_report_in_card(tmp_path):
    from timm_tract.compare import build_report, write_report

    cmp_dir = tmp_path / 'cmp'
    run = make_run(cmp_dir / 'runs' / 'tract-e4-s0', epochs=1)
    history = lambda *acc: [{'epoch': i, 'eval_top1': a} for i, a in enumerate(acc)]  # noqa: E731
    runs = [dict(method=m, epochs=e, seed=s, history=history(*h)) for s in (0, 1) for m, e, h in (
        ('baseline', 2, (30., 40.)), ('baseline', 4, (30., 40., 50., 60.)),
        ('tract', 2, (45., 60.)), ('tract', 4, (45., 60., 65., 70.)))]
    report = build_report(runs, baseline_label='test_resnet', tract_label='test_resnet_tract', data='embedded',
                          recipe='sgd', seeds=[0, 1], wall_clock_s=10.0, publish_dir=str(run))
    write_report(report, str(cmp_dir))
    folder = build_repo_folder(run, 'me/test_resnet_tract.cmp', tmp_path / 'repo').folder
    readme = (folder / 'README.md').read_text()
    assert report['speedup']['text'] in readme and report['speedup']['factor'] == 2.0
    assert '| test_resnet_tract | 2 | 2 | 60.00 ± 0.00 |' in readme
    # the plot is re-rendered from the report's numbers with the card's public data set name (the run's data
    # folder is named 'data'), not copied: the same picture as compare's own plot with that title
    from timm_tract.compare import plot_report
    plot_report(dict(report, data='data'), str(tmp_path / 'expected.png'))
    assert (folder / 'accuracy.png').read_bytes() == (tmp_path / 'expected.png').read_bytes()
    assert (folder / 'accuracy.png').read_bytes() != (cmp_dir / 'compare.png').read_bytes()  # title 'embedded'
    assert '](accuracy.png)' in readme


@pytest.mark.slow
def test_every_card_snippet_runs_against_the_published_repo(tmp_path, hub, no_xet):
    run = make_run(tmp_path / 'run', epochs=1)
    repo = 'me/test_resnet_tract.snippets'
    publish(run, repo, endpoint=hub.url, token='hf_x', retries=0)
    readme = hub.files(repo)['README.md'].decode()
    blocks = python_blocks(readme)
    assert len(blocks) == 4 and "timm.create_model('hf-hub:me/test_resnet_tract.snippets'" in blocks[0]
    script = tmp_path / 'snippets.json'
    script.write_text(json.dumps(blocks))
    proc = run_python(f'''
        import json
        for i, block in enumerate(json.load(open({str(script)!r}))):
            exec(compile(block, f'snippet{{i}}', 'exec'), {{'__name__': '__main__'}})
            print(f'SNIPPET {{i}} OK', flush=True)
    ''', subprocess_env(hub.url, tmp_path / 'hf_home'), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith('SNIPPET')] == [
        f'SNIPPET {i} OK' for i in range(4)]
    assert re.search(r'^(cat|dog|fish): \d+\.\d%$', proc.stdout, re.M)  # classification printed a label
    assert 'loss ' in proc.stdout


def test_published_files_hold_no_local_paths_user_or_host(tmp_path):
    """Paths become placeholders (`--data-dir <DATA_DIR>`); no home directory, user or host name is published."""
    import getpass
    import os
    import socket
    run = make_run(tmp_path / 'run', epochs=1, extra_args=dict(class_map='', initial_checkpoint='',
                                                               resume=str(tmp_path / 'run' / 'last.pth.tar')))
    folder = build_repo_folder(run, 'me/test_resnet_tract.private', tmp_path / 'repo').folder
    text = {p.name: p.read_bytes().decode('utf-8', 'replace') for p in folder.iterdir() if p.suffix != '.safetensors'}
    local = [str(tmp_path), str(tmp_path.resolve()), os.path.expanduser('~') + '/', f'/{getpass.getuser()}/']
    local += [socket.gethostname()] if len(socket.gethostname()) >= 4 else []
    for name, content in text.items():
        for item in local:
            assert item not in content, (name, item)
    assert '--data-dir <DATA_DIR>' in text['README.md']
    assert yaml.safe_load(text['train_hparams.yaml'])['data_dir'] == '<DATA_DIR>'


def test_grayscale_fashion_mnist_card(tmp_path):
    """A 1-channel torch/fashion_mnist run: grayscale snippets, the official test split, Fashion-MNIST's names."""
    import torchvision
    run = make_run(tmp_path / 'fm', num_classes=10, model_kwargs={'in_chans': 1}, in_chans=1, extra_args=dict(
        dataset='torch/fashion_mnist', in_chans=1, input_size=[1, IMG, IMG], mean=[0.286], std=[0.353]))
    folder = build_repo_folder(run, 'me/test_resnet_tract.fm', tmp_path / 'repo').folder
    readme = (folder / 'README.md').read_text()
    meta = front_matter(readme)
    assert meta['datasets'] == ['zalando-datasets/fashion_mnist']
    assert meta['model-index'][0]['results'][0]['dataset']['split'] == 'test'
    blocks = python_blocks(readme)
    assert "Image.new('L'" in blocks[0] and "Image.new('RGB'" not in blocks[0]
    assert all('torch.randn(1, 3,' not in b and 'torch.randn(8, 3,' not in b for b in blocks)
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['label_names'] == list(torchvision.datasets.FashionMNIST.classes)
    assert cfg['pretrained_cfg']['input_size'] == [1, IMG, IMG]
