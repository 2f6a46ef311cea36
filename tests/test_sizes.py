""" Consecutive batches of different image and batch sizes (timm's --train-img-sizes / --train-batch-sizes, a
dynamic_img_size ViT, set_input_size): every step's TrAct gradient equals the formula on that step's batch, float64. """
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import timm_tract  # noqa: F401  (registers the tract-* optimizers)
from timm_tract import is_tract_layer, remove_tract

pytestmark = pytest.mark.usefixtures('one_thread')

LAMBDA = 0.1


def _batch(step: int, batch_size: int, img_size: int):
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(batch_size, 3, img_size, img_size, generator=g, dtype=torch.float64) * 2 + 0.5
    return x, torch.randint(0, 3, (batch_size,), generator=g)


def _stem(model: nn.Module) -> nn.Module:
    return model.get_submodule(model.pretrained_cfg['first_conv'])


def _tract_formula(conv: nn.Conv2d, x: torch.Tensor, plain_grad: torch.Tensor) -> torch.Tensor:
    """plain_grad (m, C, kh, kw) · (XᵀX/N + λI)⁻¹, X the unfolded patches of x (N = B·H_out·W_out rows)."""
    cols = nn.functional.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    a = rows.T @ rows / rows.shape[0] + LAMBDA * torch.eye(rows.shape[1], dtype=rows.dtype)
    m = plain_grad.shape[0]
    return torch.linalg.solve(a, plain_grad.reshape(m, -1).T).T.reshape(plain_grad.shape)


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, batch_size: int, img_size: int) -> None:
    """The step's gradients against a plain twin at the same weights (the TrAct formula for the first layer)."""
    x, y = _batch(step, batch_size, img_size)
    plain = _grads(remove_tract(copy.deepcopy(model)), x, y)
    got = _grads(model, x, y)
    stem_name = model.pretrained_cfg['first_conv'] + '.weight'
    expected = {**plain, stem_name: _tract_formula(_stem(model), x, plain[stem_name])}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=f'step {step} ({img_size} px): {name}')
    assert not torch.allclose(got[stem_name], plain[stem_name], rtol=1e-3, atol=0)
    opt.step()


def _model(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=3, **kwargs).double()


def test_resnet_at_two_resolutions_and_batch_sizes():
    model = _model('resnet10t')
    opt = create_optimizer_v2(model, 'tract-momentum', lr=0.1)
    _check_step(model, opt, 0, batch_size=4, img_size=16)
    _check_step(model, opt, 1, batch_size=2, img_size=24)


def test_dynamic_img_size_vit():
    model = _model('vit_tiny_patch16_224', img_size=32, depth=2, dynamic_img_size=True)
    opt = create_optimizer_v2(model, 'tract-adamw', lr=1e-3)
    _check_step(model, opt, 0, batch_size=3, img_size=32)
    _check_step(model, opt, 1, batch_size=2, img_size=48)


def test_vit_set_input_size_between_steps():
    model = _model('vit_tiny_patch16_224', img_size=32, depth=2)
    opt = create_optimizer_v2(model, 'tract-adamw', lr=1e-3)
    stem = _stem(model)
    _check_step(model, opt, 0, batch_size=3, img_size=32)
    model.set_input_size(img_size=48)  # resamples pos_embed; the patch-embed layer (TrAct) is kept
    assert _stem(model) is stem and is_tract_layer(stem)
    _check_step(model, opt, 1, batch_size=2, img_size=48)
