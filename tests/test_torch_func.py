""" torch.func on TrAct models: input Jacobians and vmapped input gradients equal the plain model's; a whole-batch
`torch.func.grad` w.r.t. the parameters gives the TrAct gradient; per-sample weight gradients are refused. """
import pytest
import timm
import torch
from torch.func import functional_call, grad, jacrev, vmap

import timm_tract  # noqa: F401 (registers the *_tract twins)
from timm_tract.errors import TrActArgumentError


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    ours = timm.create_model('resnet18_tract', num_classes=3, channels=(8, 16, 16, 16)).eval()
    plain = timm.create_model('resnet18', num_classes=3, channels=(8, 16, 16, 16)).eval()
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def test_jacrev_over_the_input_equals_the_plain_model(models):
    ours, plain = models
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(jacrev(ours)(x), jacrev(plain)(x))


def test_vmap_grad_over_inputs_equals_the_plain_model(models):
    ours, plain = models
    x = torch.randn(3, 3, 16, 16)
    per_input = [vmap(grad(lambda xi, m=m: m(xi[None]).sum()))(x) for m in (ours, plain)]
    assert torch.allclose(*per_input)


@pytest.mark.parametrize('size', [12, 16, 64])  # the stem's shifted path, spectral with DFT products, with FFTs
def test_func_grad_of_the_parameters_is_the_tract_gradient(models, size):
    ours, _ = models
    x = torch.randn(4, 3, size, size)
    ours.zero_grad()
    ours(x).sum().backward()
    params = {k: v.detach() for k, v in ours.named_parameters()}
    grads = grad(lambda p: functional_call(ours, p, (x,)).sum())(params)
    assert torch.allclose(grads['conv1.weight'], ours.conv1.weight.grad, rtol=1e-5, atol=1e-6)
    ours.zero_grad()


def test_per_sample_weight_gradients_are_refused_with_a_clear_error(models):
    ours, _ = models
    params = {k: v.detach() for k, v in ours.named_parameters()}
    with pytest.raises(TrActArgumentError, match='per-sample weight gradients .*remove_tract'):
        vmap(grad(lambda p, xi: functional_call(ours, p, (xi[None],)).sum()), in_dims=(None, 0))(
            params, torch.randn(2, 3, 16, 16))
