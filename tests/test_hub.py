""" `timm-tract publish`: repository folder, upload to a Hub-compatible server on 127.0.0.1, loading back.

The fake Hub (tests/_fake_hub.py) drives the real huggingface_hub client (HF_HUB_DISABLE_XET=1: legacy LFS);
loads run in fresh subprocesses with HF_ENDPOINT pointing at it, as plain timm users would load the weights.
"""
import json
import re
import subprocess
import sys

import pytest
import torch
import timm
import yaml
from safetensors.torch import load_file

import timm_tract  # noqa: F401  (registers the *_tract twins)
from timm_tract.errors import PublishError
from timm_tract.hub import build_repo_folder, publish, read_run
from timm_tract.published import load_manifest, published_cfgs

from _tract_runs import (IMG, REPO_ROOT, checkpoint_weights, fixed_input, free_port, make_run, reference_logits,
                         run_python, subprocess_env)

TOKEN = 'hf_TestTokenDoNotLeak0123456789'



pytestmark = pytest.mark.usefixtures('no_xet')


# ----------------------------------------------------------------------------------------------- the folder
def test_dry_run_folder(run_dir, tmp_path):
    out = tmp_path / 'repo'
    result = publish(run_dir, 'me/test_resnet_tract.unit', dry_run=True, output_dir=out)
    assert result.folder == out
    assert sorted(p.name for p in out.iterdir()) == [
        'README.md', 'config.json', 'model.safetensors', 'results.csv', 'train_hparams.yaml']

    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'test_resnet'  # the base arch: plain timm loads it
    assert cfg['num_classes'] == 3
    assert cfg['label_names'] == ['cat', 'dog', 'fish']
    pcfg = cfg['pretrained_cfg']
    assert pcfg['input_size'] == [3, IMG, IMG] and len(pcfg['mean']) == 3 and len(pcfg['std']) == 3
    assert {'crop_pct', 'interpolation'} <= set(pcfg) and pcfg['tag'] == 'unit'
    assert pcfg['paper_ids'] == 'arXiv:2410.23970'
    assert cfg['tract'] == dict(cfg['tract'], used=True, **{'lambda': 0.1}, layer='conv1.0',
                                arch='test_resnet_tract', applied_via='optimizer', optimizer='tract-sgd')

    # weights: exactly the best checkpoint's state_dict, no optimizer state, no pickle
    sd = checkpoint_weights(run_dir)
    published = load_file(str(out / 'model.safetensors'))
    assert published.keys() == sd.keys()
    assert all(torch.equal(published[k], sd[k]) for k in sd)
    hparams, args = (yaml.safe_load((f).read_text()) for f in (out / 'train_hparams.yaml', run_dir / 'args.yaml'))
    assert hparams == dict(args, data_dir='<DATA_DIR>', output='<OUTPUT_DIR>')  # the recipe, no local paths
    assert (out / 'results.csv').read_text() == (run_dir / 'summary.csv').read_text()
    assert result.manifest_entry['model'] == 'test_resnet_tract.unit'
    assert result.manifest_entry['hf_hub_id'] == 'me/test_resnet_tract.unit'


def test_local_dir_loads_bit_identical(run_dir, tmp_path):
    out = build_repo_folder(run_dir, 'me/test_resnet_tract.local', tmp_path / 'repo').folder
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert type(model).__name__ == 'ResNet' and model.num_classes == 3
    with torch.no_grad():
        assert torch.equal(model(fixed_input()), reference_logits('test_resnet', checkpoint_weights(run_dir), 3))


def test_checkpoint_choice_and_ema(tmp_path):
    run = make_run(tmp_path / 'ema', ema=True, epochs=2)
    ema = build_repo_folder(run, 'me/a.b', tmp_path / 'ema_repo').folder
    raw = build_repo_folder(run, 'me/a.b', tmp_path / 'raw_repo', use_ema=False).folder
    first = build_repo_folder(run, 'me/a.b', tmp_path / 'first_repo', checkpoint='checkpoint-0.pth.tar').folder
    for folder, name, key in ((ema, 'model_best.pth.tar', 'state_dict_ema'), (raw, 'model_best.pth.tar', 'state_dict'),
                              (first, 'checkpoint-0.pth.tar', 'state_dict_ema')):
        sd, published = checkpoint_weights(run, name, key), load_file(str(folder / 'model.safetensors'))
        assert all(torch.equal(published[k], sd[k]) for k in sd), (folder, key)
    assert 'EMA weights' in (ema / 'README.md').read_text()
    assert 'EMA weights' not in (raw / 'README.md').read_text()
    assert 'epoch 1 of 2' in (first / 'README.md').read_text()  # epochs counted from 1 where people read them


