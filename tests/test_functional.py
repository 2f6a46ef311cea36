""" TrAct math: parity with the authors' torch-tract, a float64 brute-force oracle, the reference values, chunking. """
import fractions
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_tract

import timm_tract
from timm_tract import TrActConv2d, TrActLinear
from timm_tract import functional as TF
from timm_tract.errors import TrActArgumentError, TrActTypeError


def _brute_force_grad(x, weight, gy, tract_lambda, stride=1, padding=0, dilation=1, groups=1, padding_mode='zeros'):
    """float64 oracle: explicit padding + unfold per group, explicit inverse of XᵀX/N + λI."""
    x, weight, gy = x.double(), weight.double(), gy.double()
    conv = nn.Conv2d(x.shape[1], weight.shape[0], weight.shape[2:], stride, padding, dilation, groups,
                     bias=False, padding_mode=padding_mode, dtype=torch.float64)
    pad = conv._reversed_padding_repeated_twice
    xp = F.pad(x, pad, mode='constant' if padding_mode == 'zeros' else padding_mode)
    cin_g, m_g = x.shape[1] // groups, weight.shape[0] // groups
    out = torch.empty_like(weight)
    for g in range(groups):
        cols = F.unfold(xp[:, g * cin_g:(g + 1) * cin_g], weight.shape[2:], dilation=dilation, stride=stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N, n)
        grad_out = gy[:, g * m_g:(g + 1) * m_g].permute(0, 2, 3, 1).reshape(-1, m_g)  # (N, m_g)
        n_rows, n = rows.shape
        a_inv = torch.linalg.inv(rows.T @ rows / n_rows + tract_lambda * torch.eye(n, dtype=torch.float64))
        out[g * m_g:(g + 1) * m_g] = (grad_out.T @ rows @ a_inv).reshape(m_g, *weight.shape[1:])
    return out


def _grads(layer, x, gy):
    layer.zero_grad()
    (layer(x) * gy).sum().backward()
    return layer.weight.grad, (layer.bias.grad if layer.bias is not None else None)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# (B, C, H, W, out, kernel, stride, padding): both branches N >= n and N < n
_OFFICIAL_CONV_CASES = [
    (4, 3, 16, 16, 8, 3, 1, 1),     # N=1024  n=27
    (2, 3, 20, 20, 16, 7, 2, 3),    # N=200   n=147 (ResNet stem geometry)
    (2, 3, 32, 32, 12, 16, 16, 0),  # N=8     n=768 (ViT patch embed) -> Woodbury
    (1, 2, 4, 4, 5, 3, 1, 0),       # N=4     n=18  -> Woodbury
    (3, 4, 9, 7, 6, (3, 2), (2, 1), (1, 0)),
]


