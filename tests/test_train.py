""" `timm-tract train` / `timm_tract.train.train`: train.py's call sequence, flags and outputs, on a tiny
ImageFolder. """
import argparse
import csv
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from timm.models import load_state_dict
from timm.utils import load_checkpoint_metadata

import timm_tract
import timm_tract.train as tract_train
from timm_tract.flags import build_train_parser
from timm_tract.train import TrainError, train

pytestmark = pytest.mark.usefixtures('one_thread')



@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, image_folder) -> Path:
    return image_folder(tmp_path_factory.mktemp('data'), 6, 2)  # 12 train images = 3 batches of 4, 4 val images


def _args(data_dir, out, name='run', **kw) -> argparse.Namespace:
    base = dict(data_dir=data_dir, model='resnet10t', num_classes=2, img_size=16, batch_size=4, workers=0,
                epochs=1, opt='sgd', lr=0.05, warmup_epochs=0, no_aug=True, output=out, experiment=name,
                device='cpu', seed=7, log_interval=1, checkpoint_hist=2)
    base.update(kw)
    argv = []
    for k, v in base.items():
        flag = '--' + k.replace('_', '-')
        if v is True:
            argv.append(flag)
        elif isinstance(v, dict):
            argv += [flag] + [f'{a}={b}' for a, b in v.items()]
        elif isinstance(v, (list, tuple)):
            argv += [flag] + [str(x) for x in v]
        elif v is not False and v is not None:
            argv += [flag, str(v)]
    return build_train_parser().parse_args(argv)