def test_tract_registry_run_publishes_base_arch(tmp_path):
    run = make_run(tmp_path / 'twin', arch='test_vit', model_name='test_vit_tract', opt='sgd',
                   model_kwargs={'img_size': IMG, 'tract_lambda': 0.05})
    out = build_repo_folder(run, 'me/test_vit_tract.twin', tmp_path / 'repo').folder
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'test_vit'
    assert cfg['model_args']['img_size'] in (IMG, [IMG, IMG]) and 'tract_lambda' not in cfg['model_args']
    assert cfg['tract']['arch'] == 'test_vit_tract' and cfg['tract']['applied_via'] == 'model'
    assert cfg['tract']['lambda'] == 0.05 and cfg['tract']['layer'] == 'patch_embed.proj'
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        expected = reference_logits('test_vit', checkpoint_weights(run), 3, img_size=IMG)
        assert torch.equal(model(fixed_input()), expected)


def test_refuses_runs_without_tract_and_bad_input(tmp_path, run_dir):
    plain = make_run(tmp_path / 'plain', opt='sgd', epochs=1)
    with pytest.raises(PublishError, match='did not train with TrAct'):
        build_repo_folder(plain, 'me/x', tmp_path / 'out1')
    with pytest.raises(PublishError, match='ORG/NAME'):
        build_repo_folder(run_dir, 'no-namespace', tmp_path / 'out2')
    with pytest.raises(PublishError, match='no args.yaml'):
        build_repo_folder(tmp_path, 'me/x', tmp_path / 'out3')
    with pytest.raises(PublishError, match='checkpoint nope.pth.tar not found'):
        read_run(run_dir, 'nope.pth.tar')
    assert not any(p.name.startswith(('out', '.out')) for p in tmp_path.iterdir())


def test_existing_output_folder_is_never_overwritten(run_dir, tmp_path):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / 'notes.txt').write_text('keep me')
    with pytest.raises(PublishError, match='not empty'):
        build_repo_folder(run_dir, 'me/x', out)
    assert [p.name for p in out.iterdir()] == ['notes.txt']


def test_failure_leaves_no_partial_folder(run_dir, tmp_path):
    """A checkpoint that does not fit the architecture fails after the folder was started: nothing remains."""
    broken = tmp_path / 'broken'
    broken.mkdir()
    for f in ('args.yaml', 'summary.csv'):
        (broken / f).write_text((run_dir / f).read_text())
    ckpt = timm.utils.load_checkpoint_metadata(str(run_dir / 'model_best.pth.tar'))
    ckpt['state_dict'] = {k: v for k, v in ckpt['state_dict'].items() if not k.startswith('layer1')}
    torch.save(ckpt, broken / 'model_best.pth.tar')
    with pytest.raises(PublishError, match='does not match test_resnet'):
        build_repo_folder(broken, 'me/x', tmp_path / 'out')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['broken']


def test_manifest_is_empty_and_entries_become_cfgs(tmp_path):
    assert load_manifest() == []  # nothing published yet: no cfg may point at a repo that does not exist
    assert published_cfgs() == {}
    manifest = tmp_path / 'published.json'
    manifest.write_text(json.dumps([{'model': 'resnet18_tract.tract_c10', 'hf_hub_id': 'me/resnet18_tract.tract_c10',
                                     'num_classes': 10, 'input_size': [3, 32, 32], 'license': 'mit'}]))
    cfgs = published_cfgs(manifest)
    assert cfgs == {'resnet18_tract': {'tract_c10': {'hf_hub_id': 'me/resnet18_tract.tract_c10', 'num_classes': 10,
                                                     'input_size': (3, 32, 32), 'license': 'mit'}}}
    manifest.write_text(json.dumps([{'model': 'resnet18.x', 'hf_hub_id': 'me/y', 'num_classes': 1}]))
    with pytest.raises(ValueError, match="must be '<arch>_tract.<tag>'"):
        load_manifest(manifest)


