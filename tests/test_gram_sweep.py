""" Exactness sweep of every Gram path (unfold, shifted, spectral) against a float64 unfold + GEMM oracle over sampled
geometries: kernels 1-11, strides 1-4 per dimension, int / pair / 'same' / 'valid' padding, every padding_mode, odd and
even sizes, tiny images (H < kernel), chunked and unchunked; then whole-layer gradients (channels_last, float16 /
bfloat16 autocast, the official torch-tract). A larger sample runs under `-m slow`. """
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_tract

from timm_tract import TrActConv2d
from timm_tract import functional as TF

_MODES = ('zeros', 'reflect', 'replicate', 'circular')


def _oracle_gram(x, geom):
    """float64 XᵀX (groups, n, n) by explicit padding + unfold + GEMM."""
    mode = 'constant' if geom.padding_mode == 'zeros' else geom.padding_mode
    xp = F.pad(x.double(), geom.pad, mode=mode)
    g = geom.groups
    cols = F.unfold(xp, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)  # (B, C·kh·kw, L)
    cols = cols.view(x.shape[0], g, -1, cols.shape[-1]).permute(1, 0, 3, 2).reshape(g, -1, cols.shape[1] // g)
    return cols.transpose(1, 2) @ cols


def _sample_geometry(rng: random.Random):
    """A random conv geometry and input shape with at least one output position; None if the draw is invalid."""
    kh, kw = rng.randint(1, 11), rng.randint(1, 11)
    sh, sw = rng.randint(1, 4), rng.randint(1, 4)
    mode = rng.choice(_MODES)
    kind = rng.choice(('int', 'pair', 'same', 'valid'))
    if kind == 'same':
        sh = sw = 1  # torch allows 'same' only with stride 1
        padding = 'same'
    elif kind == 'valid':
        padding = 'valid'
    elif kind == 'int':
        padding = rng.randint(0, max(kh, kw) // 2)
    else:
        padding = (rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1))
    h, w = rng.randint(1, 2 * kh + 4), rng.randint(1, 2 * kw + 4)  # odd, even, and smaller than the kernel
    geom = TF.conv_geometry((2, 2, kh, kw), (sh, sw), padding, 1, 1, mode)
    left, right, top, bottom = geom.pad
    if mode in ('reflect', 'circular') and (max(top, bottom) >= h or max(left, right) >= w):
        return None  # F.pad: reflect needs pad < size; keep circular likewise
    x_shape = (rng.randint(1, 3), 2, h, w)
    if min(TF._conv_out_size(torch.empty(x_shape, device='meta'), geom)) < 1:
        return None
    return geom, x_shape


def _geometries(count: int, seed: int):
    rng, out = random.Random(seed), []
    while len(out) < count:
        draw = _sample_geometry(rng)
        if draw is not None:
            out.append(draw)
    return out


def _applicable_paths(geom, x_shape):
    paths = ['unfold']
    if TF._uses_shifted_gram(geom):
        paths.append('shifted')
    (kh, kw), (sh, sw) = geom.kernel_size, geom.stride
    if (kh > sh or kw > sw) and -(-kh // sh) * -(-kw // sw) <= TF._SPECTRAL_MAX_TAP_GROUPS:
        paths += ['spectral:dft', 'spectral:fft']  # with its DFT products where the lengths allow them, with FFTs
    return paths


def _check_paths(monkeypatch, geometries, budget_elements=None):
    seen = set()
    for geom, x_shape in geometries:
        # away from zero mean (per channel), so the Gram restore of the centered accumulation carries weight
        x = torch.randn(x_shape, dtype=torch.float64) + torch.linspace(-2, 3, x_shape[1]).view(1, -1, 1, 1)
        expected = _oracle_gram(x, geom)
        scale = expected.abs().max().clamp(min=1)
        for path in _applicable_paths(geom, x_shape):
            monkeypatch.setattr(TF, '_gram_path', lambda *a, p=path.split(':')[0]: p)
            monkeypatch.setattr(TF, '_DFT_MAX_LENGTH', 0 if path == 'spectral:fft' else 10 ** 6)  # plans: per limit
            if budget_elements:
                TF.set_gram_chunk_bytes(budget_elements * 8)
            try:
                gram, rows = TF.patch_gram(x, geom)
            finally:
                TF.set_gram_chunk_bytes(None)
            assert rows == x_shape[0] * TF._conv_out_size(x, geom)[0] * TF._conv_out_size(x, geom)[1]
            err = float((gram - expected).abs().max() / scale)
            assert err <= 1e-11, (path, geom, x_shape, err)
            seen.add(path)
    return seen


@pytest.mark.parametrize('budget', [None, 200], ids=['one_chunk', 'chunked'])
def test_every_gram_path_matches_the_float64_oracle(monkeypatch, budget):
    geometries = _geometries(60, seed=0)
    assert {geom.padding_mode for geom, _ in geometries} == set(_MODES)
    assert any(h < geom.kernel_size[0] or w < geom.kernel_size[1] for geom, (_, _, h, w) in geometries)
    assert _check_paths(monkeypatch, geometries, budget) == {'unfold', 'shifted', 'spectral:dft', 'spectral:fft'}


@pytest.mark.slow
def test_every_gram_path_matches_the_float64_oracle_large_sample(monkeypatch):
    assert _check_paths(monkeypatch, _geometries(400, seed=1)) == {'unfold', 'shifted', 'spectral:dft', 'spectral:fft'}


@pytest.mark.parametrize('mode', _MODES)
def test_spectral_border_terms_of_zero_padding_lines_are_left_out_exactly(monkeypatch, mode):
    """ResNet stem, 32 px: the blocks of the tap pairs tap ≤ tap' use 12 border-row, 18 border-column and 180 corner
    terms (the Gram is symmetric, the other blocks are their transposes); with zero padding the first and last phase
    rows and columns (padded lines 0-1 and 36-37) read only the padding, so 6 of the row, 10 of the column and 140 of
    the corner terms are 0 and left out; padding modes that copy the input keep them all. The Gram stays exact either
    way."""
    geom = TF.conv_geometry((8, 3, 7, 7), 2, 3, padding_mode=mode)
    plans, make_plan = [], TF._spectral_plan

    def recording_plan(*args):
        plans.append(make_plan(*args))
        return plans[-1]
    monkeypatch.setattr(TF, '_gram_path', lambda *a: 'spectral')
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    with monkeypatch.context() as patched:
        patched.setattr(TF, '_spectral_plan', recording_plan)
        gram, _ = TF.patch_gram(x, geom)
    plan, = plans
    zeros = mode == 'zeros'
    assert (plan.zero_rows, plan.zero_cols) == ((frozenset({0, 18}),) * 2 if zeros else (frozenset(),) * 2)
    assert (plan.num_rows_terms, plan.num_cols_terms, plan.num_corners) == ((6, 8, 40) if zeros else (12, 18, 180))
    expected = _oracle_gram(x, geom)
    assert float((gram - expected).abs().max() / expected.abs().max()) <= 1e-11


def test_the_rule_takes_the_spectral_path_for_the_resnet_stem_from_16_px():
    geom = TF.conv_geometry((64, 3, 7, 7), 2, 3)
    budget = TF._chunk_elements(torch.device('cpu'), torch.float32)
    paths = {size: TF._gram_path(geom, (8, 3, size, size), size + 6, size + 6, torch.device('cpu'), budget)
             for size in (12, 16, 24, 32, 64, 224, 1024)}
    # 1024: accumulator too big
    assert paths == {12: 'shifted', 16: 'spectral', 24: 'spectral', 32: 'spectral', 64: 'spectral', 224: 'spectral',
                     1024: 'shifted'}
    # the cost model sees the border terms of the zero padding's lines left out: with reflect padding (no zero lines)
    # 16 px stays on the shifted path
    reflect = TF.conv_geometry((64, 3, 7, 7), 2, 3, padding_mode='reflect')
    assert TF._gram_path(reflect, (8, 3, 16, 16), 22, 22, torch.device('cpu'), budget) == 'shifted'
    patch_embed = TF.conv_geometry((64, 3, 16, 16), 16, 0)
    assert TF._gram_path(patch_embed, (8, 3, 224, 224), 224, 224, torch.device('cpu'), budget) == 'unfold'


# --- whole-layer gradients on sampled geometries ---

def _brute_force_grad(x, weight, gy, tract_lambda, geom):
    """float64 TrAct gradient from the oracle Gram and the explicit patch rows (one group)."""
    mode = 'constant' if geom.padding_mode == 'zeros' else geom.padding_mode
    cols = F.unfold(F.pad(x.double(), geom.pad, mode=mode), geom.kernel_size, stride=geom.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    grad_out = gy.double().permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
    a = rows.T @ rows / rows.shape[0] + tract_lambda * torch.eye(rows.shape[1], dtype=torch.float64)
    return (grad_out.T @ rows @ torch.linalg.inv(a)).reshape(weight.shape)


def _layer(geom, dtype=torch.float32):
    torch.manual_seed(0)
    return TrActConv2d(2, 3, geom.kernel_size, geom.stride, _torch_padding(geom), padding_mode=geom.padding_mode,
                       dtype=dtype)


def _torch_padding(geom):
    left, right, top, bottom = geom.pad
    if (left, top) == (right, bottom):
        return (top, left)
    return 'same'  # only 'same' gives asymmetric padding


def _layer_cases(count, seed):
    return [(geom, shape) for geom, shape in _geometries(count, seed)]


@pytest.mark.parametrize('case', _layer_cases(12, seed=2), ids=lambda c: f'{c[0].kernel_size}/{c[0].stride}')
def test_layer_gradient_matches_float64_oracle_also_channels_last(case):
    geom, shape = case
    layer = _layer(geom, torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    gy = torch.randn_like(y)
    expected = _brute_force_grad(x, layer.weight.detach(), gy, layer.tract_lambda, geom)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        layer.zero_grad()
        (layer(x.to(memory_format=memory_format)) * gy).sum().backward()
        assert ((layer.weight.grad - expected).norm() / expected.norm()) <= 1e-9


@pytest.mark.parametrize('amp_dtype', [torch.bfloat16, torch.float16])
def test_low_precision_autocast_against_float64_oracle(amp_dtype):
    """Under CPU autocast the conv (and so the ordinary gradient P) runs in low precision; TrAct turns exactly that P
    into P (XᵀX/N + λI)⁻¹ with the Gram of the float32 input: compared with the float64 solve of the same P."""
    for geom, shape in _layer_cases(6, seed=3):
        layer = _layer(geom)
        plain = nn.Conv2d(2, 3, geom.kernel_size, geom.stride, _torch_padding(geom), padding_mode=geom.padding_mode)
        plain.load_state_dict(layer.state_dict())
        x = torch.randn(shape)
        gy = None
        for module in (layer, plain):
            with torch.autocast('cpu', dtype=amp_dtype):
                y = module(x)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
            (y.float() * gy).sum().backward()
        mode = 'constant' if geom.padding_mode == 'zeros' else geom.padding_mode
        cols = F.unfold(F.pad(x.double(), geom.pad, mode=mode), geom.kernel_size, stride=geom.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        a = rows.T @ rows / rows.shape[0] + layer.tract_lambda * torch.eye(rows.shape[1], dtype=torch.float64)
        expected = (plain.weight.grad.double().reshape(3, -1) @ torch.linalg.inv(a)).reshape(layer.weight.shape)
        assert layer.weight.grad.dtype == torch.float32
        assert ((layer.weight.grad.double() - expected).norm() / expected.norm()) <= 1e-4


def test_layer_gradients_equal_the_official_torch_tract():
    """Zero padding (what the official wrapper supports), float64, every Gram path the rule picks."""
    checked = 0
    for geom, shape in _geometries(40, seed=4):
        if geom.padding_mode != 'zeros' or _torch_padding(geom) == 'same':
            continue
        ours = _layer(geom, torch.float64)
        conv = nn.Conv2d(2, 3, geom.kernel_size, geom.stride, _torch_padding(geom), dtype=torch.float64)
        conv.load_state_dict(ours.state_dict())
        official = torch_tract.TrAct(conv, l=ours.tract_lambda)
        x = torch.randn(shape, dtype=torch.float64)
        gy = torch.randn_like(ours(x))
        for module in (ours, official):
            (module(x) * gy).sum().backward()
        assert ((ours.weight.grad - conv.weight.grad).norm() / conv.weight.grad.norm()) <= 1e-8
        checked += 1
    assert checked >= 5
