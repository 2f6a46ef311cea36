""" TrAct layers in models: apply_tract/remove_tract, AMP, channels_last, compile, FX, checkpointing, meta device. """
import io

import pytest
import timm
import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import StdConv2d, create_feature_extractor

from timm_tract import TrActConv2d, TrActLinear, apply_tract, find_first_layer, is_tract_layer, remove_tract
from timm_tract import functional as TF
from timm_tract.errors import NotPositiveDefiniteError


def _small_net(tract=True):
    conv = (TrActConv2d if tract else nn.Conv2d)(3, 8, 3, stride=2, padding=1)
    return nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _first_grad(model, x, first=None):
    model.zero_grad()
    model(x).float().square().mean().backward()
    return (first or model[0]).weight.grad.clone()


@pytest.mark.parametrize('arch,expected', [
    ('resnet18', 'conv1'), ('resnet50d', 'conv1.0'), ('convnext_atto', 'stem.0'),
    ('vit_tiny_patch16_224', 'patch_embed.proj'),
])
def test_apply_tract_finds_timm_first_conv(arch, expected):
    model = timm.create_model(arch, num_classes=3)
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    assert apply_tract(model, tract_lambda=0.05) is model
    layer = model.get_submodule(expected)
    assert isinstance(layer, TrActConv2d) and layer.tract_lambda == 0.05
    assert sum(is_tract_layer(m) for m in model.modules()) == 1
    assert find_first_layer(model) == (expected,)
    assert {name: p for name, p in model.named_parameters()} == params_before  # same Parameter objects
    assert all(params_before[n] is p for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys_before
    remove_tract(model)
    assert type(model.get_submodule(expected)) is nn.Conv2d
    assert not hasattr(model.get_submodule(expected), 'tract_lambda')


def test_optimizer_built_before_apply_keeps_working():
    torch.manual_seed(0)
    model = _small_net(tract=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    apply_tract(model)
    x = torch.randn(4, 3, 8, 8)
    before = model[0].weight.detach().clone()
    tract_grad = _first_grad(model, x)
    opt.step()
    assert torch.allclose(model[0].weight, before - 0.1 * tract_grad)


def test_apply_twice_does_not_double_wrap_and_updates_lambda():
    model = _small_net(tract=False)
    apply_tract(model, 0.1)
    apply_tract(model, 0.2)
    assert type(model[0]) is TrActConv2d and model[0].tract_lambda == 0.2
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model.double()
    ref = _small_net(tract=False).double()
    ref.load_state_dict(model.state_dict())
    g = _first_grad(model, x)
    # one TrAct application == preconditioning the plain gradient once
    plain = _first_grad(ref, x)
    stats, rows = TF.patch_gram(x, TF.conv_geometry(model[0].weight.shape, stride=2, padding=1))
    assert torch.allclose(g, TF.tract_precondition(plain, stats, rows, 0.2), rtol=1e-10, atol=1e-12)


def test_apply_tract_explicit_layer_and_linear_and_tuple():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    apply_tract(model)  # no pretrained_cfg: first Linear in module order
    assert type(model[0]) is TrActLinear and type(model[2]) is nn.Linear
    apply_tract(model, layer='2')
    assert type(model[2]) is TrActLinear
    remove_tract(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    model.pretrained_cfg = {'first_conv': ('0', '2')}
    apply_tract(model)
    assert type(model[0]) is TrActLinear and type(model[2]) is TrActLinear


def test_apply_tract_errors_name_problem_and_fix():
    model = _small_net(tract=False)
    with pytest.raises(ValueError, match='does not exist.*layer='):
        apply_tract(model, layer='stem.conv')
    with pytest.raises(ValueError, match='tract_lambda'):
        apply_tract(model, tract_lambda=0)
    with pytest.raises(ValueError, match='tract_lambda'):
        apply_tract(model, tract_lambda=float('nan'))
    with pytest.raises(TypeError, match='BatchNorm2d'):
        apply_tract(model, layer='1')
    std = nn.Sequential(StdConv2d(3, 4, 3))
    with pytest.raises(TypeError, match='StdConv2d.*plain nn.Conv2d'):
        apply_tract(std)
    with pytest.raises(ValueError, match='no `first_conv`'):
        apply_tract(nn.Sequential(nn.ReLU()))
    assert type(model[0]) is nn.Conv2d  # nothing changed by the failed calls


@pytest.mark.parametrize('amp_dtype', [torch.bfloat16, torch.float16])
def test_cpu_autocast_gram_in_fp32_grad_in_param_dtype(amp_dtype):
    """Under autocast the layer runs in the autocast dtype; the TrAct gradient is the (fp32-accumulated) Gram's
    preconditioning of the plain autocast gradient, in the parameter dtype."""
    torch.manual_seed(0)
    model, ref = _small_net(), _small_net(tract=False)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16) * 3 + 1
    with torch.autocast('cpu', dtype=amp_dtype):
        g = _first_grad(model, x)
        plain = _first_grad(ref, x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    stats, rows = TF.patch_gram(x, TF.conv_geometry(model[0].weight.shape, stride=2, padding=1))
    assert stats.dtype == torch.float64  # accumulated in float32 from the centered input, restored in float64
    assert torch.allclose(g, TF.tract_precondition(plain, stats, rows, 0.1), rtol=1e-5, atol=1e-6)
    fp32 = _first_grad(model, x)
    assert ((g - fp32).norm() / fp32.norm()) < 0.1  # close to the fp32 TrAct gradient at autocast precision


def test_low_precision_parameters():
    torch.manual_seed(0)
    model = _small_net().bfloat16()
    g = _first_grad(model, torch.randn(4, 3, 8, 8, dtype=torch.bfloat16))
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = _small_net()
    x = torch.randn(4, 3, 16, 16)
    g = _first_grad(model, x)
    model = model.to(memory_format=torch.channels_last)
    g_cl = _first_grad(model, x.to(memory_format=torch.channels_last))
    assert torch.allclose(g, g_cl, rtol=1e-5, atol=1e-6)


def test_float64_model_computes_in_double():
    torch.manual_seed(0)
    model, ref = _small_net().double(), _small_net(tract=False).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    g, plain = _first_grad(model, x), _first_grad(ref, x)
    stats, rows = TF.patch_gram(x, TF.conv_geometry(model[0].weight.shape, stride=2, padding=1))
    assert stats.dtype == torch.float64 and g.dtype == torch.float64
    assert torch.allclose(g, TF.tract_precondition(plain, stats, rows, 0.1), rtol=1e-12, atol=1e-15)


def test_torch_compile_gives_eager_gradients():
    torch.manual_seed(0)
    model = _small_net()
    x = torch.randn(4, 3, 16, 16)
    eager = _first_grad(model, x)
    compiled = torch.compile(model)
    model.zero_grad()
    compiled(x).square().mean().backward()
    assert torch.allclose(model[0].weight.grad, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('first,size', [
    (lambda: TrActConv2d(3, 8, 3, stride=2, padding=1), 16),  # shifted Gram
    (lambda: TrActConv2d(3, 8, 7, stride=2, padding=3), 96),  # spectral Gram
    (lambda: TrActConv2d(3, 8, 4, stride=4), 16),  # unfold Gram (patch embed)
    (lambda: nn.Sequential(nn.Flatten(2), TrActLinear(16 * 16, 8)), 16),  # Linear
], ids=['shifted', 'spectral', 'unfold', 'linear'])
def test_torch_compile_fullgraph_keeps_the_tract_gradient(first, size):
    """torch.compile traces the TrAct backward as one op (`timm_tract::weight_grad`): no graph break around the layer
    (`fullgraph=True` compiles), one graph, and the compiled gradient is the eager one."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = nn.Sequential(first(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(4, 3, size, size)
    eager = _first_grad(model, x, first=[m for m in model.modules() if is_tract_layer(m)][0])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    layer = [m for m in model.modules() if is_tract_layer(m)][0]
    assert torch.allclose(_first_grad(compiled, x, first=layer), eager, rtol=1e-5, atol=1e-6)
    assert counters['stats']['unique_graphs'] == 1 and not counters['graph_break']


def test_torch_compile_raises_the_cpu_error_for_a_nan_input():
    """The op runs eagerly inside the compiled graph: on CPU a NaN input still raises NotPositiveDefiniteError."""
    import torch._dynamo
    torch._dynamo.reset()
    compiled = torch.compile(_small_net(), backend='aot_eager', fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(NotPositiveDefiniteError, match='NaN/Inf'):
        compiled(x).sum().backward()


def test_timm_fx_keeps_layer_as_leaf_with_tract_gradient():
    torch.manual_seed(0)
    model = _small_net()
    x = torch.randn(4, 3, 16, 16)
    eager = _first_grad(model, x)
    extractor = create_feature_extractor(model, return_nodes=['5'])
    nodes = {n.target: n.op for n in extractor.graph.nodes}
    assert nodes.get('0') == 'call_module'  # the TrAct layer is a leaf, not traced into F.conv2d
    model.zero_grad()
    extractor(x)['5'].square().mean().backward()
    assert torch.allclose(model[0].weight.grad, eager, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_same_gradient():
    torch.manual_seed(0)
    model = _small_net()
    x = torch.randn(4, 3, 16, 16)
    eager = _first_grad(model, x)
    model.zero_grad()
    head = model[1:]
    out = head(torch.utils.checkpoint.checkpoint(model[0], x, use_reentrant=False))
    out.square().mean().backward()
    assert torch.allclose(model[0].weight.grad, eager, rtol=1e-6, atol=1e-7)


def test_meta_device_construction_forward_backward():
    with torch.device('meta'):
        conv = TrActConv2d(3, 8, 3, padding='same', tract_lambda=0.2)
        lin = TrActLinear(8, 4)
    x = torch.empty(2, 3, 8, 8, device='meta')
    y = lin(conv(x).mean((2, 3)))
    y.sum().backward()
    assert conv.weight.grad.device.type == 'meta' and conv.weight.grad.shape == conv.weight.shape
    assert lin.weight.grad.shape == lin.weight.shape


def test_torchscript_scripted_layer_saves_and_runs_plain_forward():
    torch.manual_seed(0)
    model = _small_net().eval()
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_state_dict_interchanges_with_plain_layers():
    torch.manual_seed(0)
    tract, plain = _small_net(), _small_net(tract=False)
    assert list(tract.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(tract.state_dict(), strict=True)
    tract.eval(), plain.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(tract(x), plain(x))


# --- failures change nothing (issue 9 items 3 and 8) ---

def _snapshot(model):
    return [(name, type(m), m.__dict__.get('_tract_lambda')) for name, m in model.named_modules()], \
        [(name, p) for name, p in model.named_parameters()]


def _assert_unchanged(model, snapshot):
    modules, params = _snapshot(model)
    assert modules == snapshot[0]
    assert len(params) == len(snapshot[1]) and all(
        n == n0 and p is p0 for (n, p), (n0, p0) in zip(params, snapshot[1]))


@pytest.mark.parametrize('layer,error,fix', [
    (('0', 'missing.conv'), ValueError, 'does not exist.*layer="<module path>"'),
    (['0', '1'], TypeError, 'BatchNorm2d.*plain nn.Conv2d'),
])
def test_apply_tract_list_with_one_invalid_layer_converts_none(layer, error, fix):
    model = _small_net(tract=False)
    before = _snapshot(model)
    with pytest.raises(error, match=fix):
        apply_tract(model, layer=layer)
    _assert_unchanged(model, before)
    assert type(model[0]) is nn.Conv2d  # the valid first entry was not converted either
    apply_tract(model, layer=['0', '5'])  # control: a list of valid layers converts them all
    assert type(model[0]) is TrActConv2d and type(model[5]) is TrActLinear


def test_apply_tract_bad_lambda_on_tract_model_keeps_old_lambda():
    model = _small_net(tract=False)
    apply_tract(model, 0.2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match='tract_lambda.*paper default 0.1'):
        apply_tract(model, -1)
    _assert_unchanged(model, before)
    assert model[0].tract_lambda == 0.2


@pytest.mark.parametrize('layer', [5, 0.5, ('0', 3), [], b'0', {'0': 1}])
def test_apply_tract_layer_of_wrong_type_is_type_error_naming_layer(layer):
    from timm_tract.errors import TrActTypeError
    model = _small_net(tract=False)
    before = _snapshot(model)
    with pytest.raises(TrActTypeError, match=r'^layer must be a module path.*e\.g\. layer="conv1"'):
        apply_tract(model, layer=layer)
    _assert_unchanged(model, before)


@pytest.mark.parametrize('bad', [-1, 0, float('nan'), True, 'x'])
def test_assigning_bad_lambda_to_tract_layer_is_refused(bad):
    for layer in (TrActConv2d(3, 4, 3, tract_lambda=0.3), TrActLinear(3, 4, tract_lambda=0.3)):
        with pytest.raises((ValueError, TypeError), match='tract_lambda') as info:
            layer.tract_lambda = bad
        assert 'paper default 0.1' in str(info.value) or 'Pass a float' in str(info.value)
        assert layer.tract_lambda == 0.3
    conv = _small_net(tract=False)[0]
    apply_tract(nn.Sequential(conv))  # a converted layer validates too
    with pytest.raises((ValueError, TypeError), match='tract_lambda'):
        conv.tract_lambda = bad
    assert conv.tract_lambda == 0.1


def test_lambda_assignment_accepts_real_numbers_and_remove_tract_cleans_up():
    import numpy as np
    layer = TrActConv2d(3, 4, 3)
    layer.tract_lambda = np.float32(0.25)
    assert type(layer.tract_lambda) is float and layer.tract_lambda == pytest.approx(0.25)
    layer.tract_lambda = torch.tensor(0.5)
    assert layer.tract_lambda == 0.5
    model = nn.Sequential(layer)
    remove_tract(model)
    assert type(model[0]) is nn.Conv2d and not hasattr(model[0], 'tract_lambda')
    assert not hasattr(model[0], '_tract_lambda') and not hasattr(model[0], 'sync_gram')


def _fails_pd(layer, x):
    from timm_tract.errors import NotPositiveDefiniteError
    before = layer.weight.detach().clone()
    with pytest.raises(NotPositiveDefiniteError) as info:
        layer(x).sum().backward()
    assert layer.weight.grad is None and torch.equal(layer.weight, before)
    return str(info.value)


@pytest.mark.parametrize('make', [lambda: TrActConv2d(3, 4, 3), lambda: TrActLinear(27, 4)], ids=['conv', 'linear'])
def test_not_positive_definite_error_tells_nan_input_from_huge_scale(make):
    torch.manual_seed(0)
    shape = (2, 3, 8, 8) if isinstance(make(), nn.Conv2d) else (40, 27)
    x = torch.randn(shape)
    x.view(-1)[5] = float('nan')
    msg = _fails_pd(make(), x)
    assert 'NaN/Inf value(s)' in msg and 'Check the input batch' in msg and 'scale' not in msg
    huge = torch.randn(shape) * 1e25  # finite, but XᵀX/N overflows float32
    assert torch.isfinite(huge).all()
    msg = _fails_pd(make(), huge)
    assert 'finite but its scale (max |x| = ' in msg and 'Standardize the input' in msg and 'NaN' not in msg
    # the same input in float64 is fine: the scale, not the data, is the problem
    layer = make().double()
    layer(huge.double()).sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