def _summary_rows(run_dir) -> list:
    with open(Path(run_dir) / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


# --- flags and errors (fast) ----------------------------------------------------------------------------------------

def test_parser_has_train_py_flags_and_defaults():
    argv = ('--data-dir d --dataset torch/cifar10 --train-split train --val-split validation --model resnet18 '
            '--pretrained --num-classes 10 --img-size 32 --batch-size 8 --epochs 3 --opt adamw --lr 0.1 --momentum 0.8 '
            '--weight-decay 0.05 --sched step --warmup-epochs 1 --opt-kwargs tract_lambda=0.05 tract_sync_gram=True '
            '--model-kwargs drop_block_rate=0.1 --amp --amp-dtype bfloat16 --channels-last --torchcompile '
            '--grad-accum-steps 2 --clip-grad 1.0 --model-ema --seed 1 --output o --experiment e --resume r.pth.tar '
            '--workers 0 --device cpu --log-interval 5 --tract-lambda 0.05').split()
    a = build_train_parser().parse_args(argv)
    assert a.opt_kwargs == {'tract_lambda': 0.05, 'tract_sync_gram': True}
    assert a.model_kwargs == {'drop_block_rate': 0.1} and a.torchcompile == 'inductor' and a.tract_lambda == 0.05
    d = build_train_parser().parse_args([])
    # train.py's defaults
    assert (d.model, d.opt, d.momentum, d.weight_decay, d.sched, d.epochs, d.batch_size, d.seed, d.amp_dtype,
            d.train_split, d.val_split, d.eval_metric, d.smoothing) == (
        'resnet50', 'sgd', 0.9, 2e-5, 'cosine', 300, 128, 42, 'float16', 'train', 'validation', 'top1', 0.1)


@pytest.mark.parametrize('change,match', [
    (dict(data_dir='/does/not/exist'), 'does not exist'),
    (dict(val_split='holdout'), "no 'holdout' split folder"),
    (dict(model='resnet1800'), "Unknown model 'resnet1800'.*similar: .*resnet18"),
    (dict(opt='sgdd'), "Unknown optimizer 'sgdd'"),
    (dict(tract_lambda=0.05), '--tract-lambda needs TrAct'),
    (dict(model='resnet10t_tract', tract_lambda=0.05, model_kwargs={'tract_lambda': 0.2}), 'disagree'),
    (dict(batch_size=64), 'fewer than one global batch'),
    (dict(resume='/no/ckpt.pth.tar'), 'is not a file'),
])
def test_bad_input_gives_a_clear_error(data_dir, tmp_path, change, match):
    change = dict(change)
    with pytest.raises(TrainError, match=match):
        train(_args(change.pop('data_dir', data_dir), tmp_path, **change))
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('model,opt,where', [
    ('resnet18_tract', 'sgd', 'model'), ('resnet18', 'tract-sgd', 'opt'), ('resnet18', 'lookahead_tract-adamw', 'opt'),
    ('resnet18_tract', 'tract-sgd', 'model'),
])
def test_tract_lambda_goes_where_tract_is_used(model, opt, where):
    """Decided from the built model (has it a TrAct layer?) and the optimizer name, not from the model name."""
    args = build_train_parser().parse_args(['--model', model, '--opt', opt, '--tract-lambda', '0.05',
                                            '--model-kwargs', 'drop_block_rate=0.1'])
    built = timm.create_model(model, device='meta')
    opt_kwargs = tract_train._route_tract_settings(args, built)
    layers = [m for m in built.modules() if timm_tract.is_tract_layer(m)]
    assert opt_kwargs == ({'tract_lambda': 0.05} if where == 'opt' else {})
    assert [m.tract_lambda for m in layers] == ([0.05] if where == 'model' else [])
    assert args.model_kwargs == {'drop_block_rate': 0.1} and args.opt_kwargs == {}  # args (args.yaml) untouched


@pytest.mark.parametrize('model,opt,where', [('resnet18_tract', 'sgd', 'model'), ('resnet18', 'tract-sgd', 'opt')])
def test_tract_lambda_mode_goes_where_tract_is_used(model, opt, where):
    """--tract-lambda-mode is routed like --tract-lambda; a conflicting --opt-kwargs value and a bad value are
    refused."""
    args = build_train_parser().parse_args(['--model', model, '--opt', opt, '--tract-lambda-mode', 'relative'])
    built = timm.create_model(model, device='meta')
    opt_kwargs = tract_train._route_tract_settings(args, built)
    layers = [m for m in built.modules() if timm_tract.is_tract_layer(m)]
    assert opt_kwargs == ({'tract_lambda_mode': 'relative'} if where == 'opt' else {})
    assert [m.tract_lambda_mode for m in layers] == (['relative'] if where == 'model' else [])
    args.opt_kwargs = {'tract_lambda_mode': 'absolute'}
    with pytest.raises(TrainError, match='--tract-lambda-mode relative and --opt-kwargs tract_lambda_mode=absolute'):
        tract_train._route_tract_settings(args, timm.create_model(model, device='meta'))
    args.opt_kwargs = {'tract_lambda_mode': 'bogus'}
    with pytest.raises(TrainError, match="--opt-kwargs tract_lambda_mode: tract_lambda_mode must be one of"):
        tract_train._check_args(args)
    with pytest.raises(SystemExit):
        build_train_parser().parse_args(['--tract-lambda-mode', 'bogus'])


def test_tract_lambda_follows_the_built_model_not_its_name():
    """An hf-hub:/local-dir: model of a TrAct run names its base arch; a model with a TrAct layer still gets λ."""
    args = build_train_parser().parse_args(['--model', 'local-dir:/somewhere', '--opt', 'sgd', '--tract-lambda', '0.2'])
    built = timm_tract.apply_tract(timm.create_model('resnet18', device='meta'))
    assert tract_train._route_tract_settings(args, built) == {} and built.conv1.tract_lambda == 0.2
    with pytest.raises(TrainError, match='--tract-lambda needs TrAct'):
        tract_train._route_tract_settings(args, timm.create_model('resnet18', device='meta'))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from timm_tract.cli import main
    assert main(['train', '--data-dir', str(tmp_path / 'none'), '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert 'timm-tract train: error: --data-dir' in err and 'Traceback' not in err


def test_epoch_data_order_is_seeded_and_matches_distributed_sampler(data_dir):
    from timm.data import create_dataset, create_loader
    ds = create_dataset('', root=str(data_dir), split='train', is_training=True)
    loader = create_loader(ds, input_size=(3, 16, 16), batch_size=4, is_training=True, no_aug=True, num_workers=0,
                           device=torch.device('cpu'))
    args = argparse.Namespace(seed=7, rank=0)
    orders = []
    for epoch in (0, 1, 0):
        torch.manual_seed(epoch + 100)  # whatever the global RNG state, the order depends on (seed, epoch) only
        tract_train._seed_epoch(loader, args, epoch)
        orders.append(list(iter(loader.sampler)))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    dist_sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=0, seed=7)
    dist_sampler.set_epoch(1)
    assert list(dist_sampler) == orders[1][0::2]  # rank 0 of 2 gets every other index of the same permutation


# --- end to end (slow) ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_writes_train_py_layout_and_returns_history(data_dir, tmp_path):
    result = train(_args(data_dir, tmp_path, epochs=2, opt='tract-sgd', tract_lambda=0.05))
    run = tmp_path / 'run'
    assert result.output_dir == str(run)
    files = sorted(os.listdir(run))
    assert files == ['args.yaml', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'data_facts.json', 'last.pth.tar',
                     'model_best.pth.tar', 'summary.csv']  # the lock file is gone once the run ends
    rows = _summary_rows(run)
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    assert [h['epoch'] for h in result.history] == [0, 1]
    for row, h in zip(rows, result.history):
        assert set(h) == {'epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'}
        assert float(row['train_loss']) == pytest.approx(h['train_loss']) and float(row['lr']) == h['lr']
    best = max(result.history, key=lambda h: h['eval_top1'])
    assert result.best_metric == best['eval_top1'] and result.best_epoch == best['epoch']
    saved = yaml.safe_load((run / 'args.yaml').read_text())
    assert saved['opt'] == 'tract-sgd' and saved['tract_lambda'] == 0.05 and saved['model'] == 'resnet10t'
    meta = load_checkpoint_metadata(str(run / 'last.pth.tar'))
    assert meta['epoch'] == 1 and meta['arch'] == 'resnet10t' and meta['args'].opt_kwargs == {}
    # TrAct weights are plain timm weights: the base model loads them strictly
    plain = timm.create_model('resnet10t', num_classes=2)
    plain.load_state_dict(load_state_dict(str(run / 'model_best.pth.tar')))


@pytest.mark.slow
def test_same_seed_same_run_and_different_seed_differs(data_dir, tmp_path):
    a = train(_args(data_dir, tmp_path, 'a', opt='tract-sgd'))
    b = train(_args(data_dir, tmp_path, 'b', opt='tract-sgd'))
    c = train(_args(data_dir, tmp_path, 'c', opt='tract-sgd', seed=8))
    assert a.history[0]['train_loss'] == b.history[0]['train_loss'] != c.history[0]['train_loss']


@pytest.mark.slow
def test_existing_run_is_never_overwritten(data_dir, tmp_path):
    train(_args(data_dir, tmp_path))
    before = (tmp_path / 'run' / 'last.pth.tar').read_bytes()
    with pytest.raises(TrainError, match='already holds a run.*--resume'):
        train(_args(data_dir, tmp_path))
    assert (tmp_path / 'run' / 'last.pth.tar').read_bytes() == before


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_kill_continues_at_the_right_epoch_with_same_optimizer_state(data_dir, tmp_path, monkeypatch):
    kw = dict(epochs=3, opt='tract-momentum', model_ema=True, model_ema_decay=0.5)
    full = train(_args(data_dir, tmp_path, 'full', **kw))

    # the same run killed after its epoch-0 checkpoint ...
    saver_cls = tract_train._make_saver

    def killing_saver(*a, **k):
        saver = saver_cls(*a, **k)
        save = saver.save_checkpoint

        def save_then_die(epoch, metric=None):
            out = save(epoch, metric)
            if epoch == 0:
                raise _Killed()
            return out
        saver.save_checkpoint = save_then_die
        return saver
    monkeypatch.setattr(tract_train, '_make_saver', killing_saver)
    with pytest.raises(_Killed):
        train(_args(data_dir, tmp_path, 'part', **kw))
    monkeypatch.undo()
    part = tmp_path / 'part'
    assert load_checkpoint_metadata(str(part / 'last.pth.tar'))['epoch'] == 0

    # ... and resumed into its own dir: epochs 1 and 2 only, same weights, EMA and optimizer state as the full run
    resumed = train(_args(data_dir, tmp_path, 'part', resume=part / 'last.pth.tar', **kw))
    assert [h['epoch'] for h in resumed.history] == [0, 1, 2]  # summary.csv continued, no duplicate rows
    assert [h['train_loss'] for h in resumed.history] == pytest.approx(
        [h['train_loss'] for h in full.history], rel=1e-5)
    ck_full = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=False)
    ck_part = torch.load(part / 'last.pth.tar', weights_only=False)
    assert ck_part['epoch'] == ck_full['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        for name, t in ck_full[key].items():
            torch.testing.assert_close(ck_part[key][name], t, msg=f'{key}.{name}')
    for idx, state in ck_full['optimizer']['state'].items():
        torch.testing.assert_close(ck_part['optimizer']['state'][idx]['momentum_buffer'], state['momentum_buffer'])
    assert ck_part['optimizer']['param_groups'][0]['lr'] == ck_full['optimizer']['param_groups'][0]['lr']


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_last_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    import timm.utils.checkpoint_saver as cs
    real_save = torch.save
    calls = {'n': 0}
    unlinked = []

    def dying_save(obj, path, *a, **k):
        calls['n'] += 1
        if calls['n'] == 2:  # epoch 1: die half-way through writing the file
            with open(path, 'wb') as f:
                f.write(b'\x80\x02partial')
            raise _Killed()
        return real_save(obj, path, *a, **k)

    real_unlink = os.unlink
    monkeypatch.setattr(cs.torch, 'save', dying_save)
    monkeypatch.setattr(cs.os, 'unlink', lambda p, *a, **k: (unlinked.append(str(p)), real_unlink(p, *a, **k)))
    with pytest.raises(_Killed):
        train(_args(data_dir, tmp_path, epochs=2))
    monkeypatch.undo()
    assert not any(p.endswith('last.pth.tar') for p in unlinked)  # replaced by rename only, never removed first
    assert load_checkpoint_metadata(str(tmp_path / 'run' / 'last.pth.tar'))['epoch'] == 0
    resumed = train(_args(data_dir, tmp_path, epochs=2, resume=tmp_path / 'run' / 'last.pth.tar'))
    assert [h['epoch'] for h in resumed.history] == [0, 1]


@pytest.mark.slow
def test_train_py_options_amp_channels_last_accum_ema_clip_compile(data_dir, tmp_path):
    """The options train.py users combine with TrAct, all at once, through the same call sequence (aot_eager: the
    autograd tracing of torch.compile without C++ code generation; inductor is checked in the README's manual run).
    32 px, not the data's 16: on CPU (torch 2.14.1) the bf16 conv backward of a 1×1 feature map (resnet10t's
    layer4.0.conv1 at 16 px) gives a NaN weight gradient in about 1 of 10 backward passes, also with no TrAct in the
    model (`test_bf16_cpu_conv_backward_at_32px_is_finite` keeps that fact checked)."""
    options = dict(lr=1e-3, grad_accum_steps=2, model_ema=True, clip_grad=1.0, torchcompile='aot_eager', amp=True,
                   amp_dtype='bfloat16', channels_last=True, img_size=32)
    result = train(_args(data_dir, tmp_path, opt='tract-adamw', **options))
    assert np.isfinite(result.history[0]['train_loss'])
    ck = torch.load(tmp_path / 'run' / 'last.pth.tar', weights_only=False)
    assert 'state_dict_ema' in ck and not any(k.startswith(('_orig_mod', 'module.')) for k in ck['state_dict'])
    assert ck['optimizer']['state']  # optimizer stepped (3 batches, accumulation 2: 2 updates)
    # none of the options switched TrAct off: the stem equals the *_tract model's run and differs from the plain run
    train(_args(data_dir, tmp_path, 'twin', model='resnet10t_tract', opt='adamw', **options))
    train(_args(data_dir, tmp_path, 'plain', opt='adamw', **options))
    stem = {name: load_state_dict(str(tmp_path / name / 'last.pth.tar'))['conv1.0.weight']
            for name in ('run', 'twin', 'plain')}
    torch.testing.assert_close(stem['run'], stem['twin'], rtol=1e-3, atol=1e-5)
    assert (stem['run'] - stem['plain']).abs().max() > 100 * (stem['run'] - stem['twin']).abs().max().clamp_min(1e-7)


def test_bf16_cpu_conv_backward_at_32px_is_finite(one_thread):
    """The premise of the test above: plain resnet10t (no TrAct), bf16 autocast and channels_last, 32 px, has finite
    gradients on CPU in every one of 40 fresh models (at 16 px about 4 of them get a NaN in layer4.0.conv1)."""
    torch.manual_seed(0)
    for _ in range(40):
        model = timm.create_model('resnet10t', num_classes=2).to(memory_format=torch.channels_last)
        x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x).float().logsumexp(1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


FAMILIES = [  # one model per family; ViT/DeiT at 32 px need the img_size model kwarg (fixed input size)
    ('resnet10t', {}),
    ('convnext_atto', {}),
    ('vit_tiny_patch16_224', {'img_size': 32}),
    ('deit_tiny_patch16_224', {'img_size': 32}),
]


@pytest.mark.slow
@pytest.mark.parametrize('arch,model_kwargs', FAMILIES, ids=[f[0] for f in FAMILIES])
def test_tract_optimizer_equals_tract_model(data_dir, tmp_path, arch, model_kwargs):
    """--model <arch> --opt tract-sgd  ==  --model <arch>_tract --opt sgd  (same seed, 3 steps)."""
    common = dict(img_size=32, model_kwargs=model_kwargs, smoothing=0)
    via_opt = train(_args(data_dir, tmp_path, 'opt', model=arch, opt='tract-sgd', **common))
    via_model = train(_args(data_dir, tmp_path, 'model', model=arch + '_tract', opt='sgd', **common))
    train(_args(data_dir, tmp_path, 'plain', model=arch, opt='sgd', **common))
    assert via_opt.history[0]['train_loss'] == pytest.approx(via_model.history[0]['train_loss'], rel=1e-5)
    a = load_state_dict(str(tmp_path / 'opt' / 'last.pth.tar'))
    b = load_state_dict(str(tmp_path / 'model' / 'last.pth.tar'))
    c = load_state_dict(str(tmp_path / 'plain' / 'last.pth.tar'))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    first = timm.create_model(arch, **model_kwargs).pretrained_cfg['first_conv'] + '.weight'
    assert not torch.allclose(a[first], c[first], atol=1e-6)  # TrAct took effect


TRAIN_PY = os.environ.get('TIMM_TRAIN_PY')  # path to train.py of a timm repository clone (not on PyPI, so not in CI)


@pytest.mark.slow
@pytest.mark.skipif(not TRAIN_PY,
                    reason='set TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py to run timm\'s train.py')
@pytest.mark.parametrize('model,opt', [('resnet10t', 'tract-sgd'), ('resnet10t_tract', 'sgd')])
def test_timm_train_py_with_device_modules(data_dir, tmp_path, model, opt):
    import subprocess
    import sys
    cmd = [sys.executable, TRAIN_PY, '--device-modules', 'timm_tract', '--data-dir', str(data_dir), '--device', 'cpu',
           '--model', model, '--opt', opt, '--num-classes', '2', '--img-size', '16', '-b', '4', '-j', '0',
           '--epochs', '1', '--lr', '0.01', '--warmup-epochs', '0', '--no-aug', '--output', str(tmp_path),
           '--experiment', 'e']
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1]), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(TRAIN_PY), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if opt.startswith('tract-'):
        assert 'tract-sgd: TrAct on ResNet first layer' in proc.stderr + proc.stdout
    assert (tmp_path / 'e' / 'last.pth.tar').exists() and (tmp_path / 'e' / 'summary.csv').exists()


