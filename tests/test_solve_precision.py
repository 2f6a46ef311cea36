""" Which system is solved (n×n Gram or N×N Woodbury, in which dtype), ill-conditioned float32 accuracy, and low
precision (bf16 weights, CPU autocast) against an independent float64 reference. """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_tract import TrActConv2d, TrActLinear
from timm_tract.errors import NotPositiveDefiniteError


def _oracle(x, gy, weight_shape, tract_lambda, stride=1, padding=0):
    """float64 TrAct gradient of a conv (zero padding, one group) by explicit unfold and inverse."""
    x, gy = x.double(), gy.double()
    cols = F.unfold(x, weight_shape[2:], padding=padding, stride=stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    grad_out = gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
    a = rows.T @ rows / rows.shape[0] + tract_lambda * torch.eye(rows.shape[1], dtype=torch.float64)
    return (grad_out.T @ rows @ torch.linalg.inv(a)).reshape(weight_shape)


def _oracle_linear(x, gy, tract_lambda):
    x, gy = x.double().reshape(-1, x.shape[-1]), gy.double().reshape(-1, gy.shape[-1])
    a = x.T @ x / x.shape[0] + tract_lambda * torch.eye(x.shape[1], dtype=torch.float64)
    return gy.T @ x @ torch.linalg.inv(a)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def factorized(monkeypatch):
    """Records (shape, dtype) of every matrix TrAct hands to the Cholesky factorization."""
    seen = []
    for name in ('cholesky', 'cholesky_ex'):  # CPU factorizes with the raising form, accelerators with the _ex form
        def spy(a, *args, _original=getattr(torch.linalg, name), **kwargs):
            seen.append((tuple(a.shape), a.dtype))
            return _original(a, *args, **kwargs)
        monkeypatch.setattr(torch.linalg, name, spy)
    return seen


# (layer, input shape, dtype, sync_gram, expected factorized (shape, dtype)); n×n systems up to n = 384 are solved in
# float64 (cheap next to the Gram; accurate for inputs far from zero mean), larger ones in the Gram's dtype
_SYSTEMS = [
    ('linear', (47, 48), torch.float32, False, ((1, 47, 47), torch.float64)),  # N = n-1: Woodbury, float64
    ('linear', (48, 48), torch.float32, False, ((1, 48, 48), torch.float64)),  # N = n: the Gram
    ('linear', (3, 100, 48), torch.float32, False, ((1, 48, 48), torch.float64)),
    ('linear', (10, 48), torch.float64, False, ((1, 10, 10), torch.float64)),
    ('linear', (100, 48), torch.float64, False, ((1, 48, 48), torch.float64)),
    ('linear', (10, 48), torch.float32, True, ((1, 48, 48), torch.float64)),  # sync_gram: always the (summable) Gram
    ('linear_wide', (500, 400), torch.float32, False, ((1, 400, 400), torch.float32)),  # n > 384: the Gram's dtype
    ('conv', (1, 3, 6, 6), torch.float32, False, ((1, 16, 16), torch.float64)),  # N = 16 < n = 27
    ('conv', (1, 3, 8, 8), torch.float32, False, ((1, 27, 27), torch.float64)),  # N = 36 >= 27
    ('conv', (1, 3, 6, 6), torch.float32, True, ((1, 27, 27), torch.float64)),
    ('conv_groups', (1, 6, 4, 4), torch.float32, False, ((2, 4, 4), torch.float64)),  # per group N = 4 < n = 27
    ('conv_groups', (4, 6, 8, 8), torch.float32, False, ((2, 27, 27), torch.float64)),
]


@pytest.mark.parametrize('kind,shape,dtype,sync_gram,expected', _SYSTEMS)
def test_the_smaller_system_is_factorized(factorized, kind, shape, dtype, sync_gram, expected):
    torch.manual_seed(0)
    if kind.startswith('linear'):
        layer = TrActLinear(shape[-1], 5, dtype=dtype, sync_gram=sync_gram)
    else:
        groups = 2 if kind == 'conv_groups' else 1
        layer = TrActConv2d(shape[1], 4, 3, groups=groups, dtype=dtype, sync_gram=sync_gram)
    x = torch.randn(shape, dtype=dtype)
    y = layer(x)
    assert not factorized  # nothing in forward
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    assert factorized == [expected]
    if kind == 'linear':
        assert _rel(layer.weight.grad, _oracle_linear(x, gy, 0.1)) <= (1e-10 if dtype == torch.float64 else 1e-5)
    elif kind == 'conv':
        assert _rel(layer.weight.grad, _oracle(x, gy, layer.weight.shape, 0.1)) <= 1e-5


def _ill_conditioned(rows, n=48, scale=10.0, seed=0):
    """Rows of rank 4 (times scale) plus 1 % noise: XᵀX/N has eigenvalues from ~1e-4 to ~scale²·n."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, 4, generator=gen, dtype=torch.float64)
    base = base @ torch.randn(4, n, generator=gen, dtype=torch.float64)
    x = (base * scale + 0.01 * torch.randn(rows, n, generator=gen, dtype=torch.float64)).float()
    return x, torch.randn(rows, 5, generator=gen, dtype=torch.float64).float()


@pytest.mark.parametrize('rows,scale,tract_lambda,bound', [
    # N < n: the N×N system in float64. Measured error 0.027 (|ref| up to 93); solving the n×n system in float32
    # instead is off by 11, so a flipped branch condition fails here by 400×.
    (20, 10.0, 1e-3, 0.1),
    # N >= n: the n×n system in float32. Measured error 0.025 (|ref| up to 21, condition number ~1e5).
    (60, 3.0, 1e-2, 0.1),
])
def test_ill_conditioned_float32_absolute_error(rows, scale, tract_lambda, bound):
    x, gy = _ill_conditioned(rows, scale=scale)
    layer = TrActLinear(48, 5, tract_lambda=tract_lambda)
    (layer(x) * gy).sum().backward()
    ref = _oracle_linear(x, gy, tract_lambda)  # float64 from the same float32 values
    err = (layer.weight.grad.double() - ref).abs().max().item()
    assert err <= bound, f'max abs error {err:.3g} (|ref| max {ref.abs().max().item():.3g})'


# --- low precision against an independent float64 reference ---

def _conv_and_data(seed=0):
    torch.manual_seed(seed)
    layer = TrActConv2d(3, 8, 3, stride=2, padding=1, tract_lambda=0.1)
    x = torch.randn(6, 3, 16, 16) * 3 + 1  # not standardized: TrAct differs strongly from the plain gradient
    gy = torch.randn(6, 8, 8, 8)
    return layer, x, gy


def test_bf16_parameters_against_float64_reference():
    layer, x, gy = _conv_and_data()
    layer = layer.bfloat16()
    plain = nn.Conv2d(3, 8, 3, stride=2, padding=1).bfloat16()
    plain.load_state_dict(layer.state_dict())
    xb, gyb = x.bfloat16(), gy.bfloat16()
    (layer(xb) * gyb).sum().backward()
    (plain(xb) * gyb).sum().backward()
    ref = _oracle(xb, gyb, layer.weight.shape, 0.1, stride=2, padding=1)  # float64 from the same bf16 values
    assert layer.weight.grad.dtype == torch.bfloat16
    err = _rel(layer.weight.grad, ref)
    assert err <= 1e-2  # bf16: 8 significant bits (measured 2.3e-3)
    assert _rel(plain.weight.grad, ref) > 20 * err  # ... and it is the TrAct gradient, not the plain one


@pytest.mark.parametrize('amp_dtype,tol', [(torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)])  # measured 3.4e-3, 6.6e-4
def test_cpu_autocast_against_float64_reference(amp_dtype, tol):
    layer, x, gy = _conv_and_data(1)
    plain = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    plain.load_state_dict(layer.state_dict())
    with torch.autocast('cpu', dtype=amp_dtype):
        y, y_plain = layer(x), plain(x)
        assert y.dtype == amp_dtype
        (y.float() * gy).sum().backward()
        (y_plain.float() * gy).sum().backward()
    ref = _oracle(x, gy, layer.weight.shape, 0.1, stride=2, padding=1)  # float64 from the float32 input
    assert layer.weight.grad.dtype == torch.float32
    err = _rel(layer.weight.grad, ref)
    assert err <= tol
    assert _rel(plain.weight.grad, ref) > 20 * tol


# --- inputs far from zero mean: [0, 255] pixels, constant images; the error names the case ---

@pytest.mark.parametrize('make', [
    lambda dt: TrActConv2d(3, 8, 7, stride=2, padding=3, dtype=dt),
    lambda dt: TrActConv2d(3, 8, 3, stride=1, padding=1, dtype=dt),
    lambda dt: TrActConv2d(3, 8, 7, stride=2, padding=3, padding_mode='reflect', dtype=dt),
    lambda dt: TrActConv2d(3, 8, 3, stride=1, padding=1, padding_mode='circular', dtype=dt),
    lambda dt: TrActConv2d(3, 8, 4, stride=4, dtype=dt),
    lambda dt: TrActConv2d(3, 8, 3, stride=1, padding=2, dilation=2, dtype=dt),
    lambda dt: TrActLinear(48, 8, dtype=dt)],
    ids=['stem_7x7s2', 'conv_3x3', 'stem_reflect', 'conv_3x3_circular', 'patchify_4x4', 'dilated_3x3', 'linear'])
@pytest.mark.parametrize('size', [32, 64])
def test_0_255_pixels_against_float64_reference(make, size):
    """Raw [0, 255] pixels at λ = 0.1: the float32 TrAct gradient within 5e-4 of the float64 one (the n×n system is
    solved in float64; 40% off before), on every Gram path and for padding modes that copy the input (the Gram
    restore's other branch)."""
    torch.manual_seed(0)
    layer, ref = make(torch.float32), make(torch.float64)
    ref.load_state_dict(layer.state_dict())
    x = torch.randint(0, 256, (8, 3, size, size)).float()
    if isinstance(layer, nn.Linear):
        x = x.reshape(-1, 48)[:4000]
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (ref(x.double()) * gy.double()).sum().backward()
    assert _rel(layer.weight.grad, ref.weight.grad) <= 5e-4


@pytest.mark.parametrize('offset,dtype,centered', [
    (0.0, torch.float32, False), (0.2, torch.float32, False), (0.3, torch.float32, True),
    (128.0, torch.float32, True), (0.0, torch.float64, False), (0.3, torch.float64, True),
    (128.0, torch.float16, True)])
def test_only_batches_far_from_zero_mean_are_centered(offset, dtype, centered):
    """CPU: the Gram is accumulated from the centered input and restored in float64 exactly when some channel's
    mean² exceeds 1/16 of its variance (std 1: |mean| > 0.25, here one channel of three); a standardized batch
    takes the Gram of the raw values in its own dtype. Both within rounding of the float64 unfold product (float16
    [0, 255]-scale values: squares summed in float32, not overflowed)."""
    from timm_tract import functional as TF
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    x[:, 1] += offset
    geom = TF.conv_geometry((8, 3, 7, 7), stride=2, padding=3)
    gram, _ = TF.patch_gram(x.to(dtype), geom)
    assert gram.dtype == (torch.float64 if centered or dtype == torch.float64 else torch.float32)
    rows = F.unfold(x.to(dtype).double(), 7, padding=3, stride=2).transpose(1, 2).reshape(-1, 147)
    expected = rows.T @ rows
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ((gram[0].double() - expected).abs().max() / expected.abs().max()).item() <= tol


@pytest.mark.parametrize('images_per_chunk', [8, 3])
@pytest.mark.parametrize('chans', [3, 16])  # squares summed as product diagonals (<= 8 channels) and by squaring
@pytest.mark.parametrize('mean,centered', [(0.24, False), (0.26, True)])
def test_the_centering_decision_weighs_mean_squared_against_variance(chans, mean, centered, images_per_chunk):
    """A channel of variance 1 is centered once |mean| > 1/4 (mean² > variance/16), however the squares are summed and
    whether the batch is one chunk or several."""
    from timm_tract import functional as TF
    torch.manual_seed(0)
    x = torch.randn(8, chans, 16, 16, dtype=torch.float64)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True, unbiased=False)  # mean 0, variance 1
    x[:, -1] += mean
    assert TF._far_from_zero_mean(x.float(), images_per_chunk * x[0].numel()) is centered


@pytest.mark.parametrize('size', [16, 32, 64])
@pytest.mark.parametrize('value', [255.0, 1000.0])
def test_constant_images_against_float64_reference(size, value):
    """Constant images (XᵀX/N ~ value², rank-deficient but for the padding): the float32 gradient within 1e-4 of the
    float64 one and of the oracle (the Gram is accumulated from the centered input; 195% off, silently, before)."""
    torch.manual_seed(0)
    x = torch.full((4, 3, size, size), value)
    layer = TrActConv2d(3, 4, 7, stride=2, padding=3)
    ref = TrActConv2d(3, 4, 7, stride=2, padding=3, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    gy = torch.randn(4, 4, size // 2, size // 2, dtype=torch.float64)
    (ref(x.double()) * gy).sum().backward()
    (layer(x) * gy.float()).sum().backward()
    # float64 against float64: rounding times the system's condition number (about value²·n/λ, 1.5e9 at 1000), which
    # bounds the oracle's own error too (2-3e-8 seen on an Intel Xeon at 1000, below 1e-8 on an AMD EPYC)
    assert _rel(ref.weight.grad, _oracle(x, gy, ref.weight.shape, 0.1, stride=2, padding=3)) <= 1e-6
    assert _rel(layer.weight.grad, ref.weight.grad) <= 1e-4


def test_rank_deficient_gram_with_tiny_lambda_says_so():
    """A rank-1 Gram (constant patches, no padding) with λ below the float64 resolution of XᵀX/N: the message blames
    λ against the rank-deficient Gram, not the input scale."""
    layer = TrActConv2d(3, 4, 3, dtype=torch.float64, tract_lambda=1e-20)
    x = torch.full((2, 3, 8, 8), 3.0, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError) as info:
        layer(x).sum().backward()
    msg = str(info.value)
    assert 'λ=1e-20 is below the torch.float64 resolution' in msg and 'rank-deficient' in msg
    assert 'Raise tract_lambda' in msg and 'input scale' not in msg


def test_non_finite_incoming_gradient_passes_through_like_the_plain_layer():
    """An inf/NaN output gradient (an fp16 overflow GradScaler skips) gives a non-finite weight gradient, as for the
    plain conv, instead of a NotPositiveDefiniteError blaming the input: only a bad system raises."""
    from timm_tract.functional import tract_conv2d
    x = torch.randn(2, 3, 16, 16)
    w = torch.randn(8, 3, 7, 7, requires_grad=True)
    y = tract_conv2d(x, w, None, 2, 3)
    y.backward(torch.full_like(y, float('inf')))
    assert not torch.isfinite(w.grad).all()
