""" `tract_lambda_mode`: 'absolute' (the paper, default, unchanged) and 'relative' (λ·s, s = tr(XᵀX/N)/n): the
validator, scale invariance of the SGD update in float64 (conv, linear, Woodbury), the zero / non-finite s cases,
layers, `apply_tract`, the `*_tract` twins and a 2-process sync_gram run. """
import os
import pickle

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import timm_tract
from timm_tract import TrActConv2d, TrActLinear, apply_tract
from timm_tract import functional as TF
from timm_tract.errors import NotPositiveDefiniteError, TrActArgumentError, TrActTypeError


@pytest.mark.parametrize('mode', ['absolute', 'relative'])
def test_check_lambda_mode_accepts_the_modes(mode):
    assert TF.check_lambda_mode(mode) == mode
    assert TF.LAMBDA_MODES == ('absolute', 'relative') and TF.DEFAULT_LAMBDA_MODE == 'absolute'


@pytest.mark.parametrize('bad,error', [('Relative', TrActArgumentError), ('', TrActArgumentError),
                                       ('scaled', TrActArgumentError), (None, TrActTypeError), (1, TrActTypeError),
                                       (True, TrActTypeError)])
def test_bad_lambda_mode_is_one_line_naming_the_allowed_values(bad, error):
    with pytest.raises(error) as info:
        TF.check_lambda_mode(bad)
    msg = str(info.value)
    assert '\n' not in msg and msg.startswith('tract_lambda_mode must be one of') and "'relative'" in msg
    with pytest.raises(error):
        TF.tract_conv2d(torch.randn(1, 1, 4, 4), torch.randn(2, 1, 3, 3), tract_lambda_mode=bad)
    with pytest.raises(error):
        TrActLinear(3, 2, tract_lambda_mode=bad)


def _update(kind, x, weight, gy, mode, lr=0.5, **conv):
    """X·ΔW of one SGD step on loss (out·gy).sum() (the first layer's pre-activation update, no bias)."""
    w = weight.clone().requires_grad_(True)
    if kind == 'conv':
        out = TF.tract_conv2d(x, w, None, tract_lambda=0.1, tract_lambda_mode=mode, **conv)
    else:
        out = TF.tract_linear(x, w, None, tract_lambda=0.1, tract_lambda_mode=mode)
    (out * gy).sum().backward()
    delta = -lr * w.grad
    return F.conv2d(x, delta, None, **conv) if kind == 'conv' else F.linear(x, delta)


# (kind, x shape, weight shape, conv kwargs): the Gram (N ≥ n) and the Woodbury (N < n) systems
_CASES = [
    ('conv', (4, 3, 20, 18), (6, 3, 7, 7), dict(stride=2, padding=3)),  # N = 360 ≥ n = 147
    ('conv', (1, 3, 9, 9), (5, 3, 7, 7), dict(stride=2, padding=1)),  # N = 4 < n = 147: Woodbury
    ('linear', (5, 7, 12), (4, 12), {}),  # N = 35 ≥ 12
    ('linear', (3, 20), (4, 20), {}),  # N = 3 < 20: Woodbury
]


@pytest.mark.parametrize('case', _CASES, ids=['conv_gram', 'conv_woodbury', 'linear_gram', 'linear_woodbury'])
def test_relative_mode_update_is_invariant_to_the_input_scale(case):
    kind, xshape, wshape, conv = case
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(xshape, generator=gen, dtype=torch.float64) * 3 + 1  # far from standardized
    weight = torch.randn(wshape, generator=gen, dtype=torch.float64)
    gy = torch.randn(_update(kind, x, weight, 0, 'absolute', **conv).shape, generator=gen, dtype=torch.float64)
    ref_rel = _update(kind, x, weight, gy, 'relative', **conv)
    ref_abs = _update(kind, x, weight, gy, 'absolute', **conv)
    for c in (1e-3, 0.5, 7.0, 255.0, 1e4):
        rel = _update(kind, x * c, weight, gy, 'relative', **conv)
        assert torch.allclose(rel, ref_rel, rtol=1e-9, atol=1e-12 * ref_rel.abs().max()), c
        absolute = _update(kind, x * c, weight, gy, 'absolute', **conv)
        assert ((absolute - ref_abs).norm() / ref_abs.norm()) > 1e-3, c


def test_relative_equals_absolute_with_lambda_times_s():
    """relative λ = absolute λ·s with s = tr(XᵀX/N)/n computed by hand (the Gram's trace)."""
    torch.manual_seed(0)
    x = torch.randn(40, 9, dtype=torch.float64) * 3 + 2
    s = float((x ** 2).sum() / (40 * 9))
    a, b = TrActLinear(9, 4, tract_lambda=0.1, tract_lambda_mode='relative').double(), TrActLinear(9, 4).double()
    b.load_state_dict(a.state_dict())
    b.tract_lambda = 0.1 * s
    gy = torch.randn(40, 4, dtype=torch.float64)
    for layer in (a, b):
        (layer(x) * gy).sum().backward()
    assert torch.allclose(a.weight.grad, b.weight.grad, rtol=1e-12, atol=0)


def test_absolute_mode_is_bit_identical_to_the_default():
    torch.manual_seed(0)
    x, gy = torch.randn(4, 3, 16, 16), torch.randn(4, 8, 8, 8)
    a = TrActConv2d(3, 8, 7, stride=2, padding=3)
    b = TrActConv2d(3, 8, 7, stride=2, padding=3, tract_lambda_mode='absolute')
    b.load_state_dict(a.state_dict())
    for layer in (a, b):
        (layer(x) * gy).sum().backward()
    assert torch.equal(a.weight.grad, b.weight.grad)