@pytest.mark.slow
def test_small_images_train_at_their_own_size(data_dir, tmp_path, caplog):
    """16 px images and resnet10t's 224 px default, no --img-size: trained at 16 px, and the log says so."""
    import logging
    caplog.set_level(logging.INFO, logger='timm_tract')
    result = train(_args(data_dir, tmp_path, img_size=None))
    args = yaml.safe_load((Path(result.output_dir) / 'args.yaml').read_text())
    assert args['img_size'] == 16 and 'training at 16x16' in caplog.text


# --- hardening: accumulation window, epoch seeding, TrAct on resume, one process per run dir ------------------------

@pytest.mark.slow
def test_grad_accum_last_partial_window_is_scaled_by_its_real_size(data_dir, tmp_path, monkeypatch):
    """3 batches with --grad-accum-steps 2: windows [0, 1] and [2]. Each update's gradient must be the mean of its
    window's micro-batch gradients (timm train.py's rule), recomputed here from the recorded batches and weights."""
    from timm.task import ClassificationTask

    batches, steps = [], []
    forward = ClassificationTask.forward

    def recording_forward(self, x, y):
        batches.append((x.detach().clone(), y.detach().clone()))
        return forward(self, x, y)
    monkeypatch.setattr(ClassificationTask, 'forward', recording_forward)
    create = tract_train._create_optimizer

    def recording_optimizer(args, model, opt_kwargs):
        optimizer = create(args, model, opt_kwargs)
        step = optimizer.step

        def recording_step(*a, **k):
            steps.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                          {n: p.grad.detach().clone() for n, p in model.named_parameters()}, len(batches)))
            return step(*a, **k)
        optimizer.step = recording_step
        return optimizer
    monkeypatch.setattr(tract_train, '_create_optimizer', recording_optimizer)
    train(_args(data_dir, tmp_path, grad_accum_steps=2, smoothing=0., opt='momentum', momentum=0., weight_decay=0.,
                val_split=''))
    assert len(batches) == 3 and [n for *_, n in steps] == [2, 3]

    reference = timm.create_model('resnet10t', num_classes=2)
    windows = [batches[0:2], batches[2:3]]
    for (weights, grads, _), window in zip(steps, windows):
        reference.load_state_dict(weights, strict=False)
        reference.train()
        reference.zero_grad()
        for x, y in window:
            (torch.nn.functional.cross_entropy(reference(x), y) / len(window)).backward()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_augmentation_and_dropout_seed_depends_on_the_epoch():
    """After `_seed_epoch`, the RNGs that drive augmentation, dropout and data-loader worker seeds (torch, numpy,
    random) draw the same values for the same (seed, epoch) and other values in another epoch."""
    import random
    args = argparse.Namespace(seed=3, rank=0)
    loader = argparse.Namespace(sampler=None)

    def draws(epoch):
        tract_train._seed_epoch(loader, args, epoch)
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    assert draws(0) == draws(0) and draws(1) == draws(1)
    for a, b in zip(draws(0), draws(1)):
        assert a != b