# ----------------------------------------------------------------------------------------------- upload
def test_upload_one_commit_and_overwrite_rules(run_dir, hub):
    repo = 'me/test_resnet_tract.commit'
    n_before = len(hub.requests)
    result = publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0)
    served = hub.requests[n_before:]
    assert [r for r in served if '/commit/' in r[1]] == [
        ('POST', '/api/models/me/test_resnet_tract.commit/commit/main', 200)]
    assert result.commit_url.startswith(f'{hub.url}/{repo}/commit/') and result.folder is None
    files = hub.files(repo)
    assert sorted(files) == ['.gitattributes', 'README.md', 'config.json', 'model.safetensors', 'results.csv',
                             'train_hparams.yaml']
    assert TOKEN not in json.dumps({k: v.decode('latin1') for k, v in files.items()})

    # 409 on create (repo exists) and it has files: refused without --overwrite, nothing committed
    n_before = len(hub.requests)
    with pytest.raises(PublishError, match='already has files .*--overwrite'):
        publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0)
    served = hub.requests[n_before:]
    assert ('POST', '/api/repos/create', 409) in served and not any('/commit/' in r[1] for r in served)

    # a pull request proposes without overwriting; --overwrite replaces every file (stale ones removed)
    main_before = hub.repos[repo].refs['main']
    pr = publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, create_pr=True)
    assert pr.pr_url == f'{hub.url}/{repo}/discussions/1' and hub.repos[repo].refs['main'] == main_before
    assert 'model.safetensors' in hub.files(repo, 'refs/pr/1')
    head = hub.repos[repo].commits[main_before]
    head['stale.bin'] = head['model.safetensors']  # a file of an older publication
    publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, overwrite=True, commit_message='v2')
    assert 'stale.bin' not in hub.files(repo) and 'model.safetensors' in hub.files(repo)

    # another branch, created on demand
    publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0, revision='experiment')
    assert 'model.safetensors' in hub.files(repo, 'experiment')


def test_upload_401_is_a_clear_error(run_dir, hub):
    hub.tokens = {TOKEN}
    try:
        with pytest.raises(PublishError, match='refused the credentials .*HTTP 401.*HF_TOKEN') as e:
            publish(run_dir, 'me/denied', endpoint=hub.url, token='hf_wrong_token_123', retries=0)
        assert 'hf_wrong_token_123' not in str(e.value)
    finally:
        hub.tokens = None
    assert 'me/denied' not in hub.repos


def test_upload_retries_500_then_succeeds(run_dir, hub):
    hub.fail_next('POST', '/api/models/me/flaky/commit/', 500)
    hub.fail_next('POST', '/api/repos/create', 503)
    publish(run_dir, 'me/flaky', endpoint=hub.url, token=TOKEN, retries=2, backoff=0.01)
    commits = [r for r in hub.requests if r[1].startswith('/api/models/me/flaky/commit/')]
    assert [c[2] for c in commits] == [500, 200]
    assert 'model.safetensors' in hub.files('me/flaky')


def test_connection_refused_fails_after_retries(run_dir, tmp_path, caplog):
    dead = f'http://127.0.0.1:{free_port()}'
    with pytest.raises(PublishError, match='create_repo failed after 3 attempts'):
        publish(run_dir, 'me/offline', endpoint=dead, token=TOKEN, retries=2, backoff=0.01)
    assert caplog.text.count('retrying in') == 2  # the library logs; the CLI shows its log on stderr