@pytest.mark.parametrize('make', [lambda: TrActConv2d(3, 4, 3, tract_lambda_mode='relative'),
                                  lambda: TrActLinear(27, 4, tract_lambda_mode='relative')], ids=['conv', 'linear'])
def test_all_zero_batch_falls_back_to_absolute_lambda_and_gives_zero_gradient(make):
    """s = 0 (all-zero input): that step uses the absolute λ; X = 0 makes GᵀX and so the TrAct gradient exactly 0."""
    layer = make()
    x = torch.zeros((2, 3, 8, 8) if isinstance(layer, nn.Conv2d) else (40, 27))
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.isfinite(layer.bias.grad).all() and layer.bias.grad.abs().sum() > 0
    grad_w = torch.randn(4, 27)  # the solve alone: s = 0 gives (0/N + λI)⁻¹, i.e. P / λ
    out = TF.tract_precondition(grad_w, torch.zeros(1, 27, 27), 40, 0.1, tract_lambda_mode='relative')
    assert torch.allclose(out, grad_w / 0.1)


def test_non_finite_s_raises_instead_of_nan():
    layer = TrActConv2d(3, 4, 3, tract_lambda_mode='relative')
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float('inf')
    with pytest.raises(NotPositiveDefiniteError, match='NaN/Inf'):
        layer(x).sum().backward()
    assert layer.weight.grad is None
    with pytest.raises(NotPositiveDefiniteError):
        TF.tract_precondition(torch.randn(4, 27), torch.full((1, 27, 27), float('nan')), 40, 0.1,
                              tract_lambda_mode='relative')


def test_layer_property_repr_pickle_and_remove():
    layer = TrActConv2d(3, 4, 3)
    assert layer.tract_lambda_mode == 'absolute' and 'tract_lambda_mode' not in repr(layer)
    layer.tract_lambda_mode = 'relative'
    assert "tract_lambda_mode='relative'" in repr(layer)
    with pytest.raises(TrActArgumentError):
        layer.tract_lambda_mode = 'bogus'
    assert layer.tract_lambda_mode == 'relative'
    assert pickle.loads(pickle.dumps(layer)).tract_lambda_mode == 'relative'
    old = pickle.loads(pickle.dumps(layer))
    del old.__dict__['_tract_lambda_mode']  # a layer pickled before the mode existed
    assert old.tract_lambda_mode == 'absolute'
    model = timm_tract.remove_tract(nn.Sequential(layer))
    assert type(model[0]) is nn.Conv2d and '_tract_lambda_mode' not in model[0].__dict__


def test_apply_tract_sets_and_updates_the_mode_and_validates_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(TrActArgumentError, match='tract_lambda_mode'):
        apply_tract(model, tract_lambda_mode='bogus')
    assert type(model[0]) is nn.Conv2d  # nothing converted
    apply_tract(model, tract_lambda_mode='relative')
    assert model[0].tract_lambda_mode == 'relative'
    apply_tract(model, 0.2)
    assert model[0].tract_lambda_mode == 'absolute' and model[0].tract_lambda == 0.2
    with pytest.raises(TrActTypeError):
        apply_tract(model, tract_lambda_mode=None)
    assert model[0].tract_lambda_mode == 'absolute'


def test_twin_takes_the_mode_and_records_it_in_the_cfg():
    model = timm.create_model('resnet18_tract', tract_lambda_mode='relative', num_classes=3)
    assert model.conv1.tract_lambda_mode == 'relative'
    assert model.pretrained_cfg['tract_lambda_mode'] == 'relative'
    default = timm.create_model('resnet18_tract', num_classes=3)
    assert default.conv1.tract_lambda_mode == 'absolute' and default.pretrained_cfg['tract_lambda_mode'] == 'absolute'
    with pytest.raises(TrActArgumentError, match='tract_lambda_mode'):
        timm.create_model('resnet18_tract', tract_lambda_mode='bogus')
    via_cfg = timm.create_model('resnet18_tract', num_classes=3,
                                pretrained_cfg_overlay={'tract_lambda_mode': 'relative'})
    assert via_cfg.conv1.tract_lambda_mode == 'relative'


# --- sync_gram: s is the globally reduced Gram's trace (2 gloo processes) ---

WORLD = 2


def _ddp_data(rank: int):
    gen = torch.Generator().manual_seed(20 + rank)
    x = torch.rand(2 + rank, 3, 10, 10, generator=gen, dtype=torch.float64) * (40 + 200 * rank)  # ranks differ in scale
    gy = torch.randn(2 + rank, 5, 5, 5, generator=gen, dtype=torch.float64)
    return x, gy


def _ddp_layer() -> nn.Module:
    torch.manual_seed(0)
    return apply_tract(nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1).double()), sync_gram=True,
                       tract_lambda_mode='relative')


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_ddp_layer())
        x, gy = _ddp_data(rank)
        (model(x) * gy).sum().backward()
        torch.save(model.module[0].weight.grad.detach().clone(), os.path.join(out_dir, f'grad{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_relative_mode_with_sync_gram_uses_the_global_trace(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f'grad{r}.pt') for r in range(WORLD)]
    assert torch.equal(grads[0], grads[1])
    rows, outs = [], []
    for rank in range(WORLD):
        x, gy = _ddp_data(rank)
        rows.append(F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27))
        outs.append(gy.permute(0, 2, 3, 1).reshape(-1, 5))
    x, g = torch.cat(rows), torch.cat(outs)
    gram = x.T @ x / x.shape[0]
    s = gram.trace() / 27
    expected = (g.T @ x @ torch.linalg.inv(gram + 0.1 * s * torch.eye(27, dtype=torch.float64))) / WORLD
    assert ((grads[0].reshape(5, 27) - expected).norm() / expected.norm()) <= 1e-10