@pytest.mark.slow
def test_resuming_a_tract_run_without_tract_is_refused(data_dir, tmp_path):
    train(_args(data_dir, tmp_path, 'tract', opt='tract-sgd', epochs=1))
    ckpt = tmp_path / 'tract' / 'last.pth.tar'
    with pytest.raises(TrainError, match=r'was trained with TrAct .*--opt tract-sgd'):
        train(_args(data_dir, tmp_path, 'tract', opt='sgd', epochs=2, resume=ckpt))
    assert len(_summary_rows(tmp_path / 'tract')) == 1  # nothing trained, nothing rewritten
    resumed = train(_args(data_dir, tmp_path, 'tract', opt='tract-sgd', epochs=2, resume=ckpt))
    assert [h['epoch'] for h in resumed.history] == [0, 1]


def test_experiment_cannot_leave_output(data_dir, tmp_path):
    for name in ('../escape', str(tmp_path / 'abs'), 'a/../../b'):
        with pytest.raises(TrainError, match='inside --output'):
            train(_args(data_dir, tmp_path / 'out', name))
    assert not (tmp_path / 'escape').exists() and not (tmp_path / 'abs').exists() and not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_second_run_into_the_same_dir_is_refused_while_the_first_trains(data_dir, tmp_path):
    """Two real `timm-tract train` processes, one run directory: the second is refused with one line (exit 2); the
    first finishes alone (one summary row per epoch, its own checkpoints)."""
    import subprocess
    import sys
    import time
    argv = [sys.executable, '-m', 'timm_tract.cli', 'train', '--data-dir', str(data_dir), '--model', 'resnet10t',
            '--num-classes', '2', '--img-size', '16', '-b', '4', '--workers', '0', '--epochs', '6', '--lr', '0.05',
            '--warmup-epochs', '0', '--no-aug', '--device', 'cpu', '--output', str(tmp_path), '--experiment', 'run']
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / 'run' / '.timm-tract.lock'
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and ('in use by another timm-tract process' in lines[0] or 'already holds a run' in lines[0])
    assert [int(r['epoch']) for r in _summary_rows(tmp_path / 'run')] == list(range(6)) and not lock.exists()