@pytest.mark.slow
def test_round_trip_hf_hub_load_online_then_offline(run_dir, hub, tmp_path):
    """publish -> `hf-hub:` in a fresh process (plain timm), `<arch>_tract` + overlay, then offline from the cache."""
    repo = 'me/test_resnet_tract.roundtrip'
    publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0)
    expected = reference_logits('test_resnet', checkpoint_weights(run_dir), 3, threads=1)  # as the subprocesses
    torch.save(expected, tmp_path / 'expected.pt')
    manifest = tmp_path / 'published.json'
    manifest.write_text(json.dumps([{'model': 'test_resnet_tract.roundtrip', 'hf_hub_id': repo, 'num_classes': 3}]))
    hf_home = tmp_path / 'hf_home'
    check = f'''
        import torch, timm
        x = torch.linspace(-2, 2, 2 * 3 * {IMG} * {IMG}).reshape(2, 3, {IMG}, {IMG})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
        assert model.pretrained_cfg['label_names'] == ['cat', 'dog', 'fish'], model.pretrained_cfg
        with torch.no_grad():
            assert torch.equal(model(x), expected), 'hf-hub weights differ'
        print('hf-hub ok')
    '''
    online = check + f'''
        import timm_tract
        from timm_tract.published import published_cfgs
        for overlay in (dict(hf_hub_id='{repo}', num_classes=3),
                        published_cfgs({str(manifest)!r})['test_resnet_tract']['roundtrip']):
            twin = timm.create_model('test_resnet_tract', pretrained=True, num_classes=3,
                                     pretrained_cfg_overlay=overlay).eval()
            assert timm_tract.is_tract_layer(twin.conv1[0])
            with torch.no_grad():
                assert torch.equal(twin(x), expected), 'overlay weights differ'
        print('overlay ok')
    '''
    proc = run_python(online, subprocess_env(hub.url, hf_home))
    assert proc.returncode == 0, proc.stderr
    assert 'hf-hub ok' in proc.stdout and 'overlay ok' in proc.stdout
    # offline, with the Hub gone: only the cache
    proc = run_python(check, subprocess_env(f'http://127.0.0.1:{free_port()}', hf_home, offline=True))
    assert proc.returncode == 0, proc.stderr
    assert 'hf-hub ok' in proc.stdout


@pytest.mark.slow
def test_download_errors_unknown_repo_and_truncated_file(run_dir, hub, tmp_path):
    repo = 'me/test_resnet_tract.truncated'
    publish(run_dir, repo, endpoint=hub.url, token=TOKEN, retries=0)
    hub.truncate = {'model.safetensors'}
    code = f'''
        import timm
        for name in ('hf-hub:me/does-not-exist', 'hf-hub:{repo}'):
            try:
                timm.create_model(name, pretrained=True)
                print(name, 'LOADED')
            except Exception as e:
                print(name, type(e).__name__, str(e).replace(chr(10), ' '))
    '''
    hf_home = tmp_path / 'hf_home'
    try:
        proc = run_python(code, subprocess_env(hub.url, hf_home))
    finally:
        hub.truncate = set()
    assert proc.returncode == 0, proc.stderr
    unknown, truncated = proc.stdout.strip().splitlines()[-2:]
    assert 'RepositoryNotFoundError' in unknown and 'me/does-not-exist' in unknown
    size = len(hub.files(repo)['model.safetensors'])
    assert re.search(rf'Consistency check failed: file should be of size {size} but has size {size // 2}', truncated)
    # nothing truncated was left in the cache as if complete
    assert not list(hf_home.rglob('snapshots/*/model.safetensors'))


@pytest.mark.slow
def test_cli_publish_never_shows_the_token(run_dir, hub, tmp_path):
    env = subprocess_env(hub.url, tmp_path / 'hf_home')
    env['HF_TOKEN'] = TOKEN + 'env'
    cmd = [sys.executable, '-m', 'timm_tract.cli', 'publish', str(run_dir), '--repo-id', 'me/cli',
           '--token', TOKEN, '--commit-message', 'from the CLI', '--retries', '0']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f'{hub.url}/me/cli/commit/')
    assert 'uploading 5 files' in proc.stderr and '"hf_hub_id": "me/cli"' in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT))
    assert proc.returncode == 2 and '--overwrite' in proc.stderr and TOKEN not in proc.stdout + proc.stderr
    assert not any(TOKEN.encode() in v for v in hub.files('me/cli').values())