def _assert_parity(make_ref, make_ours, x64, gy64, dtype):
    """fp64: rel ≤ 1e-6 to the official gradient. fp32: rel ≤ 1e-4 to the official one, or, where the official fp32
    result is itself further than 5e-5 from the fp64 truth (ill-conditioned Woodbury cases), at least as close to it."""
    base = make_ref(torch.float64)
    truth, truth_bias = _grads(base, x64, gy64)
    ref, ours = make_ref(dtype), make_ours(dtype)
    ref.load_state_dict(base.state_dict())
    ours.load_state_dict(base.state_dict())
    x, gy = x64.to(dtype), gy64.to(dtype)
    (rw, rb), (ow, ob) = _grads(ref, x, gy), _grads(ours, x, gy)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    official_error = _rel(rw.double(), truth)
    if dtype == torch.float64 or official_error <= 5e-5:
        assert _rel(ow, rw) <= tol
    else:
        assert _rel(ow.double(), truth) <= official_error
    assert torch.allclose(ob, rb, rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('case', _OFFICIAL_CONV_CASES)
def test_conv_matches_official(case, dtype):
    torch.manual_seed(0)
    b, c, h, w, m, k, s, p = case
    x = torch.randn(b, c, h, w, dtype=torch.float64) * 2 + 0.5
    out_hw = nn.Conv2d(c, m, k, s, p)(x.float()).shape[2:]
    gy = torch.randn(b, m, *out_hw, dtype=torch.float64)
    _assert_parity(
        lambda dt: torch_tract.TrAct(nn.Conv2d(c, m, k, s, p, dtype=dt), l=0.1),
        lambda dt: TrActConv2d(c, m, k, s, p, dtype=dt, tract_lambda=0.1),
        x, gy, dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape,n,m', [((30, 8), 8, 5), ((3, 50), 50, 4), ((2, 7, 6), 6, 3), ((4, 5, 48), 48, 16)])
def test_linear_matches_official(shape, n, m, dtype):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    gy = torch.randn(*shape[:-1], m, dtype=torch.float64)
    _assert_parity(
        lambda dt: torch_tract.TrAct(nn.Linear(n, m, dtype=dt), l=0.05),
        lambda dt: TrActLinear(n, m, dtype=dt, tract_lambda=0.05),
        x, gy, dtype)


def test_random_shapes_match_official():
    """Random geometries drawn across both branches (N < n and N >= n), float64."""
    gen = torch.Generator().manual_seed(123)
    branches = set()
    for _ in range(12):
        c, m, k = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 4), (1, 9), (1, 6)))
        s, b = int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, 4, (), generator=gen))
        h = int(torch.randint(k, k + 9, (), generator=gen))
        p = int(torch.randint(0, k // 2 + 1, (), generator=gen))
        ref = torch_tract.TrAct(nn.Conv2d(c, m, k, s, p, dtype=torch.float64), l=0.2)
        ours = TrActConv2d(c, m, k, s, p, dtype=torch.float64, tract_lambda=0.2)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(b, c, h, h + 1, dtype=torch.float64, generator=gen)
        y = ref(x)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        branches.add(b * y.shape[2] * y.shape[3] < c * k * k)
        assert _rel(_grads(ours, x, gy)[0], _grads(ref, x, gy)[0]) <= 1e-6
    assert branches == {True, False}


# every configuration the official code cannot express, against the float64 brute-force oracle
_ORACLE_CASES = [
    dict(stride=2, padding=2, dilation=2),
    dict(padding='same', dilation=(2, 1)),
    dict(padding='same', kernel=(4, 2)),  # asymmetric 'same' padding
    dict(padding='valid'),
    dict(groups=3, out=6, stride=2, padding=1),
    dict(groups=6, out=12, padding=1),  # depthwise with channel multiplier
    dict(padding=2, padding_mode='reflect'),
    dict(padding=(1, 2), padding_mode='replicate', stride=(1, 2)),
    dict(padding=1, padding_mode='circular', bias=False),
    dict(padding='same', padding_mode='reflect'),
    dict(groups=2, out=4, batch=1, size=3, kernel=3, padding=1),  # N=9 < n=27 per group -> Woodbury per group
]


@pytest.mark.parametrize('cfg', _ORACLE_CASES, ids=lambda c: '-'.join(f'{k}={v}' for k, v in c.items()))
def test_conv_configurations_match_brute_force(cfg):
    torch.manual_seed(0)
    cfg = dict(cfg)
    batch, size, kernel, out = cfg.pop('batch', 3), cfg.pop('size', 9), cfg.pop('kernel', 3), cfg.pop('out', 5)
    in_ch = 6 if cfg.get('groups', 1) > 1 else 3
    layer = TrActConv2d(in_ch, out, kernel, dtype=torch.float64, tract_lambda=0.07, **cfg)
    plain = nn.Conv2d(in_ch, out, kernel, dtype=torch.float64, **cfg)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(batch, in_ch, size, size + 2, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, plain(x)), 'forward must be bit-identical to nn.Conv2d'
    gy = torch.randn_like(y)
    (gw, gb), (_, pb) = _grads(layer, x, gy), _grads(plain, x, gy)
    expected = _brute_force_grad(x, layer.weight.detach(), gy, 0.07, layer.stride, cfg.get('padding', 0),
                                 layer.dilation, layer.groups, layer.padding_mode)
    assert _rel(gw, expected) <= 1e-10
    if gb is not None:
        assert torch.equal(gb, pb)


def test_input_gradient_is_ordinary():
    torch.manual_seed(0)
    layer = TrActConv2d(3, 4, 3, padding=1, dtype=torch.float64)
    plain = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x1 = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    gy = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    (layer(x1) * gy).sum().backward()
    (plain(x2) * gy).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_unbatched_conv_input():
    torch.manual_seed(0)
    layer = TrActConv2d(3, 4, 3, dtype=torch.float64)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    gy = torch.randn(4, 6, 6, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    expected = _brute_force_grad(x[None], layer.weight.detach(), gy[None], 0.1)
    assert _rel(layer.weight.grad, expected) <= 1e-10


def test_linear_non_contiguous_and_leading_dims():
    torch.manual_seed(0)
    layer = TrActLinear(6, 3, dtype=torch.float64)
    base = torch.randn(4, 6, 5, dtype=torch.float64)
    x = base.transpose(1, 2)  # (4, 5, 6) non-contiguous
    assert not x.is_contiguous()
    gy = torch.randn(4, 5, 3, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    rows, grad_out = x.reshape(-1, 6), gy.reshape(-1, 3)
    a = rows.T @ rows / rows.shape[0] + 0.1 * torch.eye(6, dtype=torch.float64)
    assert _rel(layer.weight.grad, grad_out.T @ rows @ torch.linalg.inv(a)) <= 1e-10


def test_official_reference_values_linear():
    """The authors' printed values for Linear 8→5 (tract.py __main__, float32, seed 0)."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 8), torch.randn(30, 5)
    lin = TrActLinear(8, 5, tract_lambda=0.1)
    (y - lin(x)).pow(2).mean().backward()
    expected_row0 = torch.tensor([0.0741, 0.0949, -0.0559, -0.0398, -0.1364, 0.0013, 0.1603, -0.0468])
    expected_bias = torch.tensor([-0.1162, 0.1062, -0.1275, -0.0206, -0.1149])
    assert torch.allclose(lin.weight.grad[0], expected_row0, atol=6e-5)
    assert torch.allclose(lin.bias.grad, expected_bias, atol=6e-5)


def test_official_reference_values_conv():
    """The authors' printed values for Conv 2→5, 3×3 (tract.py __main__, float32, seed 0)."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 2, 6, 4), torch.randn(30, 5, 4, 2)
    con = TrActConv2d(2, 5, 3, 1, 0, tract_lambda=0.1)
    (y - con(x)).pow(2).mean().backward()
    assert torch.allclose(con.weight.grad[0, 0, 0], torch.tensor([-0.0501, -0.0166, 0.0214]), atol=6e-5)
    expected_bias = torch.tensor([0.0052, -0.0397, 0.1093, 0.0464, -0.1079])
    assert torch.allclose(con.bias.grad, expected_bias, atol=6e-5)


def test_functional_forms_match_layers():
    torch.manual_seed(0)
    conv = TrActConv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_()
    y = TF.tract_conv2d(x, w, conv.bias.detach(), stride=2, padding=1, tract_lambda=0.1)
    assert torch.equal(y, conv(x))
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    assert torch.allclose(w.grad, _grads(conv, x, gy)[0], rtol=1e-12, atol=1e-14)

    lin = TrActLinear(5, 2, dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64)
    w = lin.weight.detach().clone().requires_grad_()
    y = TF.tract_linear(x, w, lin.bias.detach(), tract_lambda=0.1)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    assert torch.allclose(w.grad, _grads(lin, x, gy)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('budget', [64, 700, 2000])
def test_chunked_gram_is_exact_and_bounded(monkeypatch, budget):
    """XᵀX accumulated in chunks (multi-image chunks, one image, bands of rows) equals the one-shot product, and no
    unfold call exceeds the budget (fixed extra memory whatever the batch size)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 13, 11, dtype=torch.float64)
    geom = TF.conv_geometry((4, 3, 3, 3), stride=2, padding=1, dilation=2)  # dilated: the unfold path
    assert not TF._uses_shifted_gram(geom)
    full, n_full = TF.patch_gram(x, geom)
    biggest = []
    unfold = F.unfold

    def counting_unfold(inp, *args, **kwargs):
        out = unfold(inp, *args, **kwargs)
        biggest.append(out.numel())
        return out

    monkeypatch.setenv(TF.GRAM_CHUNK_ENV, str(budget * 8 / 2 ** 20))  # float64: budget elements, read at call time
    monkeypatch.setattr(TF.F, 'unfold', counting_unfold)
    chunked, n_chunked = TF.patch_gram(x, geom)
    assert n_chunked == n_full == 5 * 6 * 5
    assert torch.allclose(chunked, full, rtol=1e-12, atol=1e-12)
    n = 27
    # at most the budget, or one output row of one image; the Gram restore (`_restore_offset`) unfolds nothing (one
    # image, n·6·5 elements, would exceed the budgets of 64 and 700)
    assert max(biggest) <= max(budget, n * 5)
    assert len(biggest) > 1


@pytest.mark.parametrize('bad,error', [
    (0.0, TrActArgumentError), (-0.1, TrActArgumentError), (float('nan'), TrActArgumentError),
    (float('inf'), TrActArgumentError), (torch.tensor(-1.0), TrActArgumentError), (np.float32(0), TrActArgumentError),
    (True, TrActTypeError), (np.bool_(True), TrActTypeError), (torch.tensor(True), TrActTypeError),
    ('0.1', TrActTypeError), (None, TrActTypeError), (torch.tensor([0.1, 0.2]), TrActTypeError), (1j, TrActTypeError),
    (1e300, TrActArgumentError), (1e-300, TrActArgumentError),  # inf / 0 in float32
])
def test_bad_lambda_is_rejected(bad, error):
    fix = 'Use the paper default 0.1' if error is TrActArgumentError else 'Pass a float such as 0.1'
    with pytest.raises(error, match='tract_lambda') as info:
        TrActConv2d(3, 4, 3, tract_lambda=bad)
    assert fix in str(info.value)
    with pytest.raises(error, match='tract_lambda'):
        TF.tract_linear(torch.randn(2, 3), torch.randn(4, 3), tract_lambda=bad)


@pytest.mark.parametrize('value', [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), torch.tensor([0.1]),
                                   torch.tensor(0.1, dtype=torch.float64), np.int64(1), 1, fractions.Fraction(1, 10)])
def test_lambda_accepts_any_real_number(value):
    torch.manual_seed(0)
    layer = TrActLinear(4, 3, dtype=torch.float64, tract_lambda=value)
    assert type(layer.tract_lambda) is float and layer.tract_lambda == pytest.approx(float(value))
    x, gy = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    a = x.T @ x / 6 + float(value) * torch.eye(4, dtype=torch.float64)
    assert _rel(layer.weight.grad, gy.T @ x @ torch.linalg.inv(a)) <= 1e-10
    assert TF.check_lambda(value) == float(value)


def test_non_finite_input_raises_instead_of_nan_weights():
    layer = TrActConv2d(3, 4, 3)
    before = layer.weight.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 3, 4] = float('nan')
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match='not positive definite'):
        layer(x).sum().backward()
    assert layer.weight.grad is None
    opt.step()
    assert torch.equal(layer.weight, before)


def test_no_work_without_grad():
    """Inference (no_grad / frozen weight) runs the plain layer: no autograd op is inserted."""
    layer = TrActConv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    assert layer(x).grad_fn is None
    assert math.isclose(layer.tract_lambda, timm_tract.functional.DEFAULT_LAMBDA)


@pytest.mark.parametrize('groups', [1, 2])
def test_symmetric_strip_gram_matches_full_product(groups):
    """Large n (ViT patch embeds) takes the block-upper-triangle product; the mirrored result is the full XᵀX."""
    torch.manual_seed(0)
    c = 3 * groups
    x = torch.randn(3, c, 64, 48, dtype=torch.float64)
    geom = TF.conv_geometry((4, 3, 16, 16), stride=16, groups=groups)
    gram, rows = TF.patch_gram(x, geom)
    assert TF._gram_strips(768) != (0, 768)  # the strip path is the one under test
    cols = F.unfold(x, 16, stride=16).view(3, groups, 768, -1).permute(1, 2, 0, 3).reshape(groups, 768, -1)
    assert rows == 3 * 4 * 3
    assert torch.allclose(gram, cols @ cols.transpose(1, 2), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize('kernel,stride,padding,size', [
    ((7, 7), (2, 2), 3, (20, 17)),  # ResNet stem
    ((3, 3), (2, 2), 1, (9, 9)),  # deep-stem / overlapping ConvNeXt stems
    ((3, 5), (1, 2), (1, 2), (8, 11)),
    ((5, 3), (3, 1), 0, (13, 12)),
    ((2, 3), (1, 1), 0, (5, 6)),
])
@pytest.mark.parametrize('budget', [None, 100])
def test_shifted_gram_matches_unfolded_product(monkeypatch, kernel, stride, padding, size, budget):
    """Overlapping stems take the shift-based XᵀX (no kh·kw unfold), also in bands of rows: exact against the unfold."""
    if budget:
        monkeypatch.setenv(TF.GRAM_CHUNK_ENV, str(budget * 8 / 2 ** 20))  # float64: budget elements
    torch.manual_seed(0)
    x = torch.randn(3, 2, *size, dtype=torch.float64)
    geom = TF.conv_geometry((4, 2) + kernel, stride=stride, padding=padding, padding_mode='reflect')
    assert TF._uses_shifted_gram(geom)
    gram, rows = TF.patch_gram(x, geom)
    cols = F.unfold(F.pad(x, geom.pad, mode='reflect'), kernel, stride=stride)
    flat = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    assert rows == flat.shape[0]
    assert torch.allclose(gram[0], flat.T @ flat, rtol=1e-12, atol=1e-10)
