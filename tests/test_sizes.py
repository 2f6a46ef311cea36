""" Consecutive batches of different image and batch sizes (timm's --train-img-sizes / --train-batch-sizes, a
dynamic_img_size ViT, set_input_size): every step's TrAct gradient equals the formula on that step's batch, float64. """
import copy

import pytest
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import timm_tract  # noqa: F401  (registers the tract-* optimizers)
from timm_tract import is_tract_layer, remove_tract

from _stack_helpers import first_layer, patch_rows, random_batch, tiny_model, tract_formula

pytestmark = pytest.mark.usefixtures('one_thread')


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, batch_size: int, img_size: int) -> None:
    """The step's gradients against a plain twin at the same weights (the TrAct formula for the first layer)."""
    x, y = random_batch(10 + step, batch_size, img_size)
    plain = _grads(remove_tract(copy.deepcopy(model)), x, y)
    got = _grads(model, x, y)
    stem_name = model.pretrained_cfg['first_conv'] + '.weight'
    expected = {**plain, stem_name: tract_formula(plain[stem_name], patch_rows(first_layer(model), x))}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=f'step {step} ({img_size} px): {name}')
    assert not torch.allclose(got[stem_name], plain[stem_name], rtol=1e-3, atol=0)
    opt.step()


def test_resnet_at_two_resolutions_and_batch_sizes():
    model = tiny_model('resnet10t').double()
    opt = create_optimizer_v2(model, 'tract-momentum', lr=0.1)
    _check_step(model, opt, 0, batch_size=4, img_size=16)
    _check_step(model, opt, 1, batch_size=2, img_size=24)


def test_dynamic_img_size_vit():
    model = tiny_model('vit_tiny_patch16_224', img_size=32, depth=2, dynamic_img_size=True).double()
    opt = create_optimizer_v2(model, 'tract-adamw', lr=1e-3)
    _check_step(model, opt, 0, batch_size=3, img_size=32)
    _check_step(model, opt, 1, batch_size=2, img_size=48)


def test_vit_set_input_size_between_steps():
    model = tiny_model('vit_tiny_patch16_224', img_size=32, depth=2).double()
    opt = create_optimizer_v2(model, 'tract-adamw', lr=1e-3)
    stem = first_layer(model)
    _check_step(model, opt, 0, batch_size=3, img_size=32)
    model.set_input_size(img_size=48)  # resamples pos_embed; the patch-embed layer (TrAct) is kept
    assert first_layer(model) is stem and is_tract_layer(stem)
    _check_step(model, opt, 1, batch_size=2, img_size=48)
